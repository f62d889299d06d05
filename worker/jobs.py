"""The worker's jobs: summarise one session, and sweep for sessions that ended without an up-to-date summary."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from arq import Retry
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from core.errors import LLMError, StoreError
from core.jobs import JobQueue, held_key, summary_job_id
from core.llm import LLM, make_llm
from core.settings import Settings
from core.store import MESSAGE_TYPES, Store, open_store

from .metrics import WorkerMetrics
from .summarize import summarize

log = logging.getLogger(__name__)


class SummaryFailed(Exception):
    """A summary could not be made within the allowed tries; the session is left for the sweeper or the CLI."""


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["metrics"] = metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        metrics.serve(host=settings.host, port=settings.worker_metrics_port)
    # The sweeper's enqueue path, the server's and the CLI's: one JobQueue, counted on this worker's metrics.
    ctx["jobs"] = JobQueue(ctx["redis"], registry=metrics.registry)
    ctx["store"] = await open_store(settings)
    ctx["llm"] = make_llm(settings)
    log.info(
        "worker ready",
        extra={"fields": {"store": ctx["store"].name, "model": ctx["llm"].model, "redis": settings.redis_url}},
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    if "metrics" in ctx:
        await ctx["metrics"].close()
    if "llm" in ctx:
        await ctx["llm"].close()
    if "store" in ctx:
        await ctx["store"].close()


async def summarize_session(ctx: dict[str, Any], session_id: str, *, force: bool = False) -> dict[str, Any]:
    """Summarise the session as it is now. Idempotent: a state already summarised is left alone (unless `force`),
    and a session that is live again is left for its next disconnect."""
    settings: Settings = ctx["settings"]
    store: Store = ctx["store"]
    llm: LLM = ctx["llm"]
    started = time.perf_counter()
    fields: dict[str, Any] = {"session_id": session_id, "try": ctx.get("job_try", 1)}
    try:
        state = await store.summary_state(session_id)
        if state is None:
            return _done("unknown session", fields, ctx)
        if state.last_message_id is None:
            return _done("no events", fields, ctx)
        if state.end_time is None and await _held(ctx["redis"], session_id):
            return _done("session is live", fields, ctx)
        if state.up_to_date and not force:
            return _done("up to date", fields, ctx)
        events = await store.events(session_id, types=MESSAGE_TYPES, after=0)
        summary = await summarize(llm, events, settings)
        end_time = state.end_time or state.last_message_at or datetime.now(UTC)
        saved = await store.save_summary(
            session_id, summary=summary, through_event_id=state.last_message_id, end_time=end_time
        )
    except (LLMError, StoreError) as e:
        _retry_or_fail(ctx, settings, fields, e)
    elapsed = time.perf_counter() - started
    ctx["metrics"].summary_seconds.observe(elapsed)
    fields.update(through_event_id=state.last_message_id, latency_ms=round(elapsed * 1000, 1))
    return _done("summarised" if saved else "a newer summary exists", fields, ctx)


def _retry_or_fail(ctx: dict[str, Any], settings: Settings, fields: dict[str, Any], error: Exception) -> NoReturn:
    tries = int(ctx.get("job_try", 1))
    fields["error"] = str(error)
    if tries >= settings.summary_max_tries:
        ctx["metrics"].failures.inc()
        log.error("summary failed, giving up", extra={"fields": fields})
        raise SummaryFailed(f"no summary after {tries} tries: {error}") from error
    delay = settings.summary_retry_base_s * 2 ** (tries - 1)
    fields["retry_in_s"] = delay
    ctx["metrics"].retries.inc()
    log.warning("summary failed, will retry", extra={"fields": fields})
    raise Retry(defer=delay) from error


def _done(outcome: str, fields: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    ctx["metrics"].jobs.labels(outcome).inc()
    log.info("summary job done", extra={"fields": {**fields, "outcome": outcome}})
    return {"session_id": fields["session_id"], "outcome": outcome}


async def _held(redis: ArqRedis, session_id: str) -> bool:
    """Whether a live server holds the session. When Redis cannot tell, assume it does: never end a live session."""
    try:
        return bool(await redis.exists(held_key(session_id)))
    except (RedisError, OSError):
        return True


async def sweep_sessions(ctx: dict[str, Any]) -> dict[str, int]:
    """Find sessions that ended without an up-to-date summary, and sessions whose server died (no end time, no
    live holder: the server's presence key has expired, and quiet for SESSION_STALE_S); end the latter, and
    enqueue a summary job for each. Runs every 15 s (worker/settings.py)."""
    settings: Settings = ctx["settings"]
    store: Store = ctx["store"]
    redis: ArqRedis = ctx["redis"]
    jobs: JobQueue = ctx["jobs"]
    stale_before = datetime.now(UTC) - timedelta(seconds=settings.session_stale_s)
    candidates = await store.sessions_needing_summary(stale_before=stale_before, limit=settings.sweep_batch)
    ended = enqueued = 0
    for state in candidates:
        if state.last_message_id is None:
            continue
        if state.end_time is None:
            if await _held(redis, state.session_id):
                continue
            await store.end_session(state.session_id, end_time=state.last_message_at or datetime.now(UTC))
            ctx["metrics"].swept.labels("ended").inc()
            ended += 1
        job_id = summary_job_id(state.session_id, start_time=state.start_time, last_message_id=state.last_message_id)
        if await jobs.summary(state.session_id, job_id=job_id, source="sweep") is not None:
            ctx["metrics"].swept.labels("enqueued").inc()
            enqueued += 1
    result = {"candidates": len(candidates), "ended": ended, "enqueued": enqueued}
    # Held sessions stay candidates while they are quiet: a sweep that only skipped them is not news.
    log.log(logging.INFO if ended or enqueued else logging.DEBUG, "sweep done", extra={"fields": result})
    return result
