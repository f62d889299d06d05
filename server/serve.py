"""Running the app in this process, with a shutdown order of our own: stop listening, drain while the sockets are
still read, then let aiohttp close everything. A second stop signal cuts the drain short (the spool keeps what
was not written)."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

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


def run(app: web.Application, *, host: str, port: int) -> None:
    asyncio.run(_serve(app, host=host, port=port))


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
