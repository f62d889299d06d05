"""The worker's jobs as the server and the CLI ask for them: names, ids, and the one enqueue path.

The server enqueues by name and never imports the worker (arq's own advice); the worker registers its
functions under these names.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Final

import orjson
from arq.connections import ArqRedis
from arq.jobs import Job
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError

from . import telemetry

log = logging.getLogger(__name__)

SUMMARIZE_JOB: Final = "summarize_session"
SWEEP_JOB: Final = "sweep_sessions"
RECOVER_JOB: Final = "recover_answers"
COMPACT_JOB: Final = "compact_context"
# `rt:held:{<session_id>}`: hash-tagged on the session, as its other keys (core/livestream.py), for a Redis Cluster.
HELD_PREFIX: Final = "rt:held:"
# Where the worker announces each new context summary, so the server that holds the session uses it at once.
CONTEXT_CHANNEL: Final = "rt:context"


def summary_job_id(session_id: str, *, start_time: datetime | None, last_message_id: int) -> str:
    """One job per state of a session, so enqueueing the same state twice is a no-op in arq.

    The session's start time is part of the id: arq keeps a job's result for a while, and a session of the
    same id and last message in another database (a reset, a second deployment on one Redis) must not be
    taken for one already summarised.
    """
    started = "-" if start_time is None else str(int(start_time.timestamp() * 1_000_000))
    return f"summary:{session_id}:{started}:{last_message_id}"


def compact_job_id(session_id: str, *, through: int) -> str:
    """One compaction per session and cursor: asking again for the same one is a no-op in arq."""
    return f"compact:{session_id}:{through}"


@dataclass(frozen=True, slots=True)
class ContextSummary:
    """A context summary as announced on CONTEXT_CHANNEL: the stored event and what it covers."""

    session_id: str
    event_id: int
    through: int
    tokens: int
    text: str

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes | str) -> ContextSummary:
        """Raises ValueError (or TypeError) for a message that is not one."""
        fields = orjson.loads(data)
        return cls(
            session_id=str(fields["session_id"]),
            event_id=int(fields["event_id"]),
            through=int(fields["through"]),
            tokens=int(fields["tokens"]),
            text=str(fields["text"]),
        )


def held_key(session_id: str) -> str:
    """The Redis key that says a live server holds the session (see server/live/presence.py)."""
    return f"{HELD_PREFIX}{{{session_id}}}"


class JobQueue:
    """Hands jobs to arq. A Redis that cannot take one is logged and counted, never raised: the worker's
    sweeper finds every session whose summary is missing, so the caller carries on."""

    def __init__(self, redis: ArqRedis, *, registry: CollectorRegistry | None = None) -> None:
        self._redis = redis
        self.enqueued = Counter("rt_summary_jobs_enqueued_total", "Summary jobs handed to the queue", registry=registry)
        self.failures = Counter(
            "rt_summary_enqueue_failures_total",
            "Summary jobs Redis could not take (the sweeper catches up)",
            registry=registry,
        )

    async def summary(
        self,
        session_id: str,
        *,
        job_id: str,
        delay_s: float = 0.0,
        force: bool = False,
        trace: dict[str, str] | None = None,
        **fields: Any,
    ) -> Job | None:
        """Ask the worker to summarise the session; the Job, or None when Redis refused it or a job of that id
        exists already (that state is summarised or about to be)."""
        kwargs: dict[str, Any] = {"force": True} if force else {}
        if trace:
            # The session's trace context: the worker's span for the job is a child in that trace.
            kwargs["trace"] = trace
        try:
            job = await self._redis.enqueue_job(
                SUMMARIZE_JOB, session_id, **kwargs, _job_id=job_id, _defer_by=delay_s or None
            )
        except (RedisError, OSError) as e:
            self.failures.inc()
            log.warning("summary job not enqueued", extra={"fields": {"session_id": session_id, "error": str(e)}})
            return None
        if job is not None:
            self.enqueued.inc()
            log.info("summary job enqueued", extra={"fields": {"session_id": session_id, "job_id": job_id, **fields}})
        return job

    async def compact(self, session_id: str, *, through: int, tokens: int) -> Job | None:
        """Ask the worker for a new context summary covering the session's messages up to `through`; the Job, or
        None when Redis refused it or that compaction is already asked for. Never raises."""
        job_id = compact_job_id(session_id, through=through)
        try:
            trace = telemetry.inject()
            kwargs: dict[str, Any] = {"trace": trace} if trace else {}
            job = await self._redis.enqueue_job(COMPACT_JOB, session_id, through, **kwargs, _job_id=job_id)
        except (RedisError, OSError) as e:
            log.warning("compaction not enqueued", extra={"fields": {"session_id": session_id, "error": str(e)}})
            return None
        if job is not None:
            fields = {"session_id": session_id, "through": through, "tokens": tokens}
            log.info("compaction enqueued", extra={"fields": fields})
        return job
