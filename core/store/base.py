"""The store's interface and the records it reads and writes; every backend implements `Store`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

from ..errors import StoreError

USER_MESSAGE: Final = "user_message"
AI_MESSAGE: Final = "ai_message"
CONNECTED: Final = "connected"
DISCONNECTED: Final = "disconnected"
MESSAGE_TYPES: Final = (USER_MESSAGE, AI_MESSAGE)
# What the model's context starts from once a session is long: its `metadata` names the last message it covers
# (`through`) and its length in tokens (`tokens`). Not a message: counts and summaries ignore it.
CONTEXT_SUMMARY: Final = "context_summary"


def without_nul(value: Any) -> Any:
    """`value` with NUL replaced by U+FFFD in every string. PostgreSQL text and jsonb cannot hold NUL at all;
    every backend applies this so that all of them read back alike."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value


def clipped(text: str, *, limit: int = 200) -> str:
    """An error's text as the stores log it: at most `limit` characters, and an ellipsis when cut."""
    return text if len(text) <= limit else text[:limit] + "…"


@contextmanager
def translated(errors: tuple[type[Exception], ...], translate: Callable[[Exception], StoreError]) -> Iterator[None]:
    """Raise `translate(e)` from any of `errors` raised inside: how every backend maps its driver's errors to
    StoreUnavailable (retry may help) or StoreError (it will not)."""
    try:
        yield
    except errors as e:
        raise translate(e) from e


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
    # The sums of its answers' token usage, when the query counts them (as message_count).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class OpenedSession:
    """What opening a session found: its row, and whether this call created it."""

    record: SessionRecord
    created: bool


@dataclass(frozen=True, slots=True)
class SummaryState:
    """Where a session stands for its summary: its last message, the last event its summary covers, and
    whether that summary is up to date (it covers the last message, or there is no message to summarise).
    Only messages count: a reconnect without new messages leaves an up-to-date summary up to date.
    `up_to_date` is the database's answer (sql/004 on PostgreSQL), so that the rule is written once."""

    session_id: str
    start_time: datetime | None
    end_time: datetime | None
    last_message_id: int | None
    last_message_at: datetime | None
    summarized_through: int | None
    up_to_date: bool


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
        self, session_id: str, *, after: int = 0, limit: int | None = None, types: Sequence[str] | None = None
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

    async def summary_state(self, session_id: str) -> SummaryState | None:
        """The session's summary bookkeeping, or None for an unknown session."""
        ...

    async def save_summary(self, session_id: str, *, summary: str, through_event_id: int, end_time: datetime) -> bool:
        """Store a summary that covers the events up to `through_event_id` (a state's `last_message_id`), and set
        end_time if it is still null.

        Atomic and monotonic: when the stored summary already covers a later event, nothing changes and
        False is returned, so a late job can never overwrite a newer summary with an older one.
        """
        ...

    async def sessions_needing_summary(self, *, stale_before: datetime, limit: int) -> list[SummaryState]:
        """Sessions to (re)summarise, oldest first: ended ones whose summary is not up to date, and ones never
        ended whose last message is older than `stale_before` (their server may have died)."""
        ...

    async def ended_sessions(
        self, *, started_after: datetime | None = None, started_before: datetime | None = None, limit: int
    ) -> list[SummaryState]:
        """Ended sessions whose start_time falls in [started_after, started_before), oldest first."""
        ...

    async def ping(self) -> None:
        """Return when the database answers; raise StoreUnavailable otherwise."""
        ...

    async def close(self) -> None: ...
