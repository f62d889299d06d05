"""Records from the JSON values that the SQL functions of sql/ return; shared by the PostgreSQL and Supabase stores."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..errors import StoreError
from .base import NewEvent, SessionRecord, SummaryState, without_nul


def ts(value: datetime | None) -> str | None:
    # Naive means local time, as in asyncpg.
    return None if value is None else value.astimezone(UTC).isoformat()


def dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text).astimezone(UTC)


def event_batch(events: Sequence[NewEvent]) -> list[dict[str, Any]]:
    """The argument of chat_append_events."""
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


def session(row: dict[str, Any]) -> SessionRecord:
    return SessionRecord(
        session_id=row["session_id"],
        start_time=dt(row["start_time"]),
        end_time=dt(row["end_time"]),
        summary=row["summary"],
        owner_id=row["owner_id"],
        message_count=row.get("message_count"),
    )


def summary_state(row: dict[str, Any]) -> SummaryState:
    return SummaryState(
        session_id=row["session_id"],
        start_time=dt(row["start_time"]),
        end_time=dt(row["end_time"]),
        last_message_id=row["last_message_id"],
        last_message_at=dt(row["last_message_at"]),
        summarized_through=row["summarized_through"],
        up_to_date=row["up_to_date"],
    )
