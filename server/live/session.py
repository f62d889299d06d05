"""One session's live state in this process: its conversation, who holds it, and where it stands in its life."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Protocol

from core.store import SessionRecord, StoredEvent

from ..eventlog import EventWriter
from .conversation import Conversation


class Following(Protocol):
    """What follows the session's answers from another server (see `follow.Follower`)."""

    task: asyncio.Task[None] | None


class Holder(Protocol):
    """The writing connection that holds a session (see `Connection`)."""

    async def replace(self, *, stop_answer: bool) -> None: ...

    async def close(self, code: int, message: str, *, ack_wait_s: float | None = None) -> None: ...

    def check_stalled(self, now: float) -> bool: ...


class Session:
    """Kept while a connection holds the session or its writes are pending; its fields change only here."""

    def __init__(self, session_id: str, *, writer: EventWriter, conversation: Conversation) -> None:
        self.id = session_id
        self.writer = writer
        self.conversation = conversation
        self.holder: Holder | None = None
        # Held while a connection attaches and while the session is being ended, so the two never cross.
        self.lock = asyncio.Lock()
        # Writing connections checked out (attaching or attached); the session ends when the last one checks in.
        self.users = 0
        # Read-only connections following it; they keep it registered, never alive.
        self.watchers = 0
        # Set while the lifecycle ends it (its answers finishing, its end being recorded).
        self.ending = False
        # Another server took the session over while an answer ran here: that server records its end.
        self.handed_over = False
        self.follower: Following | None = None
        self.loaded = False
        self.start_time: datetime | None = None
        self.ended_at: datetime | None = None

    def opened(
        self,
        record: SessionRecord,
        history: list[StoredEvent],
        summary: StoredEvent | None,
        *,
        turns: int,
        tokens_used: int,
    ) -> None:
        """The store opened (or resumed) the session. A session still live here keeps its conversation, which
        also holds what is not yet stored; otherwise the conversation is rebuilt from the store."""
        if not self.loaded:
            self.conversation.load(history, summary, turns=turns, tokens_used=tokens_used)
            self.loaded = True
        self.conversation.owner = record.owner_id
        self.start_time = record.start_time
        self.ended_at = None
        self.handed_over = False

    def attach(self, holder: Holder) -> None:
        self.holder = holder

    def detach(self, holder: Holder) -> None:
        """The holder's socket closed: the session may end now (unless someone reattaches)."""
        if self.holder is holder:
            self.holder = None
        self.ended_at = datetime.now(UTC)
