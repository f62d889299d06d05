"""The store's interface and the records it reads and writes; every backend implements `Store`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

USER_MESSAGE: Final = "user_message"
AI_MESSAGE: Final = "ai_message"
CONNECTED: Final = "connected"
DISCONNECTED: Final = "disconnected"
MESSAGE_TYPES: Final = (USER_MESSAGE, AI_MESSAGE)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. `event_key` is unique per session, so writing the same event twice stores it once."""

    session_id: str
    event_type: str
    content: str | None
    event_key: str
    created_at: datetime
    client_msg_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored, with the id that orders it within its session."""

    id: int
    session_id: str
    event_type: str
    content: str | None
    created_at: datetime
    client_msg_id: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One row of `sessions`, with the number of stored messages when the query counts them."""

    session_id: str
    start_time: datetime | None
    end_time: datetime | None
    summary: str | None
    owner_id: str | None
    message_count: int | None = None


@dataclass(frozen=True, slots=True)
class OpenedSession:
    record: SessionRecord
    created: bool


class Store(Protocol):
    """Durable sessions and their ordered events.

    Backends raise `StoreUnavailable` when the database cannot be reached (the caller retries)
    and `StoreError` when the request itself cannot succeed.
    """

    name: str

    async def open_session(self, session_id: str, *, owner_id: str | None, now: datetime) -> OpenedSession:
        """Create the session with `start_time=now`, or resume it: start_time kept, end_time cleared."""
        ...

    async def append_events(self, events: Sequence[NewEvent]) -> list[int]:
        """Append events atomically and in order, returning their ids in the same order.

        An event whose (session_id, event_key) is already stored is not stored again: its existing id is returned.
        """
        ...

    async def events(
        self,
        session_id: str,
        *,
        after: int = 0,
        limit: int | None = None,
        types: Sequence[str] | None = None,
    ) -> list[StoredEvent]:
        """The session's events with id > `after`, in id order; the last `limit` of them when a limit is given."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord | None:
        """The session with its message count, or None."""
        ...

    async def list_sessions(self, *, limit: int, owner_id: str | None = None) -> list[SessionRecord]:
        """Sessions, newest start first, with their message counts."""
        ...

    async def end_session(self, session_id: str, *, end_time: datetime) -> None:
        """Record when the session ended."""
        ...

    async def ping(self) -> None:
        """Return when the database answers; raise StoreUnavailable otherwise."""
        ...

    async def close(self) -> None: ...
