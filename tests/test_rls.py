"""Row level security from sql/003_supabase.sql, proven row by row: through the PostgREST stand-in with real JWTs,
and directly in SQL as each role."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio

from tests.fakes.postgrest import FakePostgREST, sign_jwt, user_token
from tests.supabase_env import as_role, prepare_supabase_database

ALICE = str(uuid.uuid4())
BOB = str(uuid.uuid4())
SESSIONS = {"alice-1": ALICE, "alice-2": ALICE, "bob-1": BOB, "nobody-1": None}


def pg_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.fail("TEST_DATABASE_URL is not set: run the tests with `make test`", pytrace=False)
    return url


@dataclass
class Project:
    """A fresh schema migrated the way a Supabase project is, the stand-in serving it, and a superuser connection."""

    postgrest: FakePostgREST
    admin: asyncpg.Connection
    schema: str


@pytest_asyncio.fixture(scope="module")
async def project() -> AsyncIterator[Project]:
    schema = f"rls_{secrets.token_hex(6)}"
    parts = urlsplit(pg_url())
    url = urlunsplit(parts._replace(query="&".join(q for q in (parts.query, urlencode({"search_path": schema})) if q)))
    admin = await asyncpg.connect(pg_url())
    await admin.execute(f"create schema {schema}")
    conn = await asyncpg.connect(url)
    fake = FakePostgREST(url, schema=schema)
    try:
        # As on Supabase: the auth schema and the roles first, then every migration.
        await prepare_supabase_database(conn, schema=schema)
        await fake.start()
        yield Project(fake, conn, schema)
    finally:
        await fake.close()
        await conn.close()
        await admin.execute(f"drop schema {schema} cascade")
        await admin.close()


@pytest_asyncio.fixture
async def seeded(project: Project) -> Project:
    """Alice's two sessions, Bob's one and one without an owner, two events each."""
    await project.admin.execute("truncate session_events, sessions restart identity cascade")
    for session_id, owner in SESSIONS.items():
        await project.admin.execute(
            "insert into sessions (session_id, start_time, owner_id) values ($1, now(), $2)", session_id, owner
        )
        await project.admin.execute(
            "insert into session_events (session_id, event_type, content, event_key)"
            " values ($1, 'user_message', 'hi', 'k1'), ($1, 'ai_message', 'hello', 'k2')",
            session_id,
        )
    return project


class Caller:
    """Talks to the stand-in as a browser or a server would: a project key in `apikey`, a JWT as the bearer."""

    def __init__(self, project: Project, key: str, token: str | None = None) -> None:
        self._project = project
        self._headers = {
            "apikey": key,
            "Authorization": f"Bearer {token or key}",
            "Accept-Profile": project.schema,
            "Content-Profile": project.schema,
        }

    async def __call__(
        self, method: str, path: str, *, json: Any = None, prefer: str | None = None, **params: str
    ) -> tuple[int, Any, dict[str, str]]:
        headers = dict(self._headers)
        if prefer:
            headers["Prefer"] = prefer
        url = f"{self._project.postgrest.url}/rest/v1/{path}"
        body = None if json is None else orjson.dumps(json)
        if body is not None:
            headers["Content-Type"] = "application/json"
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, url, params=params, data=body, headers=headers) as response,
        ):
            text = await response.read()
            return response.status, orjson.loads(text) if text else None, dict(response.headers)

    async def ids(self, table: str, column: str = "session_id") -> list[str]:
        status, rows, _ = await self("GET", table, select=column, order=f"{column}.asc")
        assert status == 200, rows
        return [r[column] for r in rows]


def service(project: Project) -> Caller:
    return Caller(project, project.postgrest.key("service_role"))


def anon(project: Project) -> Caller:
    return Caller(project, project.postgrest.key("anon"))


def user(project: Project, sub: str) -> Caller:
    return Caller(project, project.postgrest.key("anon"), user_token(sub))


async def stored_sessions(project: Project) -> dict[str, Any]:
    rows = await project.admin.fetch("select session_id, end_time from sessions order by session_id")
    return {r["session_id"]: r["end_time"] for r in rows}


# Through the API


async def test_the_service_role_reads_and_writes_every_row(seeded: Project) -> None:
    root = service(seeded)
    assert await root.ids("sessions") == sorted(SESSIONS)

    status, rows, headers = await root("GET", "session_events", select="id", prefer="count=exact", limit="3")
    assert (status, len(rows), headers["Content-Range"]) == (206, 3, "0-2/8")

    status, rows, _ = await root(
        "POST", "sessions", json={"session_id": "new", "owner_id": ALICE}, prefer="return=representation"
    )
    assert status == 201 and rows[0]["session_id"] == "new"
    status, rows, _ = await root(
        "POST",
        "sessions",
        json=[{"session_id": "new", "summary": "merged"}],
        prefer="return=representation,resolution=merge-duplicates",
        on_conflict="session_id",
    )
    assert status == 201 and (rows[0]["summary"], rows[0]["owner_id"]) == ("merged", ALICE)
    status, _, _ = await root("PATCH", "sessions", json={"end_time": "2024-05-01T12:00:00Z"}, session_id="eq.bob-1")
    assert status == 204
    status, _, _ = await root("DELETE", "sessions", session_id="eq.new")
    assert status == 204
    assert (await stored_sessions(seeded))["bob-1"] is not None and "new" not in await stored_sessions(seeded)


async def test_a_signed_in_user_sees_only_their_own_sessions_and_their_events(seeded: Project) -> None:
    alice, bob = user(seeded, ALICE), user(seeded, BOB)
    assert await alice.ids("sessions") == ["alice-1", "alice-2"]
    assert await alice.ids("session_events") == ["alice-1", "alice-1", "alice-2", "alice-2"]
    assert await bob.ids("sessions") == ["bob-1"]
    assert await bob.ids("session_events") == ["bob-1", "bob-1"]

    status, rows, headers = await alice("GET", "session_events", session_id="eq.bob-1", prefer="count=exact")
    assert (status, rows, headers["Content-Range"]) == (200, [], "*/0")
    assert await user(seeded, str(uuid.uuid4())).ids("sessions") == []


async def test_a_signed_in_user_cannot_write_even_their_own_rows(seeded: Project) -> None:
    alice = user(seeded, ALICE)
    before = await stored_sessions(seeded)

    status, error, _ = await alice("POST", "sessions", json={"session_id": "mine", "owner_id": ALICE})
    assert (status, error["code"]) == (403, "42501")
    assert set(error) == {"code", "details", "hint", "message"}
    status, error, _ = await alice(
        "POST", "session_events", json={"session_id": "alice-1", "event_type": "user_message", "event_key": "k9"}
    )
    assert (status, error["code"]) == (403, "42501")
    # No policy lets the update or delete see a row: they succeed and change nothing, as PostgREST answers.
    status, rows, _ = await alice(
        "PATCH", "sessions", json={"owner_id": BOB}, prefer="return=representation", session_id="eq.alice-1"
    )
    assert (status, rows) == (200, [])
    assert (await alice("DELETE", "session_events", session_id="eq.alice-1"))[0] == 204
    status, error, _ = await alice("POST", "rpc/chat_summary_state", json={"p_session_id": "alice-1"})
    assert (status, error["code"]) == (403, "42501")

    assert await stored_sessions(seeded) == before
    assert await seeded.admin.fetchval("select count(*) from session_events") == 8
    assert await seeded.admin.fetchval("select owner_id from sessions where session_id = 'alice-1'") == ALICE


async def test_the_anon_key_reads_nothing_and_writes_nothing(seeded: Project) -> None:
    visitor = anon(seeded)
    assert await visitor.ids("sessions") == []
    assert await visitor.ids("session_events") == []

    status, error, _ = await visitor("POST", "sessions", json={"session_id": "mine"})
    assert (status, error["code"]) == (401, "42501")
    status, rows, _ = await visitor(
        "PATCH", "sessions", json={"summary": "x"}, prefer="return=representation", session_id="eq.bob-1"
    )
    assert (status, rows) == (200, [])
    assert (await visitor("DELETE", "sessions", session_id="eq.nobody-1"))[0] == 204
    status, error, _ = await visitor(
        "POST", "rpc/chat_open_session", json={"p_session_id": "x", "p_owner_id": None, "p_now": None}
    )
    assert (status, error["code"]) == (401, "42501")

    assert sorted(await stored_sessions(seeded)) == sorted(SESSIONS)
    assert await seeded.admin.fetchval("select count(*) from sessions where summary is not null") == 0


async def test_tokens_the_project_did_not_sign_or_that_expired_are_refused(seeded: Project) -> None:
    anon_key = seeded.postgrest.key("anon")
    forged = sign_jwt({"sub": ALICE, "role": "authenticated"}, secret="another-projects-secret-of-32-chars!")
    for token, message in [
        (forged, "JWSError JWSInvalidSignature"),
        (user_token(ALICE, expires_in=-10), "JWT expired"),
    ]:
        status, error, _ = await Caller(seeded, anon_key, token)("GET", "sessions")
        assert (status, error["code"], error["message"]) == (401, "PGRST301", message)

    status, error, _ = await Caller(seeded, sign_jwt({"role": "service_role"}, secret="x" * 32))("GET", "sessions")
    assert (status, error["message"]) == (401, "Invalid API key")


async def test_the_stand_in_refuses_what_it_does_not_implement(seeded: Project) -> None:
    root = service(seeded)
    for params in (
        {"session_id": "not.eq.bob-1"},
        {"select": "session_id,session_events(id)"},
        {"owner_id": "like.a*"},
    ):
        status, error, _ = await root("GET", "sessions", **params)
        assert (status, error["code"]) == (400, "PGRST100"), params
    status, error, _ = await root("GET", "sessions", prefer="count=planned")
    assert (status, error["code"]) == (400, "PGRST100")
    status, error, _ = await root("GET", "no_such_table")
    assert (status, error["code"]) == (404, "PGRST205")
    status, error, _ = await root("POST", "rpc/chat_summary_state", json={"wrong_argument": "x"})
    assert (status, error["code"]) == (404, "PGRST202")


# Directly in SQL, as each role


async def test_the_policies_hold_in_sql_for_each_role(seeded: Project) -> None:
    conn = seeded.admin

    # Reads
    async def visible(role: str, table: str, *, sub: str | None = None) -> list[str]:
        async with conn.transaction():
            await as_role(conn, role, sub=sub)
            rows = await conn.fetch(f"select session_id from {table} order by session_id")
        return [r["session_id"] for r in rows]

    assert await visible("service_role", "sessions") == sorted(SESSIONS)
    assert await visible("authenticated", "sessions", sub=ALICE) == ["alice-1", "alice-2"]
    assert await visible("authenticated", "session_events", sub=BOB) == ["bob-1", "bob-1"]
    assert await visible("authenticated", "sessions") == [], "a token without a subject owns nothing"
    assert await visible("anon", "sessions") == []
    assert await visible("anon", "session_events") == []

    # Writes
    async def write(role: str, sql: str, *, sub: str | None = None) -> str:
        """The command tag, or the SQLSTATE it failed with; rolled back either way."""
        tr = conn.transaction()
        await tr.start()
        try:
            await as_role(conn, role, sub=sub)
            return await conn.execute(sql)
        except asyncpg.PostgresError as e:
            return e.sqlstate
        finally:
            await tr.rollback()

    insert = "insert into sessions (session_id, owner_id) values ('x', '{}')"
    assert await write("service_role", insert.format(ALICE)) == "INSERT 0 1"
    assert await write("authenticated", insert.format(ALICE), sub=ALICE) == "42501"
    assert await write("anon", insert.format(ALICE)) == "42501"
    for role, sub in [("authenticated", ALICE), ("anon", None)]:
        assert await write(role, "update sessions set summary = 'x'", sub=sub) == "UPDATE 0"
        assert await write(role, "delete from session_events", sub=sub) == "DELETE 0"
        assert await write(role, "truncate session_events", sub=sub) == "42501"
        assert await write(role, "select chat_summary_state('alice-1')", sub=sub) == "42501"
    assert await write("service_role", "select chat_summary_state('alice-1')") == "SELECT 1"
    assert await write("service_role", "update sessions set summary = 'x'") == "UPDATE 4"
