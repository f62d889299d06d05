"""The worker process under test: a real `arq worker.WorkerSettings` (as in the Dockerfile and docker-compose.yml)
on the stack's database, Redis and upstream, started and stopped as a deployment does."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from .stack import REPO, Stack

WAIT_S = 120.0
# Keys of the worker's queue in Redis (arq's defaults; worker/settings.py sets no queue name).
_QUEUE = "arq:queue"
_HEALTH = "arq:queue:health-check"
RESULT_PREFIX = "arq:result:"


@dataclass
class Worker:
    """A worker process under test, the file its log goes to, and a Redis client on its queue."""

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


async def start_worker(stack: Stack, *, max_jobs: int | None = None) -> Worker:
    """A worker process on the stack's database, Redis and upstream; returns once it polls its queue and the queue
    has stayed empty for a second (what its start-up sweep finds of earlier runs is not measured)."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": stack.redis_url,
        "OPENAI_BASE_URL": f"{stack.upstream_url}/v1",
        "OPENAI_API_KEY": "bench",
        "OPENAI_MODEL": "bench",
        "SUMMARY_DELAY_S": "0",
        "LOG_LEVEL": "WARNING",
        "WORKER_METRICS_PORT": "0",
    }
    if max_jobs is not None:
        env["WORKER_MAX_JOBS"] = str(max_jobs)
    redis = Redis.from_url(stack.redis_url)
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
        async with asyncio.timeout(WAIT_S):
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
