"""Live sessions of this process: who holds each one, its context and writer, and how it ends."""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from arq.connections import ArqRedis

from core.errors import Forbidden, StoreError, StoreUnavailable
from core.jobs import JobQueue, summary_job_id
from core.settings import Settings
from core.store import MESSAGE_TYPES, USER_MESSAGE, OpenedSession, Store, StoredEvent

from .context import Context
from .metrics import Metrics
from .presence import Presence
from .ratelimit import UserRateLimiter
from .spool import Spool
from .writer import Committer, EventWriter

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger(__name__)


class Session:
    """One conversation's state in this process, kept while a connection holds it or its writes are pending."""

    def __init__(self, session_id: str, *, writer: EventWriter, context: Context) -> None:
        self.id = session_id
        self.writer = writer
        self.context = context
        # client_msg_id -> its stored id, or the future of it while the write is pending.
        self.client_msgs: dict[str, int | asyncio.Future[int]] = {}
        self.connection: Connection | None = None
        self.loaded = False
        self.ended_at: datetime | None = None
        self.start_time: datetime | None = None
        # The `disconnected` event of the last connection: the state the summary job will cover.
        self.last_event: asyncio.Future[int] | None = None
        # Held while a connection attaches and while the session is being ended, so the two never cross.
        self.lock = asyncio.Lock()
        self.users = 0
        # User messages accepted over the session's whole life, for MAX_TURNS_PER_SESSION.
        self.turns = 0

    def remember(self, history: list[StoredEvent]) -> None:
        self.context.load(history)
        for event in history:
            if event.event_type == USER_MESSAGE and event.client_msg_id is not None:
                self.client_msgs[event.client_msg_id] = event.id
        self.loaded = True


class Hub:
    """The registry of live sessions, and the background work that ends them after their last connection."""

    def __init__(
        self, store: Store, metrics: Metrics, settings: Settings, *, redis: ArqRedis, presence: Presence
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._settings = settings
        self._redis = redis
        self._jobs = JobQueue(redis, registry=metrics.registry)
        self._presence = presence
        self._sessions: dict[str, Session] = {}
        self._endings: set[asyncio.Task[None]] = set()
        self._connections = 0
        self._per_user: dict[str, int] = {}
        self.spool = Spool(settings.spool_dir, store, metrics, retry_max_s=settings.store_retry_max_s)
        self._committer = Committer(store, metrics, max_backoff_s=settings.store_retry_max_s, gate=self.spool.clear)
        self.user_rate = UserRateLimiter(redis, settings.user_messages_per_minute)
        self._watchdog: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Replay what an earlier run spooled, and start watching for writes the store does not take."""
        self.spool.open()
        self._watchdog = asyncio.create_task(self._watch_writes(), name="spool-watchdog")

    def __len__(self) -> int:
        return len(self._sessions)

    def admit(self, user_id: str | None) -> str | None:
        """Reserve a connection slot; the refusal's error code when the process or the user is at the limit.
        Every admitted connection is paired with a `leave`."""
        if self._connections >= self._settings.max_connections:
            return "server_busy"
        if user_id is not None:
            if self._per_user.get(user_id, 0) >= self._settings.max_connections_per_user:
                return "too_many_connections"
            self._per_user[user_id] = self._per_user.get(user_id, 0) + 1
        self._connections += 1
        return None

    def leave(self, user_id: str | None) -> None:
        self._connections -= 1
        if user_id is not None:
            left = self._per_user[user_id] - 1
            if left:
                self._per_user[user_id] = left
            else:
                del self._per_user[user_id]
                self.user_rate.forget(user_id)

    def checkout(self, session_id: str) -> Session:
        """The session's live state, created if needed; every checkout is paired with a `checkin`."""
        session = self._sessions.get(session_id)
        if session is None:
            writer = self._committer.writer(session_id)
            context = Context(self._settings.system_prompt, max_chars=self._settings.context_max_chars)
            session = self._sessions[session_id] = Session(session_id, writer=writer, context=context)
        session.users += 1
        return session

    def checkin(self, session: Session) -> None:
        session.users -= 1
        if session.users == 0:
            task = asyncio.create_task(self._end(session), name=f"end:{session.id}")
            self._endings.add(task)
            task.add_done_callback(self._endings.discard)

    def release_request(self, session_id: str) -> None:
        """Another server takes the session over: close our socket on it with 4000; its wind-down stores what
        we had, and the lease is let go once every write has landed."""
        session = self._sessions.get(session_id)
        if session is not None and session.connection is not None:
            task = asyncio.create_task(session.connection.replace(), name=f"release:{session_id}")
            self._endings.add(task)
            task.add_done_callback(self._endings.discard)

    async def check_owner(self, session: Session, user_id: str) -> None:
        """Raise Forbidden unless the session is new or belongs to `user_id` (a session with no owner, made while
        authentication was off, belongs to nobody). Checked before anything touches the session."""
        async with asyncio.timeout(self._settings.store_connect_timeout_s):
            record = await self._store.get_session(session.id)
        if record is not None and record.owner_id != user_id:
            raise Forbidden(f"session {session.id!r} belongs to another user")

    async def open(self, session: Session, *, owner_id: str | None) -> tuple[OpenedSession, list[StoredEvent]]:
        """Create or resume the session in the store and return its recent messages.

        Called under `session.lock`. A session still live here keeps its in-memory context, which
        also holds what is not yet stored; otherwise the context is rebuilt from the store.
        """
        await session.writer.drain(within_s=self._settings.store_connect_timeout_s)
        try:
            # Spooled events go first: a context read before they land would miss them.
            async with asyncio.timeout(self._settings.store_connect_timeout_s):
                await self.spool.clear.wait()
        except TimeoutError:
            raise StoreUnavailable("spooled writes are still being replayed") from None
        async with asyncio.timeout(self._settings.store_connect_timeout_s):
            opened = await self._store.open_session(session.id, owner_id=owner_id, now=datetime.now(UTC))
            if owner_id is not None and opened.record.owner_id != owner_id:
                # Someone else created it between check_owner and here.
                raise Forbidden(f"session {session.id!r} belongs to another user")
            history = await self._store.events(session.id, types=MESSAGE_TYPES, limit=self._settings.history_limit)
            if not session.loaded:
                session.turns = await self._count_turns(session.id, history)
        if not session.loaded:
            session.remember(history)
        session.ended_at = None
        session.start_time = opened.record.start_time
        return opened, history

    async def _count_turns(self, session_id: str, history: list[StoredEvent]) -> int:
        if len(history) < self._settings.history_limit:
            return sum(e.event_type == USER_MESSAGE for e in history)
        # A long session: every stored question has its stored answer, so the turns are half the messages.
        record = await self._store.get_session(session_id)
        return 0 if record is None or record.message_count is None else (record.message_count + 1) // 2

    async def _end(self, session: Session) -> None:
        """After the last connection: wait for every write, record the end time and ask for the summary,
        unless someone came back meanwhile."""
        await session.writer.drain()
        last_event_id: int | None = None
        async with session.lock:
            if session.users > 0:
                return
            if session.ended_at is not None:
                await self._record_end(session.id, session.ended_at)
                last_event_id = await self._last_event_id(session)
            # A reconnect may have checked the session out while the end was being recorded: it is waiting
            # for this lock and will reopen the session (clearing the end time), so the session stays ours.
            if session.users > 0:
                return
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
                self._presence.release(session.id)
        if last_event_id is not None:
            job_id = summary_job_id(session.id, start_time=session.start_time, last_message_id=last_event_id)
            await self._jobs.summary(session.id, job_id=job_id, delay_s=self._settings.summary_delay_s)

    async def _last_event_id(self, session: Session) -> int | None:
        last = session.last_event
        if last is not None and last.done() and not last.cancelled() and last.exception() is None:
            return last.result()
        try:
            state = await self._store.summary_state(session.id)
        except StoreError as e:
            # The sweeper will find the session; nothing is lost by not enqueueing now.
            log.warning(
                "could not read the session's last event", extra={"fields": {"session_id": session.id, "error": str(e)}}
            )
            return None
        return None if state is None else state.last_event_id

    async def _record_end(self, session_id: str, end_time: datetime) -> None:
        attempt = 0
        while True:
            try:
                await self._store.end_session(session_id, end_time=end_time)
                return
            except StoreUnavailable as e:
                attempt += 1
                delay = min(self._settings.store_retry_max_s, 0.05 * 2**attempt) * (0.5 + random.random() / 2)
                log.warning(
                    "could not record session end, retrying",
                    extra={"fields": {"session_id": session_id, "error": str(e)}},
                )
                await asyncio.sleep(delay)

    async def finish_answers(self, *, within_s: float) -> None:
        """Shutdown: give the answers streaming now up to `within_s` to finish before the sockets close."""
        connections = [s.connection for s in self._sessions.values() if s.connection is not None]
        if connections:
            tasks = [asyncio.create_task(c.finish_answer()) for c in connections]
            _, late = await asyncio.wait(tasks, timeout=within_s)
            for task in late:
                task.cancel()
            log.info("answers drained", extra={"fields": {"connections": len(connections), "cut_short": len(late)}})

    async def close_connections(self, code: int, message: str) -> None:
        connections = [s.connection for s in self._sessions.values() if s.connection is not None]
        await asyncio.gather(*(c.close(code, message) for c in connections), return_exceptions=True)

    async def flush(self, *, within_s: float) -> None:
        """Shutdown, before the sockets close: let pending writes land, so their `message.stored` still goes out."""
        writers = [s.writer.drain() for s in self._sessions.values() if s.writer.pending]
        if writers:
            await asyncio.wait([asyncio.ensure_future(w) for w in writers], timeout=within_s)
        # One turn of the loop for the acknowledgements the commits scheduled.
        await asyncio.sleep(0)

    async def close(self, *, within_s: float) -> None:
        """Process shutdown: give pending writes `within_s` to land, then spool the rest for the next start."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._endings:
            _, late = await asyncio.wait(set(self._endings), timeout=within_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if not await self.spill():
            lost = [item for items in (await self._committer.take_all()).values() for item in items]
            for _, future in lost:
                future.cancel()
            log.error("events not stored at shutdown", extra={"fields": {"events": len(lost)}})
        self._sessions.clear()
        await self._committer.close()
        await self.spool.close()
        await self.user_rate.close()

    async def spill(self) -> bool:
        """Move every pending write to the spool, in order; False (and nothing moved) if the disk refused."""
        taken = await self._committer.take_all()
        if await self.spool.spill([item for items in taken.values() for item in items]):
            return True
        for writer, items in taken.items():
            writer.restore(items)
        return False

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
                await self.spill()
