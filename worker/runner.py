"""Our arq `Worker`: it rides out a Redis outage of any length instead of exiting, and logs arq's lines as ours.

arq 0.28's `Worker.main` lets any Redis error of its poll loop (the queue read, a job's bookkeeping, the heartbeat,
the cron enqueue) escape, and `run()` then calls `close()`, which talks to Redis again and raises a second
`ConnectionError`: the process is gone after the first poll of an outage. Here the loop waits for Redis with
backoff, logs once per outage, and goes on polling when Redis is back; `close()` does what it can without Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import arq.worker
from arq.connections import create_pool, log_redis_info
from arq.utils import poll
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

log = logging.getLogger(__name__)

# Waits between tries while Redis is away: quick at first (a restart takes a second), then every 2 s at most.
_BACKOFF = wait_exponential_jitter(multiplier=0.1, max=2.0, jitter=0.5)
_REDIS_DOWN = (RedisError, OSError)
# Without Redis, `close()` gives up on its own Redis commands after this long.
_CLOSE_REDIS_S = 2.0


class Worker(arq.worker.Worker):
    """`arq.worker.Worker` that survives Redis outages; `arq worker.WorkerSettings` and the tests build this one."""

    # No __init__ of ours: arq's command line reads the Worker options off `arq.worker.Worker`'s signature.
    _outage_since: float | None = None

    async def main(self) -> None:
        adopt_arq_logging()
        if self._pool is None:
            await self._wait_for_redis(self._connect)
        logger = arq.worker.logger
        logger.info("Starting worker for %d functions: %s", len(self.functions), ", ".join(self.functions))
        await self._wait_for_redis(lambda: log_redis_info(self.pool, logger.info))
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)

        async for _ in poll(self.poll_delay_s):
            try:
                await self._poll_iteration()
                if self.burst and await self._burst_done():
                    return
            except _REDIS_DOWN as e:
                await self._wait_for_redis(self.pool.ping, error=e)

    async def _burst_done(self) -> bool:
        # arq's own end of a burst run (`Worker.main`), unchanged.
        if 0 <= self.max_burst_jobs <= self._jobs_started() or await self.pool.zcard(self.queue_name) == 0:
            await asyncio.gather(*self.tasks.values())
            return True
        return False

    async def _connect(self) -> None:
        assert self.redis_settings is not None
        # Our backoff instead of arq's fixed retries (which log every try and then give up).
        self._pool = await create_pool(
            dataclasses.replace(self.redis_settings, conn_retries=0),
            job_deserializer=self.job_deserializer,
            job_serializer=self.job_serializer,
            default_queue_name=self.queue_name,
            expires_extra_ms=self.expires_extra_ms,
        )

    async def _wait_for_redis(
        self, attempt_fn: Callable[[], Awaitable[Any]], *, error: BaseException | None = None
    ) -> None:
        """Call `attempt_fn` until Redis answers it; one warning when an outage starts, one line when it ends."""
        if error is not None:
            self._outage_started(error)
        async for attempt in AsyncRetrying(
            wait=_BACKOFF, retry=retry_if_exception_type(_REDIS_DOWN), before_sleep=self._before_sleep, reraise=True
        ):
            with attempt:
                await attempt_fn()
        if self._outage_since is not None:
            down_s = time.monotonic() - self._outage_since
            self._outage_since = None
            # Redis may have come back empty: write the heartbeat now, not at the next interval.
            self._last_health_check = 0
            log.info("redis is back, polling again", extra={"fields": {"down_s": round(down_s, 1)}})

    def _before_sleep(self, state: Any) -> None:
        outcome = state.outcome
        if outcome is not None and outcome.failed:
            self._outage_started(outcome.exception())

    def _outage_started(self, error: BaseException | None) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        running = sum(not t.done() for t in self.tasks.values())
        fields = {"error": str(error) or type(error).__name__, "jobs_running": running}
        log.warning("redis is unreachable; waiting for it", extra={"fields": fields})

    async def close(self) -> None:
        # arq's `close()`, minus its assumptions that Redis answers and that every job task ended cleanly.
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        with contextlib.suppress(*_REDIS_DOWN, TimeoutError):
            await asyncio.wait_for(self.pool.delete(self.health_check_key), _CLOSE_REDIS_S)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(*_REDIS_DOWN):
            await self.pool.aclose(close_connection_pool=True)
        self._pool = None


_CHATTER = ("recording health", "%6.2fs → ", "%6.2fs ← ")


class _ChatterToDebug(logging.Filter):
    """arq logs every job start and end, every cron run and heartbeat changes (`j_complete=… j_failed=…`) at INFO;
    ours is the one line per job at INFO. Those records become DEBUG (shown with LOG_LEVEL=DEBUG or `arq -v`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and isinstance(record.msg, str) and record.msg.startswith(_CHATTER):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def adopt_arq_logging() -> None:
    """arq's lines go out as ours: one format (core/logs.py, text or JSON) for the server and the worker.

    `arq worker.WorkerSettings` configures logging after it imports the settings: it gives the `arq` logger a
    handler of its own (`18:41:19: message`, local time, no level) at INFO, whatever LOG_LEVEL says. Called when
    the worker starts, after that: arq's handler goes, its records reach our handler on the root logger, and
    LOG_LEVEL applies to them (`arq -v` still turns arq's DEBUG lines on)."""
    logger = logging.getLogger("arq")
    verbose = logger.level == logging.DEBUG
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.DEBUG if verbose else logging.NOTSET)
    worker_logger = arq.worker.logger
    if not any(isinstance(f, _ChatterToDebug) for f in worker_logger.filters):
        worker_logger.addFilter(_ChatterToDebug())
