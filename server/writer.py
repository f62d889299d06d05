"""Writes one session's events to the store in order, in batches, retrying until they are committed."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime

from .errors import StoreError, StoreUnavailable
from .metrics import Metrics
from .store import NewEvent, Store

log = logging.getLogger(__name__)

MAX_BATCH = 200


class EventWriter:
    """An ordered, batching write-behind queue for one session.

    `submit` never waits: the conversation goes on while the store catches up. Each event's future
    resolves with its id once committed. A store that is unreachable is retried with capped backoff,
    forever, in order (events are idempotent by key, so a retry after an ambiguous failure is safe);
    an event the store refuses outright is logged, counted and its future fails, so one bad row
    cannot hold back the rest of the session. While `gate` is clear (the spool holds older events that
    must land first) nothing is written.
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        session_id: str,
        max_backoff_s: float,
        gate: asyncio.Event | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._session_id = session_id
        self._max_backoff_s = max_backoff_s
        self._gate = gate
        self._queue: list[tuple[NewEvent, asyncio.Future[int]]] = []
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def oldest_pending(self) -> datetime | None:
        """When the oldest event still waiting for the store was accepted."""
        return self._queue[0][0].created_at if self._queue else None

    def submit(self, event: NewEvent) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        self._metrics.pending_writes.inc()
        if self._task is None:
            self._idle.clear()
            self._task = asyncio.create_task(self._run(), name=f"writer:{self._session_id}")
        return future

    async def drain(self, within_s: float | None = None) -> bool:
        """Wait until everything submitted is committed (or refused); False if `within_s` passed first."""
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def take(self) -> list[tuple[NewEvent, asyncio.Future[int]]]:
        """Hand every pending event, with its future, to the spool; a write in flight is cancelled (the spool's
        replay is idempotent, so it does not matter whether it landed)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        taken, self._queue = self._queue, []
        self._metrics.pending_writes.dec(len(taken))
        self._idle.set()
        return taken

    def restore(self, items: list[tuple[NewEvent, asyncio.Future[int]]]) -> None:
        """Put back what `take` handed out (the spool could not keep it), ahead of anything newer."""
        if not items:
            return
        self._queue[:0] = items
        self._metrics.pending_writes.inc(len(items))
        if self._task is None:
            self._idle.clear()
            self._task = asyncio.create_task(self._run(), name=f"writer:{self._session_id}")

    async def abandon(self) -> int:
        """Stop retrying (process shutdown past its flush deadline); return how many events stay unwritten."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        left = len(self._queue)
        for _, future in self._queue:
            future.cancel()
        self._metrics.pending_writes.dec(left)
        self._queue.clear()
        self._idle.set()
        return left

    async def _run(self) -> None:
        me = asyncio.current_task()
        try:
            while self._queue:
                if self._gate is not None:
                    await self._gate.wait()
                    if not self._queue:
                        break
                batch = self._queue[:MAX_BATCH]
                await self._write(batch)
                del self._queue[: len(batch)]
                self._metrics.pending_writes.dec(len(batch))
        finally:
            # `take` may have let this task go and a newer one may run already.
            if self._task is me:
                self._task = None
                if not self._queue:
                    self._idle.set()

    async def _write(self, batch: list[tuple[NewEvent, asyncio.Future[int]]]) -> None:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                ids = await self._store.append_events([event for event, _ in batch])
            except StoreUnavailable as e:
                error: Exception = e
            except StoreError as e:
                if len(batch) > 1:
                    await self._write_one_by_one(batch)
                else:
                    self._refuse(batch[0], e)
                return
            except Exception as e:
                # A bug or an unmapped driver error: keep the events and keep trying, loudly.
                log.exception("unexpected error writing events", extra={"fields": {"session_id": self._session_id}})
                error = e
            else:
                self._metrics.store_write_seconds.observe(time.perf_counter() - started)
                for (_, future), event_id in zip(batch, ids, strict=True):
                    if not future.done():
                        future.set_result(event_id)
                return
            attempt += 1
            self._metrics.store_write_retries.inc()
            delay = min(self._max_backoff_s, 0.05 * 2**attempt) * (0.5 + random.random() / 2)
            fields = {"session_id": self._session_id, "events": len(batch), "attempt": attempt, "error": str(error)}
            log.warning("store write failed, retrying", extra={"fields": fields})
            await asyncio.sleep(delay)

    async def _write_one_by_one(self, batch: list[tuple[NewEvent, asyncio.Future[int]]]) -> None:
        # The store refused the batch: write its events singly so only the offending one is lost.
        for item in batch:
            await self._write([item])

    def _refuse(self, item: tuple[NewEvent, asyncio.Future[int]], error: StoreError) -> None:
        event, future = item
        self._metrics.store_events_dropped.inc()
        log.error(
            "store refused an event",
            extra={"fields": {"session_id": self._session_id, "event_type": event.event_type, "error": str(error)}},
        )
        if not future.done():
            future.set_exception(error)
            future.exception()  # Marked as retrieved: nobody may be waiting for this event.
