"""Attaching a writing connection to a session: ownership, the one-server lease, takeover, and opening the session
in the store."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from core.errors import Forbidden, StoreUnavailable
from core.settings import Settings
from core.store import AI_MESSAGE, CONTEXT_SUMMARY, MESSAGE_TYPES, USER_MESSAGE, OpenedSession, Store, StoredEvent

from ..eventlog import EventLog
from ..ratelimit import DailyTokenBudget
from .answer import answer_tokens
from .broker import Broker
from .follow import Follower
from .presence import Presence
from .session import Session


class Attacher:
    """The takeover protocol, run under `session.lock` before a new socket is accepted."""

    def __init__(
        self,
        store: Store,
        eventlog: EventLog,
        presence: Presence,
        settings: Settings,
        *,
        broker: Broker | None,
        budget: DailyTokenBudget | None = None,
    ) -> None:
        self._broker = broker
        self._budget = budget
        self._store = store
        self._eventlog = eventlog
        self._presence = presence
        self._settings = settings

    async def attach(self, session: Session, *, user_id: str | None) -> tuple[OpenedSession, list[StoredEvent]]:
        """Make the session this connection's: raises Forbidden (someone else's), StoreError or TimeoutError.

        A stranger must not even close its owner's socket, so ownership is checked first. Then one server per
        session: another server holding it closes its socket (4000) and lets go; so does our own older holder.
        """
        if user_id is not None:
            await self._check_owner(session, user_id)
            if self._budget is not None:
                # What the user spent today on every server, before their first message here.
                await self._budget.refresh(user_id)
        await self._presence.claim(session.id)
        if session.holder is not None:
            await session.holder.replace(stop_answer=self._settings.on_disconnect == "cancel")
        opened = await self._open(session, owner_id=user_id)
        await self.follow(session)
        return opened

    async def follow(self, session: Session) -> None:
        """If another server generates an answer for this session (or a watcher wants what others do), follow its
        stream, so connections here see it live."""
        if self._broker is None or session.follower is not None or session.conversation.running.local is not None:
            return
        if self._presence.redis_suspect:
            return  # Redis just failed: one connection paid its timeout, the next ones do not.
        follower = Follower(self._broker, session, reload=self.reload)
        await follower.start()
        if follower.task is not None:
            session.follower = follower

    async def reload(self, session: Session) -> None:
        """The context again from the store, once another server stored the answer it generated."""
        async with asyncio.timeout(self._settings.store_connect_timeout_s):
            history, summary = await self._context(session.id)
        session.conversation.reload(history, summary)

    async def _context(self, session_id: str) -> tuple[list[StoredEvent], StoredEvent | None]:
        """The session's recent messages and its last context summary, read side by side."""
        history, summaries = await asyncio.gather(
            self._store.events(session_id, types=MESSAGE_TYPES, limit=self._settings.history_limit),
            self._store.events(session_id, types=(CONTEXT_SUMMARY,), limit=1),
        )
        return history, summaries[0] if summaries else None

    async def _check_owner(self, session: Session, user_id: str) -> None:
        """A session with no owner, made while authentication was off, belongs to nobody."""
        async with asyncio.timeout(self._settings.store_connect_timeout_s):
            record = await self._store.get_session(session.id)
        if record is not None and record.owner_id != user_id:
            raise Forbidden(f"session {session.id!r} belongs to another user")

    async def _open(self, session: Session, *, owner_id: str | None) -> tuple[OpenedSession, list[StoredEvent]]:
        """Create or resume the session in the store and return its recent messages."""
        timeout_s = self._settings.store_connect_timeout_s
        await session.writer.drain(within_s=timeout_s)
        # Spooled events go first: a context read before they land would miss them.
        if not await self._eventlog.replayed(within_s=timeout_s):
            raise StoreUnavailable("spooled writes are still being replayed")
        async with asyncio.timeout(timeout_s):
            opened = await self._store.open_session(session.id, owner_id=owner_id, now=datetime.now(UTC))
            if owner_id is not None and opened.record.owner_id != owner_id:
                # Someone else created it between the ownership check and here.
                raise Forbidden(f"session {session.id!r} belongs to another user")
            history, summary = await self._context(session.id)
            conversation = session.conversation
            turns, tokens = (
                (conversation.turns, conversation.tokens_used)
                if session.loaded
                else await self._count(session.id, history)
            )
        session.opened(opened.record, history, summary, turns=turns, tokens_used=tokens)
        return opened, history

    async def _count(self, session_id: str, history: list[StoredEvent]) -> tuple[int, int]:
        """The session's turns so far and the tokens its answers used (for MAX_TURNS_PER_SESSION and
        SESSION_MAX_TOKENS): from the history when it is all there, else from the store's counts."""
        if len(history) < self._settings.history_limit:
            turns = sum(e.event_type == USER_MESSAGE for e in history)
            return turns, sum(answer_tokens(e.metadata) for e in history if e.event_type == AI_MESSAGE)
        # A long session: every stored question has its stored answer, so the turns are half the messages.
        record = await self._store.get_session(session_id)
        if record is None:
            return 0, 0
        tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        return ((record.message_count or 0) + 1) // 2, tokens
