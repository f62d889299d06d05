"""Several server processes on one machine: gunicorn's arbiter runs WEB_CONCURRENCY workers on one port, restarts
one that dies, and stops them all in order; each worker runs the app as `python -m server` runs it alone.

The workers are aiohttp's own gunicorn workers (aiohttp's documented deployment) with three changes: the app runs
in `serve.DrainingRunner`, so a stop drains the answers while the sockets are still read; the arbiter is told the
worker lives while it drains; and a second stop signal cuts the drain short, as it does for one process. The
arbiter passes a second SIGTERM or Ctrl-C on to the workers (gunicorn alone would swallow it), and the workers
ignore the terminal's own SIGINT, which reaches the whole process group: the arbiter's SIGTERM is the one that
counts. Each worker listens on a socket of its own (SO_REUSEPORT), so the kernel spreads new connections evenly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
from types import FrameType
from typing import Any

from aiohttp import web
from aiohttp.worker import GunicornUVLoopWebWorker, GunicornWebWorker
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from core.settings import Settings

from .app import create_app, tune_gc
from .keys import LIFECYCLE
from .serve import DrainingRunner, uses_uvloop

log = logging.getLogger(__name__)


def stop_grace_s(settings: Settings) -> int:
    """How long a graceful stop may take a worker (as scripts/run.sh counts it): the drain, the flush before the
    sockets close, aiohttp's wait for the handlers, the flush of the last writes, and 5 s to spare."""
    return math.ceil(settings.shutdown_drain_s + 2 * settings.shutdown_flush_s) + 10 + 5


class _ServerWorker(GunicornWebWorker):
    """aiohttp's worker running our app, our runner and our stop signals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop_signals = 0
        self._runner: web.AppRunner | None = None

    def load_wsgi(self) -> None:
        # A bound coroutine function: aiohttp's worker awaits it for the runner it then sets up and serves.
        self.wsgi = self._make_runner

    async def _make_runner(self) -> web.AppRunner:
        app = create_app(self.app.settings)
        app.on_startup.append(tune_gc)
        self._runner = DrainingRunner(app, handle_signals=False, shutdown_timeout=10)
        return self._runner

    async def _run(self) -> None:
        # aiohttp's worker notifies the arbiter only while it serves; the drain after a stop signal can take longer
        # than the arbiter's timeout, which would kill the worker mid-drain.
        heartbeat = asyncio.ensure_future(self._heartbeat())
        try:
            await super()._run()
        finally:
            heartbeat.cancel()

    async def _heartbeat(self) -> None:
        while True:
            self.notify()
            await asyncio.sleep(1.0)

    def init_signals(self) -> None:
        super().init_signals()
        # The terminal's Ctrl-C reaches every process of the group: the arbiter turns it into our SIGTERM.
        self.loop.add_signal_handler(signal.SIGINT, lambda: None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM: the first drains, a second stops at once."""
        self._stop_signals += 1
        if self._stop_signals == 1:
            self._stop()
        else:
            self._force()

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        """SIGQUIT (gunicorn's quick shutdown): stop at once."""
        self._stop_signals += 1
        self._stop()
        self._force()

    def _stop(self) -> None:
        log.info("shutting down: finishing the answers in flight; a second signal stops at once", extra={"fields": {}})
        self.alive = False
        self._notify_waiter_done()

    def _force(self) -> None:
        if self._runner is not None and LIFECYCLE in self._runner.app:
            log.warning("shutting down at once: what is not stored yet goes to the spool", extra={"fields": {}})
            self._runner.app[LIFECYCLE].force()


class ServerWorker(_ServerWorker):
    """The worker on asyncio's own event loop."""


class UVLoopServerWorker(_ServerWorker, GunicornUVLoopWebWorker):
    """The worker on uvloop."""


class _Arbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter; the first SIGINT stops gracefully as SIGTERM does, and a second one of either reaches the
    workers, which then stop at once."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self._stopping = False

    def signal(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGINT, signal.SIGTERM):
            if self._stopping:
                for pid in list(self.WORKERS):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGTERM)
                return
            self._stopping = True
            sig = signal.SIGTERM
        super().signal(sig, frame)


class ServerProcesses(BaseApplication):  # type: ignore[misc]
    """`python -m server` with WEB_CONCURRENCY above 1: gunicorn configured from our settings, no config file."""

    def __init__(self, settings: Settings, *, processes: int) -> None:
        self.settings = settings
        self._processes = processes
        super().__init__()

    def load_config(self) -> None:
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        worker = UVLoopServerWorker if uses_uvloop(self.settings) else ServerWorker
        options = {
            "bind": [f"{host}:{self.settings.port}"],
            "workers": self._processes,
            "worker_class": worker,
            "reuse_port": True,
            # The arbiter waits this long for the workers' graceful stop before it kills them.
            "graceful_timeout": stop_grace_s(self.settings),
            # A worker whose event loop does not come round for this long is killed and replaced.
            "timeout": 30,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": self.settings.log_level.lower(),
            "proc_name": "realtime-server",
        }
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn 25's control socket sits at one path per user: several servers on one machine would fight.
            options["control_socket_disable"] = True
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> None:
        return None  # the workers build the app themselves (ServerWorker.load_wsgi)

    def run(self) -> None:
        _Arbiter(self).run()


def run(settings: Settings, *, processes: int) -> None:
    ServerProcesses(settings, processes=processes).run()
