"""The process's event log: one committer for every session's writer, the spool behind it, and the watch that
moves writes to the spool when the store stays away."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from core.settings import Settings
from core.store import Store

from ..metrics import Metrics
from .spool import Spool
from .writer import Committer, EventWriter

log = logging.getLogger(__name__)


class EventLog:
    """Hands each session an ordered writer, and keeps every accepted event until it is stored or spooled."""

    def __init__(self, store: Store, metrics: Metrics, settings: Settings) -> None:
        self._settings = settings
        self.spool = Spool(settings.spool_dir, store, metrics, retry_max_s=settings.store_retry_max_s)
        self._committer = Committer(store, metrics, max_backoff_s=settings.store_retry_max_s, gate=self.spool.clear)
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Replay what an earlier run spooled, and start watching for writes the store does not take."""
        self.spool.open()
        self._watch = asyncio.create_task(self._watch_writes(), name="spool-watch")

    def writer(self) -> EventWriter:
        return self._committer.writer()

    async def replayed(self, *, within_s: float) -> bool:
        """Wait until no spooled event waits to be replayed (a read before then would miss them)."""
        try:
            async with asyncio.timeout(within_s):
                await self.spool.clear.wait()
        except TimeoutError:
            return False
        return True

    async def spill(self, reason: str) -> bool:
        """Move every pending write to the spool, in order; False (and nothing moved) if the disk refused."""
        taken = await self._committer.take_all()
        if await self.spool.spill([item for items in taken.values() for item in items], reason=reason):
            return True
        for writer, items in taken.items():
            writer.restore(items)
        return False

    async def close(self) -> None:
        """Process shutdown, after the writers had their time: spool what is still pending for the next start."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if not await self.spill("shutdown"):
            lost = [item for items in (await self._committer.take_all()).values() for item in items]
            for _, future in lost:
                future.cancel()
            log.error("events not stored at shutdown", extra={"fields": {"events": len(lost)}})
        await self._committer.close()
        await self.spool.close()

    async def _watch_writes(self) -> None:
        """Spill when a write has waited SPOOL_AFTER_S or SPOOL_MAX_PENDING events pile up in memory."""
        limit_s, limit_events = self._settings.spool_after_s, self._settings.spool_max_pending
        while True:
            await asyncio.sleep(min(1.0, limit_s / 4))
            oldest = self._committer.oldest_pending()
            if oldest is None:
                continue
            waited_s = (datetime.now(UTC) - oldest).total_seconds()
            if waited_s >= limit_s or self._committer.pending >= limit_events:
                # The store is away, or not keeping up (a connect storm on a small pool): either way the writes
                # wait on disk, not in memory.
                pending = self._committer.pending
                reason = f"a write waited {waited_s:.1f} s" if waited_s >= limit_s else f"{pending} writes pending"
                await self.spill(reason)
