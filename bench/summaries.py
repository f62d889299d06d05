"""The summaries part of the bench: a real worker process (`arq worker.WorkerSettings`) summarising sessions the
bench ends through the real server; from a client's close to the summary stored, and jobs per second."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from .run import REPO, Stack, _open, _pct, _proc_cpu_s

_POLL_S = 0.005


async def start_worker(stack: Stack, redis_url: str) -> asyncio.subprocess.Process:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": f"{stack.upstream_url}/v1",
        "OPENAI_MODEL": "bench",
        "LOG_LEVEL": "WARNING",
        "WORKER_METRICS_PORT": "0",
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arq", "worker.WorkerSettings", env=env, cwd=REPO, stderr=asyncio.subprocess.DEVNULL
    )
    # Ready once its start-up sweep has run and the queue has stayed empty for a second: what it finds of
    # earlier runs is not measured.
    redis = Redis.from_url(redis_url)
    try:
        await asyncio.sleep(1.0)
        quiet_since = None
        async with asyncio.timeout(120):
            while quiet_since is None or time.monotonic() - quiet_since < 1.0:
                queued = await redis.zcard("arq:queue")
                quiet_since = None if queued else (quiet_since or time.monotonic())
                await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
    return worker


async def stop_worker(worker: asyncio.subprocess.Process) -> None:
    if worker.returncode is None:
        worker.terminate()
        await worker.wait()


async def summaries(stack: Stack, worker: asyncio.subprocess.Process, *, sessions: int, label: str) -> dict[str, Any]:
    """`sessions` sessions each exchange one message and close at the same instant; until each summary is stored."""
    markers = [f"<{label}-{i}>" for i in range(sessions)]
    sockets = await asyncio.gather(*(_open(stack, f"{label}-{i}") for i in range(sessions)))

    async def ask(ws: Any, marker: str) -> None:
        await ws.send_str(orjson.dumps({"type": "message", "text": marker}).decode())
        while True:
            msg = await ws.receive()
            if orjson.loads(msg.data)["type"] == "response.done":
                return

    await asyncio.gather(*(ask(ws, m) for ws, m in zip(sockets, markers, strict=True)))
    cpu0 = _proc_cpu_s(worker.pid)
    closed_at = time.time()
    await asyncio.gather(*(ws.close() for ws in sockets))

    ids = [f"{label}-{i}" for i in range(sessions)]
    stored_at: dict[str, float] = {}
    conn = await asyncpg.connect(stack.database_url)
    try:
        async with asyncio.timeout(120):
            while len(stored_at) < sessions:
                rows = await conn.fetch(
                    "select session_id from sessions where session_id = any($1) and summary is not null", ids
                )
                now = time.time()
                for row in rows:
                    stored_at.setdefault(row["session_id"], now)
                await asyncio.sleep(_POLL_S)
    finally:
        await conn.close()
    elapsed = max(stored_at.values()) - closed_at
    cpu = _proc_cpu_s(worker.pid) - cpu0

    # The model's own time for each summary request, which carries the session's marker in its transcript.
    upstream = await stack.upstream_timings()
    own: dict[str, float] = {}
    for key, (arrived, first_chunk) in upstream.items():
        for i, marker in enumerate(markers):
            if marker in key and key != marker:
                own[ids[i]] = first_chunk - arrived
    added = [stored_at[s] - closed_at - own.get(s, 0.0) for s in ids]
    return {
        "sessions": sessions,
        "added_p50": _pct(added, 50),
        "added_p99": _pct(added, 99),
        "jobs_per_s": sessions / elapsed,
        "cpu_ms_per_job": cpu / sessions * 1000,
    }
