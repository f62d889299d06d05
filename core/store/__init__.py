"""Durable sessions and events: the `Store` interface and the factory that picks a backend from the settings."""

from __future__ import annotations

from ..errors import ConfigError
from ..settings import Settings
from .base import (
    AI_MESSAGE,
    CONNECTED,
    CONTEXT_SUMMARY,
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
    "CONTEXT_SUMMARY",
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
    or `sqlite:////absolute/path`: SQLiteStore. With DATABASE_URL unset and both SUPABASE_URL and
    SUPABASE_SERVICE_ROLE_KEY set: SupabaseStore, which migrates nothing (see the README). Raises
    StoreUnavailable when the database cannot be reached.
    """
    # Imported here so that importing the interface does not load a database driver.
    from .migrate import sqlite_path

    if settings.database_url is None and (settings.supabase_url or settings.supabase_service_role_key):
        if not (settings.supabase_url and settings.supabase_service_role_key):
            raise ConfigError("SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY must be set together")
        from .supabase import SupabaseStore

        return await SupabaseStore.connect(
            settings.supabase_url,
            settings.supabase_service_role_key,
            connect_timeout=settings.store_connect_timeout_s,
        )
    url = settings.database_url_or_default
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
