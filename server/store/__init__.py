"""Durable sessions and events: the `Store` interface and the factory that picks a backend from the settings."""

from __future__ import annotations

from ..errors import ConfigError
from ..settings import Settings
from .base import (
    AI_MESSAGE,
    CONNECTED,
    DISCONNECTED,
    MESSAGE_TYPES,
    USER_MESSAGE,
    NewEvent,
    OpenedSession,
    SessionRecord,
    Store,
    StoredEvent,
    SummaryState,
)

__all__ = [
    "AI_MESSAGE",
    "CONNECTED",
    "DISCONNECTED",
    "MESSAGE_TYPES",
    "USER_MESSAGE",
    "NewEvent",
    "OpenedSession",
    "SessionRecord",
    "Store",
    "StoredEvent",
    "SummaryState",
    "open_store",
]


async def open_store(settings: Settings) -> Store:
    """Connect to the database named by `settings.database_url`, applying pending migrations.

    `postgresql://` or `postgres://`: PostgresStore. `sqlite:///relative/path` (from the current directory)
    or `sqlite:////absolute/path`: SQLiteStore. Raises StoreUnavailable when the database cannot be reached.
    """
    # Imported here so that importing the interface does not load a database driver.
    from .migrate import sqlite_path

    url = settings.database_url
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return await PostgresStore.connect(url, connect_timeout=settings.store_connect_timeout_s)
    if url.startswith("sqlite:"):
        from .sqlite import SQLiteStore

        try:
            path = sqlite_path(url)
        except ValueError as e:
            raise ConfigError(f"DATABASE_URL={url!r}: {e}") from e
        return await SQLiteStore.connect(path)
    raise ConfigError(f"DATABASE_URL={url!r}: must start with postgresql:// or sqlite:///")
