"""Records from the rows every store reads (JSON from sql/'s functions, asyncpg records, sqlite3 rows), and back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, overload

from ..errors import StoreError
from .base import NewEvent, SessionRecord, StoredEvent, SummaryState, without_nul

R = TypeVar("R", StoredEvent, SessionRecord, SummaryState)

# The columns of session_events that a StoredEvent holds, in its order.
EVENT_COLUMNS = tuple(f.name for f in fields(StoredEvent))
# Columns that JSON and SQLite carry as ISO text; asyncpg hands them over as datetimes already.
_TIMES = frozenset({"created_at", "start_time", "end_time", "last_message_at"})


class Row(Protocol):
    """A row by column name: a dict (JSON), an asyncpg.Record or an sqlite3.Row."""

    def __getitem__(self, key: str, /) -> Any: ...

    def keys(self) -> Iterable[str]: ...


@overload
def ts(value: datetime) -> str: ...
@overload
def ts(value: None) -> None: ...
def ts(value: datetime | None) -> str | None:
    # One fixed width, always UTC, so that text order is time order (SQLite compares the text).
    # Naive means local time, as in asyncpg.
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")


def dt(text: str | None) -> datetime | None:
    # Text without an offset is UTC: PostgreSQL always writes one, and SQLite holds UTC only.
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def record(cls: type[R], row: Row, **given: Any) -> R:
    """`cls` from the row's columns of the same names, times read from text; `given` values are taken as they
    are, and a column the row lacks (message_count, which only some queries count) keeps the field's default."""
    present = set(row.keys())
    values = dict(given)
    for f in fields(cls):
        if f.name in values or f.name not in present:
            continue
        value = row[f.name]
        values[f.name] = dt(value) if f.name in _TIMES and isinstance(value, str) else value
    return cls(**values)


def summary_state(row: Row) -> SummaryState:
    # SQLite has no booleans: it answers 0 or 1.
    return record(SummaryState, row, up_to_date=bool(row["up_to_date"]))


def event_batch(events: Sequence[NewEvent]) -> list[dict[str, Any]]:
    """The events as stored, NUL replaced: the argument of chat_append_events, and SQLite's rows."""
    return [
        {
            "session_id": e.session_id,
            "event_type": e.event_type,
            "content": without_nul(e.content),
            "created_at": ts(e.created_at),
            "client_msg_id": without_nul(e.client_msg_id),
            "event_key": e.event_key,
            "metadata": without_nul(e.metadata),
        }
        for e in events
    ]


def ids(data: Any, expected: int) -> list[int]:
    """What chat_append_events returned, checked: one id per event."""
    if not isinstance(data, list) or len(data) != expected or not all(isinstance(i, int) for i in data):
        raise StoreError("an event was neither stored nor found")
    return data
