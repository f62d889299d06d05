"""The PostgreSQL store: an asyncpg pool, idempotent batched writes, and driver errors mapped to ours."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from asyncpg import exceptions as pg
from asyncpg.pool import PoolConnectionProxy

from ..errors import StoreError, StoreUnavailable
from .base import MESSAGE_TYPES, NewEvent, OpenedSession, SessionRecord, StoredEvent, SummaryState, without_nul
from .migrate import migrate_postgres

# Errors after which the same call may succeed: the server is restarting, refusing or unreachable,
# the connection broke, or the transaction lost a race (deadlock, serialization, statement timeout).
_TRANSIENT: tuple[type[BaseException], ...] = (
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
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    *_TRANSIENT,
    pg.PostgresError,
    pg.InterfaceError,
    UnicodeError,
    orjson.JSONEncodeError,
)

_EVENT_COLUMNS = "id, session_id, event_type, content, created_at, client_msg_id, metadata"
_SESSION_COLUMNS = "s.session_id, s.start_time, s.end_time, s.summary, s.owner_id"
_MESSAGE_COUNT = (
    "(select count(*) from session_events e where e.session_id = s.session_id"
    " and e.event_type = any($2::text[])) as message_count"
)

_OPEN_SESSION = """
insert into sessions as s (session_id, start_time, owner_id) values ($1, $2, $3)
on conflict (session_id) do update set end_time = null, start_time = coalesce(s.start_time, excluded.start_time)
returning s.session_id, s.start_time, s.end_time, s.summary, s.owner_id, (s.xmax = 0) as created
"""

# One statement for the whole batch. `order by ord` makes the ids follow the batch's order; a key that is
# already stored (a retried write whose first attempt committed) is skipped and looked up afterwards. A
# clash on (session_id, client_msg_id) under a different key is not covered by `on conflict` and raises.
_APPEND = """
insert into session_events (session_id, event_type, content, created_at, client_msg_id, event_key, metadata)
select t.session_id, t.event_type, t.content, t.created_at, t.client_msg_id, t.event_key, t.metadata::jsonb
from unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[])
    with ordinality as t(session_id, event_type, content, created_at, client_msg_id, event_key, metadata, ord)
order by t.ord
on conflict (session_id, event_key) do nothing
returning id, session_id, event_key
"""

_EXISTING_IDS = """
select e.id, e.session_id, e.event_key from session_events e
join unnest($1::text[], $2::text[]) as k(session_id, event_key) using (session_id, event_key)
"""


# A session's summary bookkeeping, with its newest event found through the (session_id, id) index.
_SUMMARY_STATE = """
select s.session_id, s.start_time, s.end_time, s.summarized_through,
    e.id as last_event_id, e.created_at as last_event_at
from sessions s
left join lateral (
    select id, created_at from session_events where session_id = s.session_id order by id desc limit 1
) e on true
"""

# `<=`: a forced redo of the same state may replace its summary; an older state never replaces a newer one.
_SAVE_SUMMARY = """
update sessions set summary = $2, summarized_through = $3, summary_updated_at = now(),
    end_time = coalesce(end_time, $4)
where session_id = $1 and (summarized_through is null or summarized_through <= $3)
"""

# The first clause is only a cheap filter (a summary written after the session last ended is
# up to date); the second is exact.
_NEEDING_SUMMARY = f"""
{_SUMMARY_STATE}
where (s.end_time is null or s.summarized_through is null or s.summary_updated_at is null
       or s.summary_updated_at < s.end_time)
  and e.id is not null
  and ((s.end_time is not null and (s.summarized_through is null or s.summarized_through < e.id))
       or (s.end_time is null and e.created_at < $1))
order by coalesce(s.end_time, e.created_at)
limit $2
"""

_ENDED = f"""
{_SUMMARY_STATE}
where s.end_time is not null
  and ($1::timestamptz is null or s.start_time >= $1) and ($2::timestamptz is null or s.start_time < $2)
order by s.start_time, s.session_id
limit $3
"""


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
    return text if len(text) <= 200 else text[:200] + "…"


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """Turn driver errors into StoreUnavailable (retry may help) or StoreError (it will not)."""
    try:
        yield
    except _DRIVER_ERRORS as e:
        message = f"PostgreSQL: {type(e).__name__}: {_describe(e)}"
        if _is_transient(e):
            raise StoreUnavailable(message) from e
        raise StoreError(message) from e


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=_json, decoder=orjson.loads, format="text")


def _session(row: asyncpg.Record) -> SessionRecord:
    return SessionRecord(
        session_id=row["session_id"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        summary=row["summary"],
        owner_id=row["owner_id"],
        message_count=row.get("message_count"),
    )


def _summary_state(row: asyncpg.Record) -> SummaryState:
    return SummaryState(
        session_id=row["session_id"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        last_event_id=row["last_event_id"],
        last_event_at=row["last_event_at"],
        summarized_through=row["summarized_through"],
    )


def _event(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(
        id=row["id"],
        session_id=row["session_id"],
        event_type=row["event_type"],
        content=row["content"],
        created_at=row["created_at"],
        client_msg_id=row["client_msg_id"],
        metadata=row["metadata"],
    )


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

    async def open_session(self, session_id: str, *, owner_id: str | None, now: datetime) -> OpenedSession:
        async with self._connection() as conn:
            row = await conn.fetchrow(_OPEN_SESSION, session_id, now, owner_id)
        assert row is not None  # an upsert with `returning` always returns its row
        return OpenedSession(record=_session(row), created=row["created"])

    async def append_events(self, events: Sequence[NewEvent]) -> list[int]:
        if not events:
            return []
        async with self._connection() as conn:
            columns = (
                [e.session_id for e in events],
                [e.event_type for e in events],
                [without_nul(e.content) for e in events],
                [e.created_at for e in events],
                [without_nul(e.client_msg_id) for e in events],
                [e.event_key for e in events],
                [_json(without_nul(e.metadata)) for e in events],
            )
            rows = await conn.fetch(_APPEND, *columns)
            ids = {(r["session_id"], r["event_key"]): r["id"] for r in rows}
            missing = [(e.session_id, e.event_key) for e in events if (e.session_id, e.event_key) not in ids]
            if missing:
                found = await conn.fetch(_EXISTING_IDS, [m[0] for m in missing], [m[1] for m in missing])
                ids.update({(r["session_id"], r["event_key"]): r["id"] for r in found})
        try:
            return [ids[(e.session_id, e.event_key)] for e in events]
        except KeyError as e:
            raise StoreError(f"event {e.args[0]!r} was neither stored nor found") from e

    async def events(
        self,
        session_id: str,
        *,
        after: int = 0,
        limit: int | None = None,
        types: Sequence[str] | None = None,
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
            rows = await conn.fetch(sql, *args)
        return [_event(r) for r in rows]

    async def get_session(self, session_id: str) -> SessionRecord | None:
        sql = f"select {_SESSION_COLUMNS}, {_MESSAGE_COUNT} from sessions s where s.session_id = $1"
        async with self._connection() as conn:
            row = await conn.fetchrow(sql, session_id, list(MESSAGE_TYPES))
        return None if row is None else _session(row)

    async def list_sessions(self, *, limit: int, owner_id: str | None = None) -> list[SessionRecord]:
        sql = (
            f"select {_SESSION_COLUMNS}, {_MESSAGE_COUNT} from sessions s"
            " where ($3::text is null or s.owner_id = $3)"
            " order by s.start_time desc nulls last, s.session_id limit $1"
        )
        async with self._connection() as conn:
            rows = await conn.fetch(sql, limit, list(MESSAGE_TYPES), owner_id)
        return [_session(r) for r in rows]

    async def end_session(self, session_id: str, *, end_time: datetime) -> None:
        async with self._connection() as conn:
            await conn.execute("update sessions set end_time = $2 where session_id = $1", session_id, end_time)

    async def summary_state(self, session_id: str) -> SummaryState | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(_SUMMARY_STATE + " where s.session_id = $1", session_id)
        return None if row is None else _summary_state(row)

    async def save_summary(self, session_id: str, *, summary: str, through_event_id: int, end_time: datetime) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(_SAVE_SUMMARY, session_id, without_nul(summary), through_event_id, end_time)
        return bool(status == "UPDATE 1")

    async def sessions_needing_summary(self, *, stale_before: datetime, limit: int) -> list[SummaryState]:
        async with self._connection() as conn:
            rows = await conn.fetch(_NEEDING_SUMMARY, stale_before, limit)
        return [_summary_state(r) for r in rows]

    async def ended_sessions(
        self, *, started_after: datetime | None = None, started_before: datetime | None = None, limit: int
    ) -> list[SummaryState]:
        async with self._connection() as conn:
            rows = await conn.fetch(_ENDED, started_after, started_before, limit)
        return [_summary_state(r) for r in rows]

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("select 1")

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=self._acquire_timeout)
        except TimeoutError:
            # A connection still in use past the deadline: close the rest without waiting for it.
            self._pool.terminate()
