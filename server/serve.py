"""Running the app in one process, with a shutdown order of our own: stop listening, drain while the sockets are
still read, then let aiohttp close everything. A second stop signal cuts the drain short (the spool keeps what
was not written)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web

from core.errors import ConfigError
from core.settings import Settings

from .keys import LIFECYCLE, SETTINGS

log = logging.getLogger(__name__)


class DrainingRunner(web.AppRunner):
    """aiohttp's cleanup stops every request handler from reading (`Server.pre_shutdown`) before `on_shutdown`
    runs: frames sent during the drain would be silently dropped. This runner drains first."""

    async def cleanup(self) -> None:
        for site in list(self.sites):
            await site.stop()
        settings = self.app[SETTINGS]
        if LIFECYCLE in self.app:
            await self.app[LIFECYCLE].wind_down(drain_s=settings.shutdown_drain_s, flush_s=settings.shutdown_flush_s)
        await super().cleanup()


def process_count(settings: Settings) -> int:
    """WEB_CONCURRENCY, where 0 means one process per core this process may run on (its CPU affinity)."""
    if settings.web_concurrency:
        return settings.web_concurrency
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def uses_uvloop(settings: Settings) -> bool:
    """EVENT_LOOP: `auto` takes uvloop where it is installed (a dependency on Linux), `asyncio` never does."""
    installed = importlib.util.find_spec("uvloop") is not None
    if settings.event_loop == "uvloop" and not installed:
        raise ConfigError("EVENT_LOOP='uvloop': uvloop is not installed")
    return settings.event_loop != "asyncio" and installed


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not uses_uvloop(settings):
        return None
    import uvloop

    return uvloop.new_event_loop


def run(app: web.Application, *, host: str, port: int) -> None:
    with asyncio.Runner(loop_factory=loop_factory(app[SETTINGS])) as runner:
        runner.run(_serve(app, host=host, port=port))


async def _serve(app: web.Application, *, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info(
                "shutting down: finishing the answers in flight; a second signal stops at once", extra={"fields": {}}
            )
            stop.set()
        elif LIFECYCLE in app:
            log.warning("shutting down at once: what is not stored yet goes to the spool", extra={"fields": {}})
            app[LIFECYCLE].force()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    runner = DrainingRunner(app, handle_signals=False, shutdown_timeout=10)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
