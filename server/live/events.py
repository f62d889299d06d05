"""Building the events a live session appends to its log."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime
from typing import Any

from core.store import NewEvent

from ..eventlog import EventWriter


def record(
    writer: EventWriter,
    session_id: str,
    event_type: str,
    content: str | None,
    metadata: dict[str, Any] | None = None,
    *,
    client_msg_id: str | None = None,
    event_key: str | None = None,
) -> asyncio.Future[int]:
    """Submit one event; its future resolves with the stored id once committed."""
    event = NewEvent(
        session_id=session_id,
        event_type=event_type,
        content=content,
        event_key=event_key or secrets.token_hex(12),
        created_at=datetime.now(UTC),
        client_msg_id=client_msg_id,
        metadata=metadata or {},
    )
    return writer.submit(event)
