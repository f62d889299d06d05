"""The arq worker: post-session summaries and the sweeper. Run it with `arq worker.WorkerSettings`."""

from __future__ import annotations

import logging
from typing import Any


def __getattr__(name: str) -> Any:
    # Built on first use, not at import: reading the environment is the entry point's job, and a bad
    # value must stop the worker with one line, not a traceback.
    if name != "WorkerSettings":
        raise AttributeError(name)
    from core.logs import setup_logging
    from core.settings import load_settings

    from .settings import build_worker_settings

    settings = load_settings()
    setup_logging(level=settings.log_level, fmt=settings.log_format)
    # arq's command line gives its logger a handler of its own after this import; without this its
    # lines would print twice.
    logging.getLogger("arq").propagate = False
    _run_our_worker_class()
    worker_settings = build_worker_settings(settings)
    globals()["WorkerSettings"] = worker_settings
    return worker_settings


def _run_our_worker_class() -> None:
    # arq's command line builds `arq.worker.Worker` from WorkerSettings and has no option for another class: point
    # it at ours, which rides out Redis outages instead of exiting (worker/runner.py).
    import arq.worker

    from .runner import Worker

    arq.worker.Worker = Worker  # type: ignore[misc]
