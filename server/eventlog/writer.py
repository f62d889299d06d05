"""Write-behind of session events: one ordered queue per session, committed in batches shared by all sessions."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from core import telemetry
from core.backoff import backoff_delay
from core.errors import StoreError, StoreUnavailable
from core.flag import Flag
from core.store import NewEvent, Store

from ..metrics import Metrics

log = logging.getLogger(__name__)

# Events per store round trip, and round trips in flight at once.
MAX_BATCH = 500
CONCURRENCY = 4
COLLECT_S = 0.002

Pending = tuple[NewEvent, "asyncio.Future[int]"]


class EventWriter:
    """One session's ordered queue of events waiting for the store.

    `submit` never waits: the conversation goes on while the store catches up. Each event's future resolves
    with its id once committed, or fails if the store refuses that event outright.
    """

    __slots__ = ("_committer", "_idle", "_in_flight", "_queue", "trace")

    def __init__(self, committer: Committer) -> None:
        self._committer = committer
        # The trace context of the session's connection, when tracing is on: its writes are spans in that trace.
        self.trace: Any = None
        self._queue: list[Pending] = []
        # How many events at the front of the queue are being committed now.
        self._in_flight = 0
        self._idle = Flag(True)

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def oldest_pending(self) -> datetime | None:
        """When the oldest event still waiting for the store was accepted."""
        return self._queue[0][0].created_at if self._queue else None

    def record(
        self,
        session_id: str,
        event_type: str,
        content: str | None,
        metadata: dict[str, Any] | None = None,
        *,
        client_msg_id: str | None = None,
        event_key: str | None = None,
    ) -> asyncio.Future[int]:
        """Submit a new event of `session_id`, stamped now, with a fresh idempotency key unless given one."""
        event = NewEvent(
            session_id=session_id,
            event_type=event_type,
            content=content,
            event_key=event_key or secrets.token_hex(12),
            created_at=datetime.now(UTC),
            client_msg_id=client_msg_id,
            metadata=metadata or {},
        )
        return self.submit(event)

    def submit(self, event: NewEvent) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        self._committer.pending_changed(1)
        if not self._in_flight:
            self._idle.clear()
            self._committer.ready(self)
        return future

    async def drain(self, within_s: float | None = None) -> bool:
        """Wait until everything submitted is committed (or refused); False if `within_s` passed first."""
        try:
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def restore(self, items: list[Pending]) -> None:
        """Put back what the committer's `take_all` handed out (the spool could not keep it), ahead of the rest."""
        if not items:
            return
        self._queue[:0] = items
        self._committer.pending_changed(len(items))
        if not self._in_flight:
            self._idle.clear()
            self._committer.ready(self)

    # Used by the committer.

    def _next(self, room: int) -> list[Pending]:
        batch = self._queue[:room]
        self._in_flight = len(batch)
        return batch

    def _landed(self) -> None:
        del self._queue[: self._in_flight]
        self._committer.pending_changed(-self._in_flight)
        self._in_flight = 0
        if self._queue:
            self._committer.ready(self)
        else:
            self._idle.set()

    def _take(self) -> list[Pending]:
        taken, self._queue, self._in_flight = self._queue, [], 0
        self._idle.set()
        return taken


class Committer:
    """Commits the queued events of every session in shared batches: one store round trip carries the events
    of many sessions, so a busy process does not queue hundreds of small inserts for the connection pool.

    Each session's events go in order: a session with events in flight gives no more until they land. A store
    that is unreachable is retried with capped backoff, forever (events are idempotent by key, so a retry after
    an ambiguous failure is safe); an event the store refuses outright is logged, counted and its future fails,
    so one bad row holds back nothing else. While `gate` is clear (the spool holds older events that must land
    first) nothing is written.
    """

    def __init__(
        self, store: Store, metrics: Metrics, *, max_backoff_s: float, gate: asyncio.Event | None = None
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._max_backoff_s = max_backoff_s
        self._gate = gate
        # Writers with events to send and none in flight, oldest first (a dict as an ordered set).
        self._ready: dict[EventWriter, None] = {}
        self._writers_with_events: set[EventWriter] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.pending = 0

    def writer(self) -> EventWriter:
        return EventWriter(self)

    def pending_changed(self, delta: int) -> None:
        self.pending += delta
        self._metrics.pending_writes.inc(delta)

    def ready(self, writer: EventWriter) -> None:
        self._ready[writer] = None
        self._writers_with_events.add(writer)
        self._wake.set()
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._run(), name=f"committer-{i}") for i in range(CONCURRENCY)]

    def oldest_pending(self) -> datetime | None:
        return min((t for w in self._writers_with_events if (t := w.oldest_pending) is not None), default=None)

    async def take_all(self) -> dict[EventWriter, list[Pending]]:
        """Stop committing and hand over every pending event (for the spool); writes in flight are cancelled, which
        is safe because a replay of an event that did land stores nothing twice."""
        await self._stop()
        taken = {w: items for w in self._writers_with_events if (items := w._take())}
        self.pending_changed(-sum(len(items) for items in taken.values()))
        self._writers_with_events.clear()
        self._ready.clear()
        return taken

    async def close(self) -> None:
        await self._stop()

    async def _stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                # Let the turn that submitted the event reach the model first: the user waits for that, while
                # the write only has to land before its acknowledgement. Events arriving meanwhile join the batch.
                await asyncio.sleep(COLLECT_S)
                continue
            if self._gate is not None and not self._gate.is_set():
                await self._gate.wait()
                continue
            parts: list[tuple[EventWriter, list[Pending]]] = []
            room = MAX_BATCH
            while self._ready and room > 0:
                writer = next(iter(self._ready))
                del self._ready[writer]
                items = writer._next(room)
                parts.append((writer, items))
                room -= len(items)
            batch = [item for _, items in parts for item in items]
            if telemetry.tracer is None:
                await self._write(batch)
            else:
                # One span per batch: a child of the first session's trace, linked to the others'.
                traces = [writer.trace for writer, _ in parts]
                attributes = {
                    "db.operation.name": "append_events",
                    "db.system.name": self._store.name,
                    "rt.events": len(batch),
                }
                with telemetry.span(
                    "store append_events", kind="CLIENT", parent=traces[0], links=traces[1:], attributes=attributes
                ):
                    await self._write(batch)
            for writer, _ in parts:
                writer._landed()
                if not writer.pending:
                    self._writers_with_events.discard(writer)

    async def _write(self, batch: list[Pending]) -> None:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                ids = await self._store.append_events([event for event, _ in batch])
            except StoreUnavailable as e:
                error: Exception = e
            except StoreError as e:
                if len(batch) > 1:
                    # Written singly, only the offending event is lost.
                    for item in batch:
                        await self._write([item])
                else:
                    self._refuse(batch[0], e)
                return
            except Exception as e:
                # A bug or an unmapped driver error: keep the events and keep trying, loudly.
                log.exception("unexpected error writing events")
                error = e
            else:
                self._metrics.store_write_seconds.observe(time.perf_counter() - started)
                for (_, future), event_id in zip(batch, ids, strict=True):
                    if not future.done():
                        future.set_result(event_id)
                return
            attempt += 1
            self._metrics.store_write_retries.inc()
            delay = backoff_delay(attempt, base=0.05, cap=self._max_backoff_s)
            sessions = sorted({event.session_id for event, _ in batch})
            fields = {"sessions": sessions[:10], "events": len(batch), "attempt": attempt, "error": str(error)}
            log.warning("store write failed, retrying", extra={"fields": fields})
            await asyncio.sleep(delay)

    def _refuse(self, item: Pending, error: StoreError) -> None:
        event, future = item
        self._metrics.store_events_dropped.inc()
        log.error(
            "store refused an event",
            extra={"fields": {"session_id": event.session_id, "event_type": event.event_type, "error": str(error)}},
        )
        if not future.done():
            future.set_exception(error)
            future.exception()  # Marked as retrieved: nobody may be waiting for this event.
