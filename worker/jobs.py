"""The worker's jobs: summarise one session, and sweep for sessions that ended without an up-to-date summary."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from arq import Retry
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from core import telemetry
from core.errors import LLMError, StoreError
from core.jobs import (
    COMPACT_JOB,
    CONTEXT_CHANNEL,
    SUMMARIZE_JOB,
    ContextSummary,
    JobQueue,
    held_key,
    summary_job_id,
)
from core.llm import LLM, make_llm
from core.llm.tokens import estimate
from core.settings import Settings
from core.store import CONTEXT_SUMMARY, MESSAGE_TYPES, NewEvent, Store, StoredEvent, open_store

from .compact import compact
from .metrics import WorkerMetrics
from .summarize import summarize

log = logging.getLogger(__name__)


class SummaryFailed(Exception):
    """A summary could not be made within the allowed tries; the session is left for the sweeper or the CLI."""


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    telemetry.setup("realtime-ai-worker")
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
    # Export the spans still buffered (it blocks: not on the event loop).
    await asyncio.to_thread(telemetry.shutdown)
    if "metrics" in ctx:
        await ctx["metrics"].close()
    if "llm" in ctx:
        await ctx["llm"].close()
    if "store" in ctx:
        await ctx["store"].close()


async def summarize_session(
    ctx: dict[str, Any], session_id: str, *, force: bool = False, trace: dict[str, str] | None = None
) -> dict[str, Any]:
    """Summarise the session as it is now. Idempotent: a state already summarised is left alone (unless `force`),
    and a session that is live again is left for its next disconnect. `trace`: the session's trace context."""
    with telemetry.span(SUMMARIZE_JOB, kind="CONSUMER", carrier=trace, attributes=_job_attributes(ctx, session_id)):
        return await _summarize_session(ctx, session_id, force=force)


async def _summarize_session(ctx: dict[str, Any], session_id: str, *, force: bool) -> dict[str, Any]:
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
        # A long session's context summary already holds its beginning: start from it.
        earlier = await _last_context_summary(store, session_id)
        after = 0 if earlier is None else _through(earlier)
        events = await store.events(session_id, types=MESSAGE_TYPES, after=after)
        summary = await summarize(llm, events, settings, earlier=None if earlier is None else earlier.content)
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


async def compact_context(
    ctx: dict[str, Any], session_id: str, through: int, *, trace: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write the session's next context summary: the previous one folded with its messages up to `through`; store
    it as a `context_summary` event and announce it to the servers. Idempotent: a cursor already covered is only
    announced again (the server that asked may have missed it). `trace`: the asking turn's trace context."""
    attributes = {**_job_attributes(ctx, session_id), "rt.compact.through": through}
    with telemetry.span(COMPACT_JOB, kind="CONSUMER", carrier=trace, attributes=attributes):
        return await _compact_context(ctx, session_id, through)


def _job_attributes(ctx: dict[str, Any], session_id: str) -> dict[str, Any]:
    return {"session.id": session_id, "messaging.system": "arq", "rt.job.try": int(ctx.get("job_try", 1))}


async def _compact_context(ctx: dict[str, Any], session_id: str, through: int) -> dict[str, Any]:
    settings: Settings = ctx["settings"]
    store: Store = ctx["store"]
    started = time.perf_counter()
    fields: dict[str, Any] = {"session_id": session_id, "through": through, "try": ctx.get("job_try", 1)}
    try:
        previous = await _last_context_summary(store, session_id)
        if previous is not None and _through(previous) >= through:
            await _announce(ctx, session_id, previous)
            return _compacted("already covered", fields, ctx)
        after = 0 if previous is None else _through(previous)
        events = [e for e in await store.events(session_id, types=MESSAGE_TYPES, after=after) if e.id <= through]
        if not events:
            return _compacted("no messages", fields, ctx)
        text, tokens = await compact(ctx["llm"], None if previous is None else previous.content, events, settings)
        # A job that ran beside this one (asked again after a timeout) may have covered more meanwhile.
        latest = await _last_context_summary(store, session_id)
        if latest is not None and _through(latest) >= through:
            await _announce(ctx, session_id, latest)
            return _compacted("a newer summary exists", fields, ctx)
        meta = {
            "through": through,
            "tokens": tokens if tokens is not None else estimate(text),
            "tokens_counted_by": "provider" if tokens is not None else "estimate",
            "previous_through": after,
            "messages": len(events),
            "model": ctx["llm"].model,
        }
        [event_id] = await store.append_events(
            [
                NewEvent(
                    session_id=session_id,
                    event_type=CONTEXT_SUMMARY,
                    content=text,
                    event_key=f"context_summary:{through}",
                    created_at=datetime.now(UTC),
                    metadata=meta,
                )
            ]
        )
    except (LLMError, StoreError) as e:
        _retry_or_fail(ctx, settings, fields, e, what="compaction")
    await _publish(ctx, ContextSummary(session_id, event_id, through, meta["tokens"], text))
    fields.update(
        tokens=meta["tokens"], messages=len(events), latency_ms=round((time.perf_counter() - started) * 1000, 1)
    )
    return _compacted("compacted", fields, ctx)


async def _last_context_summary(store: Store, session_id: str) -> StoredEvent | None:
    found = await store.events(session_id, types=(CONTEXT_SUMMARY,), limit=1)
    return found[0] if found else None


def _through(summary: StoredEvent) -> int:
    return int(summary.metadata.get("through", 0))


async def _announce(ctx: dict[str, Any], session_id: str, summary: StoredEvent) -> None:
    tokens = summary.metadata.get("tokens")
    text = summary.content or ""
    tokens = tokens if isinstance(tokens, int) else estimate(text)
    await _publish(ctx, ContextSummary(session_id, summary.id, _through(summary), tokens, text))


async def _publish(ctx: dict[str, Any], summary: ContextSummary) -> None:
    """Tell the servers. Lost (Redis away), the server asks again later, or rereads the store at the next connect."""
    try:
        await ctx["redis"].publish(CONTEXT_CHANNEL, summary.encode())
    except (RedisError, OSError) as e:
        log.warning(
            "context summary not announced", extra={"fields": {"session_id": summary.session_id, "error": str(e)}}
        )


def _compacted(outcome: str, fields: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    ctx["metrics"].compactions.labels(outcome).inc()
    log.info("compaction job done", extra={"fields": {**fields, "outcome": outcome}})
    return {"session_id": fields["session_id"], "outcome": outcome}


def _retry_or_fail(
    ctx: dict[str, Any], settings: Settings, fields: dict[str, Any], error: Exception, *, what: str = "summary"
) -> NoReturn:
    tries = int(ctx.get("job_try", 1))
    fields["error"] = str(error)
    if tries >= settings.summary_max_tries:
        ctx["metrics"].failures.inc()
        log.error(f"{what} failed, giving up", extra={"fields": fields})
        raise SummaryFailed(f"no {what} after {tries} tries: {error}") from error
    delay = settings.summary_retry_base_s * 2 ** (tries - 1)
    fields["retry_in_s"] = delay
    ctx["metrics"].retries.inc()
    log.warning(f"{what} failed, will retry", extra={"fields": fields})
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
