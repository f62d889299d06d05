"""The summaries part of the bench (`python -m bench`, or alone: `python -m bench.summaries`): a real worker process
(`arq worker.WorkerSettings`, as in the Dockerfile and docker-compose.yml) summarising the sessions the bench ends
through the real server.

For each session, from the client's close (the instant before `ws.close()`) to the summary stored
(`sessions.summary_updated_at`, the database's `now()` at the write, brought onto this process's clock), minus the
upstream's own time for the session's summary requests (arrival to last chunk; the upstream records both). The
job's own record in arq (`arq:result:<job id>`: enqueued, started, finished) splits that time between the server
(close to enqueued), the queue (to started) and the job; the worker's rate is its jobs over the span from its first
start to its last finish, and its CPU per job is read from /proc/<pid>/stat.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from arq.jobs import deserialize_result
from redis.asyncio import Redis

from .stack import REPO, Stack, Turn, converse, fmt_ms, open_session, pct, proc_cpu_s, start_stack, stop_stack

_POLL_S = 0.02
_WAIT_S = 120.0
# Keys of the worker's queue in Redis (arq's defaults; worker/settings.py sets no queue name).
_QUEUE = "arq:queue"
_HEALTH = "arq:queue:health-check"
_RESULT = "arq:result:"
# A summary request's text is the transcript, "User: <marker>\nAssistant: ..."; the marker names the session.
_MARKER = re.compile(r"^User: <([^<>\n]+)>$", re.MULTILINE)


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    log: Path
    redis: Redis

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        """Raise, with the end of its log, when the worker has exited."""
        if self.proc.returncode is not None:
            raise RuntimeError(f"the worker exited with status {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


async def start_worker(stack: Stack, redis_url: str, *, max_jobs: int | None = None) -> Worker:
    """A worker process on the stack's database, Redis and upstream; returns once it polls its queue and the queue
    has stayed empty for a second (what its start-up sweep finds of earlier runs is not measured)."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": f"{stack.upstream_url}/v1",
        "OPENAI_API_KEY": "bench",
        "OPENAI_MODEL": "bench",
        "SUMMARY_DELAY_S": "0",
        "LOG_LEVEL": "WARNING",
        "WORKER_METRICS_PORT": "0",
    }
    if max_jobs is not None:
        env["WORKER_MAX_JOBS"] = str(max_jobs)
    redis = Redis.from_url(redis_url)
    # Its heartbeat key says it polls: a stale one (a worker of an earlier run on this Redis) must not.
    await redis.delete(_HEALTH)
    fd, log = tempfile.mkstemp(prefix="bench-worker-", suffix=".log")
    try:
        # arq's command line logs every job at INFO on stderr: to a file, shown if the worker fails.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arq", "worker.WorkerSettings", env=env, cwd=REPO, stdout=fd, stderr=fd
        )
    finally:
        os.close(fd)
    worker = Worker(proc, Path(log), redis)
    try:
        async with asyncio.timeout(_WAIT_S):
            while not await redis.exists(_HEALTH):
                worker.check()
                await asyncio.sleep(0.05)
            quiet_since = None
            while quiet_since is None or time.monotonic() - quiet_since < 1.0:
                worker.check()
                queued = await redis.zcard(_QUEUE)
                quiet_since = None if queued else (quiet_since or time.monotonic())
                await asyncio.sleep(0.1)
    except BaseException:
        await stop_worker(worker)
        raise
    return worker


async def stop_worker(worker: Worker) -> None:
    """SIGTERM, as a deployment stops it (arq finishes cleanly); SIGKILL if it has not exited within 10 s."""
    try:
        if worker.proc.returncode is None:
            worker.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await worker.proc.wait()
            except TimeoutError:
                print(f"bench: the worker did not stop on SIGTERM within 10 s; killing it\n{worker.log_tail()}")
                worker.proc.kill()
                await worker.proc.wait()
            if worker.proc.returncode != 0:
                print(f"bench: the worker exited with status {worker.proc.returncode}\n{worker.log_tail()}")
    finally:
        await worker.redis.aclose()
        worker.log.unlink(missing_ok=True)


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
            async with asyncio.timeout(_WAIT_S):
                # The summaries, then the jobs' records (written by arq just after each job returns).
                while await conn.fetchval(
                    "select count(*) from sessions where session_id = any($1) and summary is not null", ids
                ) < len(ids):
                    worker.check()
                    await asyncio.sleep(_POLL_S)
                jobs = await _job_results(worker, label, ids)
        except TimeoutError:
            raise RuntimeError(
                f"{label}: not every summary was stored within {_WAIT_S:g} s; the worker's log ends:\n"
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
    pattern = f"{_RESULT}summary:{label}-*"
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
        session_id = key.decode().removeprefix(f"{_RESULT}summary:").rsplit(":", 2)[0]
        jobs[session_id] = {
            "enqueued": result.enqueue_time.timestamp(),
            "started": result.start_time.timestamp(),
            "finished": result.finish_time.timestamp(),
        }
    if missing := set(ids) - jobs.keys():
        raise RuntimeError(f"no job record for {sorted(missing)[:5]}")
    return jobs


def add_summary_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--summary-sessions",
        default="1,50",
        help="sessions ending together, for the disconnect-to-summary runs ('' and --summary-jobs 0: no summaries)",
    )
    parser.add_argument(
        "--summary-jobs", type=int, default=200, help="sessions ending together, for the worker's jobs/s (0: none)"
    )
    parser.add_argument(
        "--summary-min-sessions",
        type=int,
        default=20,
        help="a summaries level smaller than this is run again (new sessions) until this many are measured",
    )
    parser.add_argument(
        "--summary-model-s",
        default="0",
        help="seconds the model takes for one summary (its first token after that, the rest at once); a list runs"
        " every level at each pace, e.g. 1,5",
    )
    parser.add_argument(
        "--worker-max-jobs", type=int, help="WORKER_MAX_JOBS for the worker (default: the worker's own, 200)"
    )


async def summary_runs(stack: Stack, redis_url: str, args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.summary_sessions.split(",") if x]
    if args.summary_jobs:
        levels.append(args.summary_jobs)
    paces = [float(x) for x in args.summary_model_s.split(",") if x] or [0.0]
    if not levels:
        return
    # Summaries of 20 tokens, streamed at once: what is left is the pipeline's own time.
    await stack.pace(tokens=20, ttft_s=0, gap_s=0)
    worker = await start_worker(stack, redis_url, max_jobs=args.worker_max_jobs)
    try:
        # Warm: the first job of a process pays one-time costs (the first upstream request, the first queries).
        await summaries(stack, worker, sessions=1, label="sumwarm")
        max_jobs = args.worker_max_jobs or "default"
        print(
            f"\nsummaries (one worker process, pid {worker.pid}, WORKER_MAX_JOBS {max_jobs}): from the client's close"
            " to the summary stored, minus the model's own time"
        )
        n = args.summary_min_sessions
        print(f"sessions closing together after one message each (a level under {n} runs in rounds until {n});")
        print("'enqueued', 'started': from the close to the server enqueueing the job, and to the worker starting it;")
        print("jobs/s: from the first job's start to the last one's end; CPU: the worker's per job ('-': too few);")
        print("model: the model's time per summary (the chat answers before the close take as long)")
        print(
            f"{'sessions':>9} {'stored p50':>12} {'stored p99':>12} {'enqueued p50':>13} {'started p50':>12}"
            f" {'jobs/s':>8} {'CPU/job':>10} {'model':>7}"
        )
        for pace_no, model_s in enumerate(paces):
            await stack.pace(tokens=20, ttft_s=model_s, gap_s=0)
            for run_no, level in enumerate(levels):
                r = await summaries(
                    stack,
                    worker,
                    sessions=level,
                    label=f"sum{pace_no}p{run_no}x{level}",
                    min_sessions=args.summary_min_sessions,
                )
                rate = "-" if math.isnan(r["jobs_per_s"]) else f"{r['jobs_per_s']:,.1f}"
                cpu = "-" if math.isnan(r["cpu_s_per_job"]) else fmt_ms(r["cpu_s_per_job"])
                print(
                    f"{level:>9} {fmt_ms(r['added_p50']):>12} {fmt_ms(r['added_p99']):>12}"
                    f" {fmt_ms(r['enqueued_p50']):>13} {fmt_ms(r['started_p50']):>12}"
                    f" {rate:>8} {cpu:>10} {model_s:>6g}s"
                )
    finally:
        await stop_worker(worker)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summaries", description="The summaries part of the bench.")
    add_summary_options(parser)
    args = parser.parse_args(argv)
    database_url = os.environ.get("DATABASE_URL") or os.environ["TEST_DATABASE_URL"]
    redis_url = os.environ.get("REDIS_URL") or os.environ["TEST_REDIS_URL"]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stack = await start_stack(database_url, redis_url)
    try:
        print(f"bench: {os.cpu_count()} cores, Python {sys.version.split()[0]}, server pid {stack.server.pid}")
        await summary_runs(stack, redis_url, args)
    finally:
        await stop_stack(stack)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
