"""The arq worker's configuration, built from the service's one `Settings` object."""

from __future__ import annotations

from typing import Any

from arq import cron, func
from arq.connections import RedisSettings

from core.jobs import COMPACT_JOB, RECOVER_JOB, SUMMARIZE_JOB, SWEEP_JOB
from core.settings import Settings

from .jobs import compact_context, shutdown, startup, summarize_session, sweep_sessions
from .recovery import recover_answers


def worker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `worker.runner.Worker`: the tests build workers from this, `arq worker.WorkerSettings`
    too."""
    return {
        "functions": [
            func(
                summarize_session,
                name=SUMMARIZE_JOB,
                max_tries=settings.summary_max_tries,
                timeout=settings.summary_job_timeout_s,
            ),
            func(
                compact_context,
                name=COMPACT_JOB,
                max_tries=settings.summary_max_tries,
                timeout=settings.summary_job_timeout_s,
            ),
            # Also callable on demand, e.g. right after an outage.
            func(sweep_sessions, name=SWEEP_JOB, max_tries=1, timeout=settings.summary_job_timeout_s),
            func(recover_answers, name=RECOVER_JOB, max_tries=1, timeout=settings.summary_job_timeout_s),
        ],
        # Every 15 s, on every worker; `unique` lets only one of them run each round. Often enough that a session of
        # a dead server is ended and summarised within about a minute (SESSION_STALE_S of quiet, then one round).
        "cron_jobs": [
            cron(
                sweep_sessions,
                name="sweep_sessions_cron",
                second={0, 15, 30, 45},
                run_at_startup=True,
                unique=True,
            ),
            # Every 5 s: an answer whose server died (its lease gone) is stored within ANSWER_LEASE_S + 5 s.
            cron(recover_answers, name="recover_answers_cron", second=set(range(0, 60, 5)), unique=True),
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "ctx": {"settings": settings},
        "job_timeout": settings.summary_job_timeout_s,
        "max_tries": settings.summary_max_tries,
        # Jobs at once in one worker process: a summary mostly waits on the model, so many fit in one event loop.
        "max_jobs": settings.worker_max_jobs,
        # arq looks for new jobs every 0.5 s by default: most of the wait between a session's end and its summary
        # (bench/RESULTS.md). A poll is one cheap Redis command.
        "poll_delay": 0.05,
        # `arq --check worker.WorkerSettings` (the container's health check) reads this heartbeat.
        "health_check_interval": 30,
    }


def build_worker_settings(settings: Settings) -> type:
    """A `WorkerSettings` class as arq's command line expects: a plain class whose attributes are Worker options."""
    return type("WorkerSettings", (), worker_options(settings))
