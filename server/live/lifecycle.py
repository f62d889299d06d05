"""How live sessions end: after their last connection (end time, summary job) and at process shutdown (drain)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from core import telemetry
from core.backoff import backoff_delay
from core.errors import StoreError, StoreUnavailable
from core.jobs import JobQueue, summary_job_id
from core.settings import Settings
from core.store import Store
from core.tasks import TaskSet, succeeded

from ..eventlog import EventLog
from .presence import Presence
from .registry import Registry
from .session import Session

log = logging.getLogger(__name__)


class Lifecycle:
    """Ends sessions in the background and winds the process's sessions down at shutdown."""

    def __init__(
        self,
        registry: Registry,
        eventlog: EventLog,
        store: Store,
        jobs: JobQueue,
        presence: Presence,
        settings: Settings,
    ) -> None:
        self._registry = registry
        self._eventlog = eventlog
        self._store = store
        self._jobs = jobs
        self._presence = presence
        self._settings = settings
        self._endings = TaskSet()
        self._wind_down: asyncio.Task[None] | None = None
        self._forced = False

    def session_idle(self, session: Session) -> None:
        """The session's last connection checked in."""
        self._endings.spawn(self._end(session), name=f"end:{session.id}")

    async def _end(self, session: Session) -> None:
        """Once the session is quiet (its answers finish without a connection) and every write has landed, record
        the end time and ask for the summary, unless someone came back meanwhile."""
        session.ending = True
        try:
            await self._end_when_quiet(session)
        finally:
            session.ending = False

    async def _end_when_quiet(self, session: Session) -> None:
        await session.conversation.quiet()
        if session.users > 0:
            return
        await session.writer.drain()
        job_id: str | None = None
        async with session.lock:
            if session.users > 0:
                return
            if session.ended_at is not None and not session.handed_over:
                await self._record_end(session.id, session.ended_at)
                job_id = await self._summary_job_id(session)
            # A reconnect may have checked the session out while the end was being recorded: it is waiting
            # for this lock and will reopen the session (clearing the end time), so the session stays ours.
            if session.users > 0:
                return
            self._registry.forget(session)
            self._presence.release(session.id)
        if job_id is not None:
            await self._jobs.summary(
                session.id,
                job_id=job_id,
                delay_s=self._settings.summary_delay_s,
                trace=telemetry.inject(session.writer.trace),
            )

    async def _summary_job_id(self, session: Session) -> str | None:
        """The job for the session as of its last message; None when that is known to be summarised already."""
        last = session.conversation.last_message
        if last is not None and succeeded(last):
            return summary_job_id(session.id, start_time=session.start_time, last_message_id=last.result())
        try:
            state = await self._store.summary_state(session.id)
        except StoreError as e:
            # The sweeper will find the session; nothing is lost by not enqueueing now.
            log.warning(
                "could not read the session's summary state",
                extra={"fields": {"session_id": session.id, "error": str(e)}},
            )
            return None
        if state is None or state.last_message_id is None or state.up_to_date:
            return None
        return summary_job_id(session.id, start_time=state.start_time, last_message_id=state.last_message_id)

    async def _record_end(self, session_id: str, end_time: datetime) -> None:
        """Retried until the store takes it: the session's end is what its summary waits for."""
        attempt = 0
        while True:
            try:
                await self._store.end_session(session_id, end_time=end_time)
                return
            except StoreUnavailable as e:
                log.warning(
                    "could not record session end, retrying",
                    extra={"fields": {"session_id": session_id, "attempt": attempt, "error": str(e)}},
                )
                await asyncio.sleep(backoff_delay(attempt, base=0.05, cap=self._settings.store_retry_max_s))
                attempt += 1

    # Shutdown, in this order: drain and flush (once), close the sockets, close.

    async def wind_down(self, *, drain_s: float, flush_s: float) -> None:
        """Drain, then flush; runs once however often it is called, and `force` cuts it short."""
        if self._wind_down is None:
            self._wind_down = asyncio.ensure_future(self._drain_and_flush(drain_s, flush_s))
        await asyncio.gather(self._wind_down, return_exceptions=True)

    @property
    def forced(self) -> bool:
        return self._forced

    def force(self) -> None:
        """A second stop signal: stop waiting for answers and writes; what is not written goes to the spool."""
        self._forced = True
        if self._wind_down is not None:
            self._wind_down.cancel()

    async def _drain_and_flush(self, drain_s: float, flush_s: float) -> None:
        await self.drain(within_s=drain_s)
        await self.flush(within_s=flush_s)

    async def drain(self, *, within_s: float) -> None:
        """Give the answers running now up to `within_s` to finish, while the sockets are still read (messages
        are stored, cancels work); the ones still running then are stored as `interrupted`."""
        busy = [s.conversation for s in self._registry.sessions() if s.conversation.busy]
        if not busy:
            return
        draining = {asyncio.ensure_future(c.drain()): c for c in busy}
        try:
            _, late = await asyncio.wait(draining, timeout=0 if self._forced else within_s)
        finally:
            # Also when `force` cancels the wait: every answer ends stored, as interrupted.
            late = {task for task in draining if not task.done()}
            for task in late:
                task.cancel()
            await asyncio.shield(asyncio.gather(*(draining[t].interrupt() for t in late)))
        log.info("answers drained", extra={"fields": {"answers": len(busy), "interrupted": len(late)}})

    async def flush(self, *, within_s: float) -> None:
        """Before the sockets close: let pending writes land, so their `message.stored` still goes out."""
        writers = [w.drain() for w in self._registry.writers() if w.pending]
        if writers:
            await asyncio.wait([asyncio.ensure_future(w) for w in writers], timeout=within_s)
        # One turn of the loop for the acknowledgements the commits scheduled.
        await asyncio.sleep(0)

    async def close_connections(self, code: int, message: str) -> None:
        holders = list(self._registry.holders())
        # Forced: no waiting for acknowledgements either; what is not stored is spooled.
        ack_wait_s = 0.0 if self._forced else None
        await asyncio.gather(*(h.close(code, message, ack_wait_s=ack_wait_s) for h in holders), return_exceptions=True)

    async def close(self, *, within_s: float) -> None:
        """Process shutdown: give the endings `within_s`, then spool whatever is still not written."""
        await self._endings.wait(within_s=0 if self._forced else within_s)
        await self._registry.close()
        await self._eventlog.close()
