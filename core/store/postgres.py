"""The PostgreSQL store: an asyncpg pool calling the SQL functions of sql/ (as Supabase does), driver errors mapped."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from asyncpg import exceptions as pg
from asyncpg.pool import PoolConnectionProxy

from ..errors import StoreError, StoreUnavailable
from . import rows
from .base import NewEvent, OpenedSession, SessionRecord, StoredEvent, SummaryState, clipped, translated, without_nul
from .migrate import migrate_postgres

# Errors after which the same call may succeed: the server is restarting, refusing or unreachable,
# the connection broke, or the transaction lost a race (deadlock, serialization, statement timeout).
_TRANSIENT: tuple[type[Exception], ...] = (
    OSError,  # includes ConnectionError and TimeoutError (asyncpg's connect and command timeouts)
    pg.PostgresConnectionError,  # SQLSTATE class 08, and ConnectionDoesNotExistError
    pg.AdminShutdownError,  # 57P01
    pg.CrashShutdownError,  # 57P02
    pg.CannotConnectNowError,  # 57P03
    pg.TooManyConnectionsError,  # 53300
    pg.TransactionRollbackError,  # class 40
    pg.QueryCanceledError,  # 57014: statement_timeout
    pg.InternalClientError,  # protocol confusion or a stale statement cache: a fresh attempt clears it
)
_DRIVER_ERRORS: tuple[type[Exception], ...] = (
    *_TRANSIENT,
    pg.PostgresError,
    pg.InterfaceError,
    UnicodeError,
    orjson.JSONEncodeError,
)

_EVENT_COLUMNS = ", ".join(rows.EVENT_COLUMNS)


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, pg.InterfaceError):
        # DataError and ClientConfigurationError are also ValueErrors: bad arguments, not a bad connection.
        return not isinstance(e, ValueError)
    return isinstance(e, _TRANSIENT)


def _describe(e: BaseException) -> str:
    # Without the DETAIL of a server error or the arguments of a DataError: they can hold message text,
    # and this string ends up in logs.
    text = str(e.args[0]) if isinstance(e, pg.PostgresError) and e.args else str(e)
    text = re.sub(r"(query argument \$\d+): .* \(", r"\1 (", text, count=1, flags=re.DOTALL)
    return clipped(text)


def _store_error(e: Exception) -> StoreError:
    message = f"PostgreSQL: {type(e).__name__}: {_describe(e)}"
    return StoreUnavailable(message) if _is_transient(e) else StoreError(message)


def _mapped_errors() -> AbstractContextManager[None]:
    return translated(_DRIVER_ERRORS, _store_error)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    for type_ in ("json", "jsonb"):
        await conn.set_type_codec(type_, schema="pg_catalog", encoder=_json, decoder=orjson.loads, format="text")


class PostgresStore:
    """The `Store` on PostgreSQL (or Supabase), through a pool that replaces broken connections by itself."""

    name = "postgres"

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], *, acquire_timeout: float) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        migrate: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
    ) -> PostgresStore:
        """Apply pending migrations (unless `migrate=False`), then open the pool.

        Raises StoreUnavailable when the server cannot be reached within `connect_timeout`.
        """
        with _mapped_errors():
            if migrate:
                await migrate_postgres(dsn, connect_timeout=connect_timeout)
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=connect_timeout,
                # A hung server or a lock wait cannot hold a caller forever.
                command_timeout=command_timeout,
                init=_init_connection,
            )
        return cls(pool, acquire_timeout=connect_timeout + command_timeout)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        # The pool drops a connection that broke while in use and opens a new one on the next acquire,
        # so one failed call (StoreUnavailable) never poisons the calls after it.
        with _mapped_errors():
            async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn

    async def _call(self, fn: str, *args: Any) -> Any:
        """The value of one of the SQL functions of sql/ (the ones SupabaseStore calls too)."""
        placeholders = ", ".join(f"${i}" for i in range(1, len(args) + 1))
        async with self._connection() as conn:
            return await conn.fetchval(f"select * from {fn}({placeholders})", *args)

    async def open_session(self, session_id: str, *, owner_id: str | None, now: datetime) -> OpenedSession:
        row = await self._call("chat_open_session", session_id, owner_id, now)
        return OpenedSession(record=rows.record(SessionRecord, row), created=bool(row["created"]))

    async def append_events(self, events: Sequence[NewEvent]) -> list[int]:
        if not events:
            return []
        # One statement for the whole batch: ids in batch order, a key already stored skipped and looked up.
        return rows.ids(await self._call("chat_append_events", rows.event_batch(events)), len(events))

    async def events(
        self, session_id: str, *, after: int = 0, limit: int | None = None, types: Sequence[str] | None = None
    ) -> list[StoredEvent]:
        where = "session_id = $1 and id > $2 and ($3::text[] is null or event_type = any($3::text[]))"
        if limit is None:
            sql = f"select {_EVENT_COLUMNS} from session_events where {where} order by id"
        else:
            # The most recent `limit`, still returned oldest first.
            sql = (
                f"select * from (select {_EVENT_COLUMNS} from session_events where {where}"
                " order by id desc limit $4) e order by id"
            )
        args: list[Any] = [session_id, after, None if types is None else list(types)]
        if limit is not None:
            args.append(limit)
        async with self._connection() as conn:
            found = await conn.fetch(sql, *args)
        return [rows.record(StoredEvent, r) for r in found]

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self._call("chat_session", session_id)
        return None if row is None else rows.record(SessionRecord, row)

    async def list_sessions(self, *, limit: int, owner_id: str | None = None) -> list[SessionRecord]:
        return [rows.record(SessionRecord, r) for r in await self._call("chat_sessions", limit, owner_id)]

    async def end_session(self, session_id: str, *, end_time: datetime) -> None:
        async with self._connection() as conn:
            await conn.execute("update sessions set end_time = $2 where session_id = $1", session_id, end_time)

    async def summary_state(self, session_id: str) -> SummaryState | None:
        row = await self._call("chat_summary_state", session_id)
        return None if row is None else rows.summary_state(row)

    async def save_summary(self, session_id: str, *, summary: str, through_event_id: int, end_time: datetime) -> bool:
        summary = without_nul(summary)
        return bool(await self._call("chat_save_summary", session_id, summary, through_event_id, end_time))

    async def sessions_needing_summary(self, *, stale_before: datetime, limit: int) -> list[SummaryState]:
        return [rows.summary_state(r) for r in await self._call("chat_sessions_needing_summary", stale_before, limit)]

    async def ended_sessions(
        self, *, started_after: datetime | None = None, started_before: datetime | None = None, limit: int
    ) -> list[SummaryState]:
        found = await self._call("chat_ended_sessions", started_after, started_before, limit)
        return [rows.summary_state(r) for r in found]

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("select 1")

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=self._acquire_timeout)
        except TimeoutError:
            # A connection still in use past the deadline: close the rest without waiting for it.
            self._pool.terminate()
