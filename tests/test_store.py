"""The store, on PostgreSQL, SQLite and Supabase alike: sessions, idempotent ordered events, summaries, migrations,
failure mapping."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiosqlite
import asyncpg
import pytest
import pytest_asyncio

from core.errors import ConfigError, StoreError, StoreUnavailable
from core.settings import Settings
from core.store import AI_MESSAGE, CONNECTED, DISCONNECTED, USER_MESSAGE, NewEvent, Store, SummaryState, open_store
from core.store.migrate import main as migrate_main
from core.store.migrate import migrate_postgres, migrate_url, postgres_migrations, sqlite_migrations
from core.store.postgres import PostgresStore
from core.store.sqlite import SQLiteStore
from core.store.supabase import SupabaseStore
from tests.fakes.postgrest import Failure, FakePostgREST
from tests.supabase_env import prepare_supabase_database

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

SEED_SQL = """
create table sessions (session_id text primary key, start_time timestamptz, end_time timestamptz, summary text);
create table session_events (id bigserial primary key, session_id text references sessions(session_id),
    event_type text, content text, created_at timestamptz default now());
"""


def pg_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.fail(
            "TEST_DATABASE_URL is not set: point it at a PostgreSQL database these tests may empty, e.g. "
            "TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/store_test",
            pytrace=False,
        )
    return url


def with_params(url: str, **params: str) -> str:
    """`url` with extra query parameters; asyncpg passes unknown ones on as server settings."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


def event(session_id: str, key: str, *, type_: str = USER_MESSAGE, content: str | None = None, **kw: Any) -> NewEvent:
    kw.setdefault("created_at", T0)
    return NewEvent(session_id, type_, content if content is not None else f"text {key}", key, **kw)


@pytest_asyncio.fixture(scope="module")
async def postgrest() -> AsyncIterator[FakePostgREST]:
    """The PostgREST stand-in over the test database, made to look like a Supabase project's first."""
    conn = await asyncpg.connect(pg_url())
    try:
        await prepare_supabase_database(conn)
    finally:
        await conn.close()
    fake = FakePostgREST(pg_url())
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def empty_tables() -> None:
    conn = await asyncpg.connect(pg_url())
    try:
        await conn.execute("truncate session_events, sessions restart identity cascade")
    finally:
        await conn.close()


@pytest_asyncio.fixture(params=["postgres", "sqlite", "supabase"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, postgrest: FakePostgREST) -> AsyncIterator[Store]:
    """An empty store on each backend."""
    s: Store
    if request.param == "postgres":
        s = await PostgresStore.connect(pg_url())
        await empty_tables()
    elif request.param == "supabase":
        postgrest.reset()
        s = await SupabaseStore.connect(postgrest.url, postgrest.key("service_role"))
        await empty_tables()
    else:
        s = await SQLiteStore.connect(tmp_path / "data" / "store.db")
    try:
        yield s
    finally:
        await s.close()


@pytest_asyncio.fixture
async def supabase(postgrest: FakePostgREST) -> AsyncIterator[SupabaseStore]:
    """An empty Supabase store, for what only that backend does."""
    postgrest.reset()
    s = await SupabaseStore.connect(postgrest.url, postgrest.key("service_role"), request_timeout=0.5)
    await empty_tables()
    postgrest.reset()
    try:
        yield s
    finally:
        await s.close()


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A URL of the test database whose search_path is a new, empty schema (dropped afterwards)."""
    name = f"test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(pg_url())
    await admin.execute(f"create schema {name}")
    try:
        yield with_params(pg_url(), search_path=name)
    finally:
        await admin.execute(f"drop schema {name} cascade")
        await admin.close()


@pytest_asyncio.fixture
async def pg_schema() -> AsyncIterator[str]:
    async with fresh_schema() as url:
        yield url


@pytest_asyncio.fixture(params=["postgres", "sqlite"])
async def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of an empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        async with fresh_schema() as url:
            yield url


async def tables(url: str) -> set[str]:
    if url.startswith("sqlite:"):
        async with aiosqlite.connect(url.removeprefix("sqlite:///")) as db:
            rows = await db.execute_fetchall("select name from sqlite_master where type = 'table'")
            return {r[0] for r in rows} - {"sqlite_sequence"}
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch("select tablename from pg_tables where schemaname = current_schema()")
        return {r[0] for r in records}
    finally:
        await conn.close()


def write_migration(sql_dir: Path, name: str, sql: str) -> None:
    """The same migration for both dialects."""
    (sql_dir / "sqlite").mkdir(parents=True, exist_ok=True)
    (sql_dir / name).write_text(sql)
    (sql_dir / "sqlite" / name).write_text(sql)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# Sessions


async def test_open_creates_then_resumes_keeping_start_and_clearing_end(store: Store) -> None:
    opened = await store.open_session("s1", owner_id="alice", now=T0)
    assert opened.created
    assert (opened.record.session_id, opened.record.start_time, opened.record.end_time) == ("s1", T0, None)
    assert opened.record.owner_id == "alice"

    await store.end_session("s1", end_time=T0 + timedelta(minutes=5))
    ended = await store.get_session("s1")
    assert ended is not None and ended.end_time == T0 + timedelta(minutes=5)

    again = await store.open_session("s1", owner_id="mallory", now=T0 + timedelta(hours=1))
    assert not again.created
    assert again.record.start_time == T0
    assert again.record.end_time is None
    assert again.record.owner_id == "alice"


async def test_get_session_counts_messages_and_is_none_when_unknown(store: Store) -> None:
    assert await store.get_session("nope") is None
    await store.open_session("s1", owner_id=None, now=T0)
    await store.append_events(
        [
            event("s1", "c", type_=CONNECTED, content=""),
            event("s1", "u1"),
            event("s1", "a1", type_=AI_MESSAGE),
            event("s1", "u2"),
        ]
    )
    record = await store.get_session("s1")
    assert record is not None
    assert record.message_count == 3
    assert record.start_time == T0 and record.start_time.tzinfo is not None


async def test_end_session_of_unknown_session_does_nothing(store: Store) -> None:
    await store.end_session("ghost", end_time=T0)
    assert await store.get_session("ghost") is None


async def test_list_sessions_newest_first_with_limit_owner_and_counts(store: Store) -> None:
    await store.open_session("old", owner_id="alice", now=T0)
    await store.open_session("new", owner_id="bob", now=T0 + timedelta(hours=2))
    await store.open_session("mid-b", owner_id="alice", now=T0 + timedelta(hours=1))
    await store.open_session("mid-a", owner_id="alice", now=T0 + timedelta(hours=1))
    await store.append_events([event("old", "u1"), event("old", "a1", type_=AI_MESSAGE)])

    everything = await store.list_sessions(limit=10)
    assert [s.session_id for s in everything] == ["new", "mid-a", "mid-b", "old"]
    assert {s.session_id: s.message_count for s in everything} == {"new": 0, "mid-a": 0, "mid-b": 0, "old": 2}

    assert [s.session_id for s in await store.list_sessions(limit=2)] == ["new", "mid-a"]
    assert [s.session_id for s in await store.list_sessions(limit=10, owner_id="alice")] == ["mid-a", "mid-b", "old"]
    assert await store.list_sessions(limit=10, owner_id="nobody") == []


# Events


async def test_append_returns_increasing_ids_in_batch_order(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    batch = [
        event("s1", "k1", content="hello", client_msg_id="m1", created_at=T0),
        event("s1", "k2", type_=AI_MESSAGE, content="hi there", metadata={"status": "completed"}),
        event("s1", "k3", content="again", created_at=T0 + timedelta(seconds=3)),
    ]
    ids = await store.append_events(batch)
    assert ids == sorted(ids) and len(set(ids)) == 3
    more = await store.append_events([event("s1", "k4")])
    assert more[0] > ids[-1]

    stored = await store.events("s1")
    assert [e.id for e in stored] == [*ids, *more]
    first, second, third = stored[:3]
    assert (first.event_type, first.content, first.client_msg_id, first.created_at) == (
        USER_MESSAGE,
        "hello",
        "m1",
        T0,
    )
    assert (second.event_type, second.content, second.metadata) == (AI_MESSAGE, "hi there", {"status": "completed"})
    assert third.created_at == T0 + timedelta(seconds=3) and third.metadata == {}
    assert await store.append_events([]) == []


async def test_reappending_the_same_keys_stores_nothing_twice_and_returns_the_same_ids(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    first = await store.append_events([event("s1", "a", client_msg_id="m-a"), event("s1", "b")])
    # A retry after an ambiguous failure: the first attempt did commit.
    assert await store.append_events([event("s1", "a", client_msg_id="m-a"), event("s1", "b")]) == first

    mixed = await store.append_events([event("s1", "b"), event("s1", "c"), event("s1", "a", client_msg_id="m-a")])
    assert mixed[0] == first[1] and mixed[2] == first[0]
    assert mixed[1] > first[1]
    assert [e.content for e in await store.events("s1")] == ["text a", "text b", "text c"]


async def test_the_same_key_in_two_sessions_is_two_events(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    await store.open_session("s2", owner_id=None, now=T0)
    ids = await store.append_events([event("s1", "k", client_msg_id="m"), event("s2", "k", client_msg_id="m")])
    assert ids[0] != ids[1]
    assert len(await store.events("s1")) == len(await store.events("s2")) == 1


async def test_a_duplicate_client_msg_id_under_another_key_is_refused_and_the_batch_not_stored(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    await store.append_events([event("s1", "k1", client_msg_id="m1")])

    with pytest.raises(StoreError) as refused:
        await store.append_events([event("s1", "k2"), event("s1", "k3", client_msg_id="m1")])
    assert not isinstance(refused.value, StoreUnavailable), "a retry cannot fix this one"
    assert [e.client_msg_id for e in await store.events("s1")] == ["m1"]


async def test_events_for_a_session_that_was_never_opened_are_refused(store: Store) -> None:
    with pytest.raises(StoreError) as refused:
        await store.append_events([event("never-opened", "k1")])
    assert not isinstance(refused.value, StoreUnavailable)


async def test_events_after_a_cursor_by_type_and_the_last_n_in_order(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    await store.open_session("other", owner_id=None, now=T0)
    kinds = [CONNECTED, USER_MESSAGE, AI_MESSAGE, USER_MESSAGE, AI_MESSAGE, USER_MESSAGE]
    ids = await store.append_events([event("s1", f"k{i}", type_=k) for i, k in enumerate(kinds)])
    await store.append_events([event("other", "x")])

    assert [e.id for e in await store.events("s1")] == ids
    assert [e.id for e in await store.events("s1", after=ids[2])] == ids[3:]
    assert [e.id for e in await store.events("s1", types=[AI_MESSAGE])] == [ids[2], ids[4]]
    assert [e.id for e in await store.events("s1", limit=2)] == ids[-2:]
    messages = await store.events("s1", types=[USER_MESSAGE, AI_MESSAGE], limit=3)
    assert [e.id for e in messages] == ids[3:]
    assert [e.id for e in await store.events("s1", after=ids[3], limit=10)] == ids[4:]
    assert await store.events("s1", after=ids[-1]) == []
    assert await store.events("nope") == []


async def test_metadata_round_trips(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    metadata = {
        "status": "completed",
        "usage": {"prompt_tokens": 12, "completion_tokens": 40, "ratio": 0.5},
        "tags": ["a", "ü", None, True],
        "model": "gpt-4o-mini",
        "note": "日本語 ✓ 🎉",
    }
    await store.append_events([event("s1", "k1", type_=AI_MESSAGE, metadata=metadata)])
    (stored,) = await store.events("s1")
    assert stored.metadata == metadata


async def test_nul_becomes_a_replacement_character_and_emoji_survive(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    await store.append_events(
        [event("s1", "k1", content="a\x00b 🎉👩‍💻", client_msg_id="m\x00", metadata={"k\x00": ["v\x00"]})]
    )
    (stored,) = await store.events("s1")
    assert stored.content == "a\ufffdb 🎉👩‍💻"
    assert stored.client_msg_id == "m\ufffd"
    assert stored.metadata == {"k\ufffd": ["v\ufffd"]}


async def test_concurrent_appends_all_land_with_distinct_ids(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    batches = [[event("s1", f"{b}-{i}") for i in range(5)] for b in range(8)]
    results = await asyncio.gather(*(store.append_events(batch) for batch in batches))
    for ids in results:
        assert ids == sorted(ids)
    assert len({i for ids in results for i in ids}) == 40
    assert len(await store.events("s1")) == 40


async def test_ping_answers(store: Store) -> None:
    await store.ping()


# Summaries


async def test_summary_state_is_none_when_unknown_and_follows_the_last_message(store: Store) -> None:
    assert await store.summary_state("nope") is None
    await store.open_session("s1", owner_id=None, now=T0)
    fresh = await store.summary_state("s1")
    assert fresh == SummaryState(
        "s1", T0, None, last_message_id=None, last_message_at=None, summarized_through=None, up_to_date=True
    ), "nothing to summarise yet"

    ids = await store.append_events([event("s1", "a"), event("s1", "b", created_at=T0 + timedelta(minutes=1))])
    await store.append_events([event("s1", "c", type_=CONNECTED, created_at=T0 + timedelta(minutes=2))])
    state = await store.summary_state("s1")
    assert state is not None
    assert (state.last_message_id, state.last_message_at, state.summarized_through) == (
        ids[1],
        T0 + timedelta(minutes=1),
        None,
    )
    assert not state.up_to_date


async def test_save_summary_covers_events_sets_end_time_only_once_and_never_goes_back(store: Store) -> None:
    await store.open_session("s1", owner_id=None, now=T0)
    a, b, c = await store.append_events([event("s1", "a"), event("s1", "b"), event("s1", "c")])
    ended = T0 + timedelta(minutes=5)

    assert await store.save_summary("s1", summary="about a and b", through_event_id=b, end_time=ended)
    record, state = await store.get_session("s1"), await store.summary_state("s1")
    assert record is not None and state is not None
    assert (record.summary, record.end_time, state.summarized_through) == ("about a and b", ended, b)

    # A later summary replaces it, but end_time was already set and stays.
    assert await store.save_summary(
        "s1", summary="about all three", through_event_id=c, end_time=ended + timedelta(hours=1)
    )
    record, state = await store.get_session("s1"), await store.summary_state("s1")
    assert record is not None and state is not None
    assert (record.summary, record.end_time, state.summarized_through) == ("about all three", ended, c)
    assert state.up_to_date

    # A late job for an older state changes nothing.
    assert not await store.save_summary("s1", summary="about a", through_event_id=a, end_time=ended)
    record, state = await store.get_session("s1"), await store.summary_state("s1")
    assert record is not None and state is not None
    assert (record.summary, state.summarized_through) == ("about all three", c)

    # A forced redo of the same state may replace it.
    assert await store.save_summary("s1", summary="about all three, again", through_event_id=c, end_time=ended)
    assert not await store.save_summary("ghost", summary="x", through_event_id=c, end_time=ended)
    assert await store.get_session("ghost") is None


async def test_sessions_needing_summary_are_ended_and_behind_or_stale_oldest_first(store: Store) -> None:
    # Summaries are stamped with the wall clock, so these sessions live around now.
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    stale_before = base + timedelta(hours=1)

    async def session(session_id: str, *, last_event_at: datetime | None, ended: datetime | None) -> int | None:
        await store.open_session(session_id, owner_id=None, now=base)
        ids = (
            []
            if last_event_at is None
            else await store.append_events([event(session_id, "k", created_at=last_event_at)])
        )
        if ended is not None:
            await store.end_session(session_id, end_time=ended)
        return ids[0] if ids else None

    await session("ended-unsummarised", last_event_at=base, ended=base + timedelta(minutes=30))
    await session("stale-live", last_event_at=base + timedelta(minutes=10), ended=None)
    await session("fresh-live", last_event_at=base + timedelta(minutes=90), ended=None)
    await session("ended-empty", last_event_at=None, ended=base + timedelta(minutes=15))
    covered = await session("ended-summarised", last_event_at=base, ended=base + timedelta(minutes=20))
    assert covered is not None
    await store.save_summary("ended-summarised", summary="done", through_event_id=covered, end_time=base)
    # Summarised when it first ended, then resumed: its summary no longer covers its last event.
    first = await session("resumed", last_event_at=base, ended=base + timedelta(minutes=5))
    assert first is not None
    await store.save_summary("resumed", summary="the start", through_event_id=first, end_time=base)
    await store.open_session("resumed", owner_id=None, now=base)
    (latest,) = await store.append_events([event("resumed", "k2", created_at=base + timedelta(minutes=1))])
    await store.end_session("resumed", end_time=datetime.now(UTC) + timedelta(minutes=1))

    due = await store.sessions_needing_summary(stale_before=stale_before, limit=10)
    assert [s.session_id for s in due] == ["stale-live", "ended-unsummarised", "resumed"]
    resumed = due[2]
    assert (resumed.last_message_id, resumed.summarized_through, resumed.up_to_date) == (latest, first, False)
    assert [s.session_id for s in await store.sessions_needing_summary(stale_before=stale_before, limit=2)] == [
        "stale-live",
        "ended-unsummarised",
    ]


async def test_a_reconnect_without_new_messages_keeps_the_summary_up_to_date(store: Store) -> None:
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    await store.open_session("s1", owner_id=None, now=base)
    _, answer = await store.append_events([event("s1", "q", created_at=base), event("s1", "a", type_=AI_MESSAGE)])
    await store.end_session("s1", end_time=base + timedelta(minutes=1))
    assert await store.save_summary("s1", summary="q and a", through_event_id=answer, end_time=base)

    # The user comes back, says nothing, and leaves again.
    await store.open_session("s1", owner_id=None, now=base + timedelta(minutes=30))
    await store.append_events(
        [
            event("s1", "c", type_=CONNECTED, created_at=base + timedelta(minutes=30)),
            event("s1", "d", type_=DISCONNECTED, created_at=base + timedelta(minutes=31)),
        ]
    )
    await store.end_session("s1", end_time=datetime.now(UTC) + timedelta(minutes=1))

    state = await store.summary_state("s1")
    assert state is not None
    assert (state.last_message_id, state.summarized_through, state.up_to_date) == (answer, answer, True)
    assert await store.sessions_needing_summary(stale_before=datetime.now(UTC), limit=10) == []
    (ended,) = await store.ended_sessions(limit=10)
    assert (ended.last_message_id, ended.up_to_date) == (answer, True)


async def test_ended_sessions_by_start_time_window_oldest_first(store: Store) -> None:
    for session_id, started, ends in [
        ("c", T0 + timedelta(hours=2), True),
        ("a", T0, True),
        ("b", T0 + timedelta(hours=1), True),
        ("live", T0 + timedelta(hours=1), False),
    ]:
        await store.open_session(session_id, owner_id=None, now=started)
        if ends:
            await store.end_session(session_id, end_time=started + timedelta(minutes=5))
    (last,) = await store.append_events([event("b", "k", created_at=T0 + timedelta(hours=1, minutes=1))])

    async def ended(**window: Any) -> list[str]:
        return [s.session_id for s in await store.ended_sessions(**window)]

    assert await ended(limit=10) == ["a", "b", "c"]
    assert await ended(started_after=T0 + timedelta(hours=1), limit=10) == ["b", "c"]
    assert await ended(started_before=T0 + timedelta(hours=2), limit=10) == ["a", "b"]
    assert await ended(started_after=T0 + timedelta(hours=1), started_before=T0 + timedelta(hours=2), limit=10) == ["b"]
    assert await ended(limit=1) == ["a"]

    b = (await store.ended_sessions(started_after=T0 + timedelta(hours=1), limit=1))[0]
    assert (b.start_time, b.end_time) == (T0 + timedelta(hours=1), T0 + timedelta(hours=1, minutes=5))
    assert (b.last_message_id, b.last_message_at, b.summarized_through) == (
        last,
        T0 + timedelta(hours=1, minutes=1),
        None,
    )


# Picking a backend


async def test_open_store_picks_the_backend_from_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = await open_store(Settings(database_url="sqlite:///data/app.db"))
    try:
        assert relative.name == "sqlite"
        assert (tmp_path / "data" / "app.db").is_file()
    finally:
        await relative.close()

    absolute = await open_store(Settings(database_url=f"sqlite:///{tmp_path / 'abs' / 'app.db'}"))
    await absolute.close()
    assert (tmp_path / "abs" / "app.db").is_file()

    postgres = await open_store(Settings(database_url=pg_url()))
    try:
        assert postgres.name == "postgres"
        await postgres.ping()
    finally:
        await postgres.close()


async def test_open_store_picks_supabase_when_only_its_settings_are_set(postgrest: FakePostgREST) -> None:
    supabase: dict[str, Any] = {
        "supabase_url": postgrest.url,
        "supabase_service_role_key": postgrest.key("service_role"),
    }
    chosen = await open_store(Settings(**supabase))
    try:
        assert chosen.name == "supabase"
        await chosen.ping()
    finally:
        await chosen.close()

    # DATABASE_URL, when set, wins: moving between backends is a matter of configuration.
    postgres = await open_store(Settings(database_url=pg_url(), **supabase))
    try:
        assert postgres.name == "postgres"
    finally:
        await postgres.close()

    with pytest.raises(ConfigError, match="SUPABASE_SERVICE_ROLE_KEY"):
        await open_store(Settings(supabase_url=postgrest.url))


# Migrations


def migration_names(url: str) -> list[str]:
    return [p.name for p in (sqlite_migrations() if url.startswith("sqlite:") else postgres_migrations())]


async def test_migrating_twice_applies_nothing_the_second_time(empty_db: str) -> None:
    assert await migrate_url(empty_db) == migration_names(empty_db)
    assert await migrate_url(empty_db) == []
    assert await tables(empty_db) == {"schema_migrations", "sessions", "session_events"}


async def test_migrations_apply_in_name_order_each_once(empty_db: str, tmp_path: Path) -> None:
    sql_dir = tmp_path / "sql"
    write_migration(sql_dir, "002_b.sql", "create table b (x integer references a(x));")
    write_migration(sql_dir, "001_a.sql", "-- the first\ncreate table a (x integer primary key);\n")
    assert await migrate_url(empty_db, sql_dir=sql_dir) == ["001_a.sql", "002_b.sql"]

    write_migration(sql_dir, "003_c.sql", "create table c (y text default 'a;b'); create index c_y on c (y);")
    assert await migrate_url(empty_db, sql_dir=sql_dir) == ["003_c.sql"]
    assert await tables(empty_db) == {"schema_migrations", "a", "b", "c"}


async def test_a_failed_migration_leaves_nothing_behind_and_runs_again_once_fixed(
    empty_db: str, tmp_path: Path
) -> None:
    sql_dir = tmp_path / "sql"
    write_migration(sql_dir, "001_a.sql", "create table a (x integer);")
    write_migration(sql_dir, "002_b.sql", "create table b (x integer); insert into no_such_table values (1);")
    with pytest.raises((asyncpg.PostgresError, sqlite3.Error)):
        await migrate_url(empty_db, sql_dir=sql_dir)
    assert await tables(empty_db) == {"schema_migrations", "a"}

    write_migration(sql_dir, "002_b.sql", "create table b (x integer);")
    assert await migrate_url(empty_db, sql_dir=sql_dir) == ["002_b.sql"]


async def test_processes_migrating_at_once_apply_each_migration_once(pg_schema: str) -> None:
    results = await asyncio.gather(*(migrate_postgres(pg_schema) for _ in range(4)))
    # Each migration is applied by exactly one of them (which one may change from one migration to the next: the
    # lock is taken per migration), in order within each.
    applied = [name for names in results for name in names]
    assert sorted(applied) == sorted(migration_names(pg_schema))
    assert all(names == sorted(names) for names in results)


async def test_init_upgrades_the_seed_tables_in_place_and_keeps_their_rows(pg_schema: str) -> None:
    conn = await asyncpg.connect(pg_schema)
    try:
        await conn.execute(SEED_SQL)
        await conn.execute("insert into sessions values ('legacy', '2024-01-01T10:00:00Z', null, 'a summary')")
        await conn.execute(
            "insert into session_events (session_id, event_type, content) values ('legacy', 'user_message', 'hi')"
        )
        assert await migrate_postgres(conn) == migration_names(pg_schema)
    finally:
        await conn.close()

    store = await PostgresStore.connect(pg_schema)
    try:
        legacy = await store.get_session("legacy")
        assert legacy is not None
        assert (legacy.summary, legacy.owner_id, legacy.message_count) == ("a summary", None, 1)
        (old,) = await store.events("legacy")
        assert (old.content, old.metadata, old.client_msg_id) == ("hi", {}, None)
        # The upgraded tables take new, idempotent writes next to the old rows.
        ids = await store.append_events([event("legacy", "k1"), event("legacy", "k1")])
        assert ids[0] == ids[1] > old.id
    finally:
        await store.close()


def test_migrate_command_prints_what_it_applied_then_up_to_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'cli' / 'app.db'}"
    assert migrate_main([url]) == 0
    assert capsys.readouterr().out == "".join(f"applied {name}\n" for name in migration_names(url))
    assert migrate_main([url]) == 0
    assert capsys.readouterr().out == "up to date\n"


def test_migrate_command_reports_an_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    assert migrate_main([f"postgresql://postgres@127.0.0.1:{closed_port()}/x"]) == 1
    assert "migration failed" in capsys.readouterr().err


# PostgreSQL failures


async def test_a_closed_port_is_store_unavailable_within_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await PostgresStore.connect(f"postgresql://postgres@127.0.0.1:{closed_port()}/x", connect_timeout=1.0)
    assert time.monotonic() - started < 1.5


async def test_a_server_that_never_answers_is_store_unavailable_within_the_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, then say nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await PostgresStore.connect(f"postgresql://postgres@127.0.0.1:{port}/x", connect_timeout=0.5)
        assert time.monotonic() - started < 2.0
    finally:
        server.close()
        await server.wait_closed()


async def test_a_hung_query_is_store_unavailable_after_the_command_timeout(pg_schema: str) -> None:
    store = await PostgresStore.connect(pg_schema, command_timeout=0.5)
    blocker = await asyncpg.connect(pg_schema)
    try:
        async with blocker.transaction():
            await blocker.execute("lock table sessions in access exclusive mode")
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.open_session("s1", owner_id=None, now=T0)
            assert time.monotonic() - started < 1.5
        # The lock is gone: the same store carries on.
        assert (await store.open_session("s1", owner_id=None, now=T0)).created
    finally:
        await blocker.close()
        await store.close()


async def test_the_pool_recovers_when_the_server_drops_its_connections() -> None:
    app = f"store_test_{secrets.token_hex(4)}"
    store = await PostgresStore.connect(with_params(pg_url(), application_name=app), min_size=2, max_size=2)
    admin = await asyncpg.connect(pg_url())
    try:
        await store.ping()
        killed = await admin.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = $1", app
        )
        assert killed == 2
        await asyncio.sleep(0.2)
        for _ in range(3):
            await store.ping()
        assert await store.list_sessions(limit=1) is not None
    finally:
        await admin.close()
        await store.close()


# Supabase: requests, failures and what errors say


async def test_a_batch_of_events_is_one_request_and_reads_page_past_the_row_cap(postgrest: FakePostgREST) -> None:
    await empty_tables()
    # A cap of 2 rows per read, as a project whose Max Rows is 2 would have.
    store = await SupabaseStore.connect(postgrest.url, postgrest.key("service_role"), page_size=2)
    try:
        await store.open_session("s1", owner_id=None, now=T0)
        postgrest.reset()
        ids = await store.append_events([event("s1", f"k{i}") for i in range(5)])
        assert postgrest.requests == [("POST", "/rest/v1/rpc/chat_append_events")]

        assert [e.id for e in await store.events("s1")] == ids
        assert [e.id for e in await store.events("s1", after=ids[0])] == ids[1:]
        assert [e.id for e in await store.events("s1", limit=3)] == ids[2:]
        assert [e.id for e in await store.events("s1", limit=5)] == ids
    finally:
        await store.close()


async def test_an_unavailable_project_is_store_unavailable_and_the_next_call_works(
    supabase: SupabaseStore, postgrest: FakePostgREST
) -> None:
    await supabase.open_session("s1", owner_id=None, now=T0)
    postgrest.fail_next(Failure(status=503), Failure(status=504), Failure(status=500))
    for call in (supabase.ping(), supabase.events("s1"), supabase.append_events([event("s1", "k")])):
        with pytest.raises(StoreUnavailable, match="HTTP 50"):
            await call
    assert await supabase.events("s1") == []
    await supabase.append_events([event("s1", "k")])
    assert len(await supabase.events("s1")) == 1


async def test_a_write_whose_answer_is_lost_is_retried_without_storing_twice(
    supabase: SupabaseStore, postgrest: FakePostgREST
) -> None:
    await supabase.open_session("s1", owner_id=None, now=T0)
    batch = [event("s1", "a", client_msg_id="m-a"), event("s1", "b")]
    # The database commits, then the connection drops before the answer: the caller cannot know.
    postgrest.fail_next(Failure(drop=True, after_commit=True))
    with pytest.raises(StoreUnavailable):
        await supabase.append_events(batch)

    ids = await supabase.append_events(batch)
    assert [e.id for e in await supabase.events("s1")] == ids
    assert [e.content for e in await supabase.events("s1")] == ["text a", "text b"]


async def test_a_project_that_does_not_answer_is_store_unavailable_within_the_timeout(
    supabase: SupabaseStore, postgrest: FakePostgREST
) -> None:
    postgrest.fail_next(Failure(status=None, delay=1.0))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="ReadTimeout"):
        await supabase.ping()  # the fixture's store waits 0.5 s for an answer
    assert time.monotonic() - started < 1.0


async def test_an_unreachable_project_is_store_unavailable_at_connect() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await SupabaseStore.connect(f"http://127.0.0.1:{closed_port()}", "key", connect_timeout=1.0)
    assert time.monotonic() - started < 1.5


async def test_a_key_that_is_not_the_service_role_key_is_refused_at_connect(postgrest: FakePostgREST) -> None:
    with pytest.raises(StoreError) as anon:
        await SupabaseStore.connect(postgrest.url, postgrest.key("anon"))
    assert not isinstance(anon.value, StoreUnavailable)
    assert "42501" in str(anon.value)  # permission denied for the functions

    with pytest.raises(StoreError) as forged:
        await SupabaseStore.connect(postgrest.url, "not-a-key")
    assert not isinstance(forged.value, StoreUnavailable)
    assert "Invalid API key" in str(forged.value)


async def test_a_refusal_names_the_postgrest_code_but_no_row_values_or_keys(supabase: SupabaseStore) -> None:
    await supabase.open_session("s1", owner_id=None, now=T0)
    await supabase.append_events([event("s1", "key-one", client_msg_id="secret-msg-id", content="private words")])
    with pytest.raises(StoreError) as refused:
        await supabase.append_events([event("s1", "key-two", client_msg_id="secret-msg-id", content="private words")])
    text = str(refused.value)
    assert "23505" in text and "session_events_session_id_client_msg_id_key" in text
    for secret in ("secret-msg-id", "private words", "key-two", "s1"):
        assert secret not in text


async def test_a_sessions_record_sums_its_answers_token_usage(store: Store) -> None:
    await store.open_session("u1", owner_id=None, now=T0)
    await store.append_events(
        [
            event("u1", "u1", metadata={"prompt_tokens": 999}),  # not an answer: not counted
            event("u1", "a1", type_=AI_MESSAGE, metadata={"prompt_tokens": 12, "completion_tokens": 5}),
            event("u1", "a2", type_=AI_MESSAGE, metadata={"prompt_tokens": 30, "completion_tokens": None}),
            event("u1", "a3", type_=AI_MESSAGE, metadata={"status": "cancelled"}),
        ]
    )
    record = await store.get_session("u1")
    assert record is not None and (record.prompt_tokens, record.completion_tokens) == (42, 5)
    [listed] = [r for r in await store.list_sessions(limit=10) if r.session_id == "u1"]
    assert (listed.prompt_tokens, listed.completion_tokens) == (42, 5)
