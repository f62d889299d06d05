"""The SQLite store: one aiosqlite connection in WAL mode, calls serialized, each batch in one transaction."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from ..errors import StoreError, StoreUnavailable
from . import rows
from . import sqlite_queries as q
from .base import NewEvent, OpenedSession, SessionRecord, StoredEvent, SummaryState, translated, without_nul
from .migrate import migrate_sqlite

# Primary result codes after which the same call may succeed: another process holds the lock, or the
# disk or file is (for now) unusable.
_TRANSIENT_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
_TRANSIENT_MESSAGES = ("database is locked", "disk i/o error", "unable to open database file")


def _is_transient(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _TRANSIENT_CODES:
        return True
    return isinstance(e, sqlite3.OperationalError) and any(m in str(e).lower() for m in _TRANSIENT_MESSAGES)


def _store_error(e: Exception) -> StoreError:
    message = f"SQLite: {type(e).__name__}: {e}"
    return StoreUnavailable(message) if isinstance(e, sqlite3.Error) and _is_transient(e) else StoreError(message)


def _mapped_errors() -> AbstractContextManager[None]:
    return translated((sqlite3.Error, UnicodeError, orjson.JSONEncodeError), _store_error)


# The named parameters are the keys of rows.event_batch.
_INSERT_EVENT = (
    "insert into session_events (session_id, event_type, content, created_at, client_msg_id, event_key, metadata)"
    " values (:session_id, :event_type, :content, :created_at, :client_msg_id, :event_key, :metadata)"
    " on conflict (session_id, event_key) do nothing returning id"
)


class SQLiteStore:
    """The `Store` on a local SQLite file: for development and single-process deployments."""

    name = "sqlite"

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        # One connection: a transaction must not interleave with another coroutine's statements.
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str | Path, *, migrate: bool = True) -> SQLiteStore:
        """Open (creating it and its directory if needed) the database file and apply pending migrations."""
        if str(path) != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"SQLite: cannot create the directory for {str(path)!r}: {e}") from e
        with _mapped_errors():
            # Autocommit mode: the store opens its transactions itself, with `begin immediate`.
            db = await aiosqlite.connect(path, isolation_level=None)
            try:
                db.row_factory = sqlite3.Row
                await db.execute("pragma journal_mode = wal")
                await db.execute("pragma synchronous = normal")
                await db.execute("pragma foreign_keys = on")
                # Wait for another process's write lock rather than fail at once.
                await db.execute("pragma busy_timeout = 5000")
                if migrate:
                    await migrate_sqlite(db)
            except BaseException:
                await db.close()
                raise
        return cls(db)

    @asynccontextmanager
    async def _serialized(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            with _mapped_errors():
                yield self._db

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._serialized() as db:
            await db.execute("begin immediate")
            try:
                yield db
                await db.execute("commit")
            except BaseException:
                # Some errors (a full disk, an I/O error) end the transaction themselves.
                if db.in_transaction:
                    await db.execute("rollback")
                raise

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._serialized() as db:
            return list(await db.execute_fetchall(sql, params))

    async def open_session(self, session_id: str, *, owner_id: str | None, now: datetime) -> OpenedSession:
        async with self._transaction() as db:
            cursor = await db.execute(
                "insert into sessions (session_id, start_time, owner_id) values (?, ?, ?)"
                " on conflict (session_id) do nothing",
                (session_id, rows.ts(now), owner_id),
            )
            created = cursor.rowcount == 1
            if not created:
                await db.execute(
                    "update sessions set end_time = null, start_time = coalesce(start_time, ?) where session_id = ?",
                    (rows.ts(now), session_id),
                )
            async with db.execute(
                f"select {q.SESSION_COLUMNS} from sessions s where s.session_id = ?", (session_id,)
            ) as c:
                row = await c.fetchone()
        assert row is not None  # inserted or updated just above, in the same transaction
        return OpenedSession(record=rows.record(SessionRecord, row), created=created)

    async def append_events(self, events: Sequence[NewEvent]) -> list[int]:
        if not events:
            return []
        ids: list[int] = []
        async with self._transaction() as db:
            for e in rows.event_batch(events):
                # A key already stored (a retried write) keeps its row and id; a clash on
                # (session_id, client_msg_id) under another key is not covered by `on conflict` and raises.
                params = {**e, "metadata": orjson.dumps(e["metadata"]).decode()}
                found = list(await db.execute_fetchall(_INSERT_EVENT, params))
                if not found:
                    found = list(
                        await db.execute_fetchall(
                            "select id from session_events where session_id = ? and event_key = ?",
                            (e["session_id"], e["event_key"]),
                        )
                    )
                ids.append(found[0]["id"])
        return ids

    async def events(
        self, session_id: str, *, after: int = 0, limit: int | None = None, types: Sequence[str] | None = None
    ) -> list[StoredEvent]:
        where = "session_id = ? and id > ?"
        params: list[Any] = [session_id, after]
        if types is not None:
            where += f" and event_type in ({', '.join('?' * len(types))})"
            params.extend(types)
        if limit is None:
            sql = f"select {q.EVENT_COLUMNS} from session_events where {where} order by id"
        else:
            # The most recent `limit`, still returned oldest first.
            sql = (
                f"select * from (select {q.EVENT_COLUMNS} from session_events where {where}"
                " order by id desc limit ?) order by id"
            )
            params.append(limit)
        return [
            rows.record(StoredEvent, r, metadata=orjson.loads(r["metadata"])) for r in await self._fetch(sql, params)
        ]

    async def get_session(self, session_id: str) -> SessionRecord | None:
        sql = f"select {q.SESSION_COLUMNS}, {q.COUNTS} from sessions s where s.session_id = ?"
        found = await self._fetch(sql, (session_id,))
        return rows.record(SessionRecord, found[0]) if found else None

    async def list_sessions(self, *, limit: int, owner_id: str | None = None) -> list[SessionRecord]:
        # NULL sorts lowest in SQLite, so sessions without a start time come last, as in PostgresStore.
        sql = (
            f"select {q.SESSION_COLUMNS}, {q.COUNTS} from sessions s"
            " where (? is null or s.owner_id = ?)"
            " order by s.start_time desc, s.session_id limit ?"
        )
        return [rows.record(SessionRecord, r) for r in await self._fetch(sql, (owner_id, owner_id, limit))]

    async def end_session(self, session_id: str, *, end_time: datetime) -> None:
        async with self._transaction() as db:
            await db.execute("update sessions set end_time = ? where session_id = ?", (rows.ts(end_time), session_id))

    async def summary_state(self, session_id: str) -> SummaryState | None:
        found = await self._fetch(f"select * from ({q.SUMMARY_STATE}) st where st.session_id = ?", (session_id,))
        return rows.summary_state(found[0]) if found else None

    async def save_summary(self, session_id: str, *, summary: str, through_event_id: int, end_time: datetime) -> bool:
        # `<=`: a forced redo of the same state may replace its summary; an older one never replaces a newer.
        async with self._transaction() as db:
            cursor = await db.execute(
                "update sessions set summary = ?, summarized_through = ?, summary_updated_at = ?,"
                " end_time = coalesce(end_time, ?)"
                " where session_id = ? and (summarized_through is null or summarized_through <= ?)",
                (
                    without_nul(summary),
                    through_event_id,
                    rows.ts(datetime.now(UTC)),
                    rows.ts(end_time),
                    session_id,
                    through_event_id,
                ),
            )
            return cursor.rowcount == 1

    async def sessions_needing_summary(self, *, stale_before: datetime, limit: int) -> list[SummaryState]:
        return [rows.summary_state(r) for r in await self._fetch(q.NEEDING_SUMMARY, (rows.ts(stale_before), limit))]

    async def ended_sessions(
        self, *, started_after: datetime | None = None, started_before: datetime | None = None, limit: int
    ) -> list[SummaryState]:
        after, before = rows.ts(started_after), rows.ts(started_before)
        return [rows.summary_state(r) for r in await self._fetch(q.ENDED, (after, after, before, before, limit))]

    async def ping(self) -> None:
        await self._fetch("select 1")

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()
