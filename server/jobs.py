"""The background jobs the server asks for, by name: it enqueues them on arq and never imports the worker."""

from __future__ import annotations

import logging
from typing import Final

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from .metrics import Metrics

log = logging.getLogger(__name__)

SUMMARIZE_JOB: Final = "summarize_session"
SWEEP_JOB: Final = "sweep_sessions"
HELD_PREFIX: Final = "rt:held:"


def summary_job_id(session_id: str, last_event_id: int) -> str:
    """One job per state of a session: enqueueing the same state twice is a no-op in arq."""
    return f"summary:{session_id}:{last_event_id}"


def held_key(session_id: str) -> str:
    """The Redis key that says a live server holds the session (see server/presence.py)."""
    return HELD_PREFIX + session_id


async def enqueue_summary(
    redis: ArqRedis, metrics: Metrics, session_id: str, last_event_id: int, *, delay_s: float
) -> bool:
    """Ask the worker to summarise the session as of `last_event_id`. False when Redis could not take the job:
    the worker's sweeper finds the session later, so the caller carries on."""
    try:
        await redis.enqueue_job(
            SUMMARIZE_JOB,
            session_id,
            _job_id=summary_job_id(session_id, last_event_id),
            _defer_by=delay_s or None,
        )
    except (RedisError, OSError) as e:
        metrics.summary_enqueue_failures.inc()
        log.warning("summary job not enqueued", extra={"fields": {"session_id": session_id, "error": str(e)}})
        return False
    metrics.summary_jobs_enqueued.inc()
    log.info("summary job enqueued", extra={"fields": {"session_id": session_id, "last_event_id": last_event_id}})
    return True
