"""The summaries measurement: sessions ending together through the real server, and how long until the worker has
stored each one's summary.

For each session, from the client's close (the instant before `ws.close()`) to the summary stored
(`sessions.summary_updated_at`, the database's `now()` at the write, brought onto this process's clock), minus the
upstream's own time for the session's summary requests (arrival to last chunk; the upstream records both). The
job's own record in arq (`arq:result:<job id>`: enqueued, started, finished) splits that time between the server
(close to enqueued), the queue (to started) and the job; the worker's rate is its jobs over the span from its first
start to its last finish, and its CPU per job is read from /proc/<pid>/stat.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
from arq.jobs import deserialize_result

from .stack import Stack, Turn, converse, open_session, pct, proc_cpu_s
from .worker_process import RESULT_PREFIX, WAIT_S, Worker

_POLL_S = 0.02
# A summary request's text is the transcript, "User: <marker>\nAssistant: ..."; the marker names the session.
_MARKER = re.compile(r"^User: <([^<>\n]+)>$", re.MULTILINE)


async def _db_clock_offset(conn: asyncpg.Connection) -> float:
    """The database's clock minus ours, in seconds (zero but for noise when it runs on this machine): from the
    quickest of a few round trips."""
    samples = []
    for _ in range(5):
        before = time.time()
        db_now = await conn.fetchval("select extract(epoch from clock_timestamp())::float8")
        after = time.time()
        samples.append((after - before, float(db_now) - (before + after) / 2))
    return min(samples)[1]


async def summaries(
    stack: Stack, worker: Worker, *, sessions: int, label: str, min_sessions: int = 1
) -> dict[str, Any]:
    """`sessions` sessions end together, in as many rounds as it takes to measure `min_sessions` of them (one
    sample of a single session says little: arq polls its queue every 50 ms)."""
    rounds = [
        await _round(stack, worker, sessions=sessions, label=f"{label}r{n}")
        for n in range(max(1, -(-min_sessions // sessions)))
    ]
    added = [x for r in rounds for x in r.added]
    jobs = sum(r.jobs for r in rounds)
    span = sum(r.span for r in rounds)
    cpu = sum(r.cpu for r in rounds)
    return {
        "sessions": sessions,
        "rounds": len(rounds),
        "added_p50": pct(added, 50),
        "added_p99": pct(added, 99),
        "enqueued_p50": pct([x for r in rounds for x in r.enqueued], 50),
        "started_p50": pct([x for r in rounds for x in r.started], 50),
        # One job has no rate: its span is its own duration.
        "jobs_per_s": jobs / span if sessions > 1 and span > 0 else float("nan"),
        # /proc counts CPU in clock ticks (10 ms, usually): fewer than ten of them tell nothing.
        "cpu_s_per_job": cpu / jobs if cpu >= 10 / os.sysconf("SC_CLK_TCK") else float("nan"),
    }


@dataclass
class _Round:
    added: list[float]  # close to stored, minus the model's time
    enqueued: list[float]  # close to the job enqueued
    started: list[float]  # close to the job started
    jobs: int
    span: float  # from the first job's start to the last one's end
    cpu: float  # the worker's CPU meanwhile


async def _round(stack: Stack, worker: Worker, *, sessions: int, label: str) -> _Round:
    """`sessions` sessions each exchange one message and close at the same instant; until every summary is stored
    and every job has finished."""
    ids = [f"{label}-{i}" for i in range(sessions)]
    sockets = await asyncio.gather(*(open_session(stack, sid) for sid in ids))
    await asyncio.gather(*(converse(ws, f"<{sid}>", Turn()) for ws, sid in zip(sockets, ids, strict=True)))

    closed_at: dict[str, float] = {}

    async def close(ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        closed_at[session_id] = time.time()
        await ws.close()

    conn = await asyncpg.connect(stack.database_url)
    try:
        offset = await _db_clock_offset(conn)
        cpu0 = proc_cpu_s(worker.pid)
        await asyncio.gather(*(close(ws, sid) for ws, sid in zip(sockets, ids, strict=True)))
        try:
            async with asyncio.timeout(WAIT_S):
                # The summaries, then the jobs' records (written by arq just after each job returns).
                while await conn.fetchval(
                    "select count(*) from sessions where session_id = any($1) and summary is not null", ids
                ) < len(ids):
                    worker.check()
                    await asyncio.sleep(_POLL_S)
                jobs = await _job_results(worker, label, ids)
        except TimeoutError:
            raise RuntimeError(
                f"{label}: not every summary was stored within {WAIT_S:g} s; the worker's log ends:\n"
                + worker.log_tail()
            ) from None
        cpu = proc_cpu_s(worker.pid) - cpu0
        rows = await conn.fetch(
            "select session_id, extract(epoch from summary_updated_at)::float8 as stored from sessions"
            " where session_id = any($1)",
            ids,
        )
    finally:
        await conn.close()
    stored_at = {r["session_id"]: r["stored"] - offset for r in rows}

    # The model's own time for each session's summary requests, from their arrival to their last chunk.
    model: dict[str, float] = dict.fromkeys(ids, 0.0)
    for key, (arrived, _, finished) in (await stack.upstream_timings()).items():
        found = _MARKER.search(key)
        if found and found[1] in model:
            model[found[1]] += finished - arrived

    return _Round(
        added=[stored_at[s] - closed_at[s] - model[s] for s in ids],
        enqueued=[jobs[s]["enqueued"] - closed_at[s] for s in ids],
        started=[jobs[s]["started"] - closed_at[s] for s in ids],
        jobs=len(ids),
        span=max(j["finished"] for j in jobs.values()) - min(j["started"] for j in jobs.values()),
        cpu=cpu,
    )


async def _job_results(worker: Worker, label: str, ids: list[str]) -> dict[str, dict[str, float]]:
    """arq's record of each summary job of this round (job ids are `summary:<session>:<start>:<last message>`), by
    session: when it was enqueued, started and finished, on this machine's clock."""
    pattern = f"{RESULT_PREFIX}summary:{label}-*"
    while True:
        keys = [key async for key in worker.redis.scan_iter(match=pattern, count=1000)]
        if len(keys) >= len(ids):
            break
        worker.check()
        await asyncio.sleep(_POLL_S)
    jobs: dict[str, dict[str, float]] = {}
    for key, raw in zip(keys, await worker.redis.mget(keys), strict=True):
        if raw is None:
            continue
        result = deserialize_result(raw)
        if not result.success or result.result.get("outcome") != "summarised":
            raise RuntimeError(f"summary job {key.decode()} did not summarise: {result.result!r}")
        session_id = key.decode().removeprefix(f"{RESULT_PREFIX}summary:").rsplit(":", 2)[0]
        jobs[session_id] = {
            "enqueued": result.enqueue_time.timestamp(),
            "started": result.start_time.timestamp(),
            "finished": result.finish_time.timestamp(),
        }
    if missing := set(ids) - jobs.keys():
        raise RuntimeError(f"no job record for {sorted(missing)[:5]}")
    return jobs
