"""The live sessions of this process: checked out by each connection, let go after the last one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from core.jobs import ContextSummary
from core.tasks import TaskSet

from ..eventlog import EventWriter
from .session import Holder, Session

log = logging.getLogger(__name__)

_SWEEP_S = 1.0


class Registry:
    """Session id -> its live `Session`. A session stays registered while a connection uses it or it is ending."""

    def __init__(
        self,
        make_session: Callable[[str], Session],
        *,
        on_idle: Callable[[Session], None],
        on_handed_over: Callable[[str], None],
        stop_on_takeover: bool,
    ) -> None:
        self._make_session = make_session
        self._on_idle = on_idle
        self._on_handed_over = on_handed_over
        self._stop_on_takeover = stop_on_takeover
        self._sessions: dict[str, Session] = {}
        self._tasks = TaskSet()

    def checkout(self, session_id: str) -> Session:
        """The session's live state, created if needed; every checkout is paired with a `checkin`."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = self._make_session(session_id)
        session.users += 1
        return session

    def checkin(self, session: Session) -> None:
        session.users -= 1
        if session.users == 0:
            self._on_idle(session)

    def watch(self, session_id: str, *, limit: int) -> Session | None:
        """The session for a read-only connection, or None when `limit` watchers follow it already; paired with
        `unwatch`."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = self._make_session(session_id)
        if session.watchers >= limit:
            return None
        session.watchers += 1
        return session

    def unwatch(self, session: Session) -> None:
        session.watchers -= 1
        if session.watchers == 0 and session.users == 0 and not session.conversation.busy and not session.ending:
            self.forget(session)

    def forget(self, session: Session) -> None:
        """The session ended (called under its lock, with no user left); watchers keep it registered."""
        if session.watchers == 0 and self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def holders(self) -> Iterator[Holder]:
        return (s.holder for s in list(self._sessions.values()) if s.holder is not None)

    def writers(self) -> Iterator[EventWriter]:
        return (s.writer for s in list(self._sessions.values()))

    def release_request(self, session_id: str) -> None:
        """Another server takes the session over: close our socket on it with 4000; its wind-down stores what
        we had, and the lease is let go once every write has landed."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        if self._stop_on_takeover:
            # ON_DISCONNECT=cancel (1.0): the answer stops, its partial text stored, before the other server loads.
            if session.holder is not None:
                self._tasks.spawn(session.holder.replace(stop_answer=True), name=f"release:{session_id}")
            elif session.conversation.busy:
                self._tasks.spawn(session.conversation.stop(), name=f"release:{session_id}")
            return
        # 1.1: the answer in flight goes on here, shared through Redis, and the other server's connection joins
        # it; that server holds the session now (and records its end).
        session.handed_over = True
        session.conversation.hand_over()
        self._on_handed_over(session_id)
        if session.holder is not None:
            self._tasks.spawn(session.holder.replace(stop_answer=False), name=f"release:{session_id}")

    def cancel_request(self, session_id: str, response_id: str) -> None:
        """A connection on another server cancelled an answer that may be running here."""
        session = self._sessions.get(session_id)
        if session is not None:
            session.conversation.cancel_response(response_id)

    def context_summary(self, summary: ContextSummary) -> None:
        """The worker stored a context summary; a session live here uses it from its next request."""
        session = self._sessions.get(summary.session_id)
        if session is not None:
            session.conversation.summarised(summary)

    async def sweep_stalled(self) -> None:
        """Runs until cancelled: cut off every connection whose peer stopped reading (see `Outbox`)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = loop.time()
            for holder in self.holders():
                holder.check_stalled(now)

    async def close(self) -> None:
        await self._tasks.wait(within_s=1.0)
        self._sessions.clear()
