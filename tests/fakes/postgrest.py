"""A stand-in for Supabase's hosted PostgREST, used by tests: the API subset the store uses, on real PostgreSQL.

Each request runs in one transaction as the role its JWT names (anon, authenticated or service_role), with the
claims set as PostgREST sets them, so row level security really applies. Whatever is not implemented here is
refused with PostgREST's error JSON, so code that passes against this stand-in uses nothing PostgREST lacks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import asyncpg
import jwt
import orjson
from aiohttp import web

from core.store.migrate import PgConnection
from tests.fakes.postgrest_tables import NAME, Refused, Statement, Table, ident, json_body, unsupported

JWT_SECRET = "a-test-jwt-secret-of-at-least-32-characters"
ROLES = ("anon", "authenticated", "service_role")
_PREFERENCES = {
    "return=minimal",
    "return=representation",
    "resolution=merge-duplicates",
    "resolution=ignore-duplicates",
    "count=exact",
}
# PostgREST's mapping of SQLSTATE to HTTP status (docs: references/errors, "HTTP Status Codes").
_STATUS_EXACT = {"23503": 409, "23505": 409, "25006": 405, "53400": 500, "P0001": 400, "42883": 404, "42P01": 404}
_STATUS_CLASS = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500, "39": 500}
_STATUS_CLASS |= {"3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500, "F0": 500, "HV": 500}
_STATUS_CLASS |= {"P0": 500, "XX": 500}


def sign_jwt(claims: dict[str, Any], secret: str = JWT_SECRET) -> str:
    """An HS256 JWT, as Supabase signs its API keys and its users' access tokens."""
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_jwt(token: str, secret: str = JWT_SECRET) -> dict[str, Any]:
    """The claims of a token signed with `secret`; ValueError (with PostgREST's wording) when it is not valid."""
    parts = token.count(".") + 1
    if parts != 3:
        raise ValueError(f"Expected 3 parts in JWT; got {parts}")
    try:
        # PostgREST checks `aud` only when configured to, and Supabase's PostgREST is not.
        claims: dict[str, Any] = jwt.decode(token, secret, algorithms=["HS256"], options={"verify_aud": False})
    except jwt.ExpiredSignatureError as e:
        raise ValueError("JWT expired") from e
    except jwt.InvalidTokenError as e:
        raise ValueError("JWSError JWSInvalidSignature") from e
    return claims


def api_key(role: str, secret: str = JWT_SECRET) -> str:
    """A project API key like Supabase's legacy ones: `anon` (may reach a browser) or `service_role` (must not)."""
    now = int(time.time())
    return sign_jwt({"iss": "supabase", "ref": "test", "role": role, "iat": now, "exp": now + 10 * 365 * 86400}, secret)


def user_token(sub: str, secret: str = JWT_SECRET, *, expires_in: int = 3600) -> str:
    """A signed-in user's access token, as Supabase Auth issues it."""
    now = int(time.time())
    claims = {"sub": sub, "role": "authenticated", "aud": "authenticated", "iat": now, "exp": now + expires_in}
    return sign_jwt(claims, secret)


def _status_for(sqlstate: str, role: str) -> int:
    if sqlstate == "42501":
        return 401 if role == "anon" else 403
    return _STATUS_EXACT.get(sqlstate) or _STATUS_CLASS.get(sqlstate[:2], 400)


@dataclass(frozen=True)
class Failure:
    """What the stand-in does to one request instead of (or after) answering it."""

    status: int | None = 503  # the error to answer with; None: the usual answer (after `delay`)
    drop: bool = False  # close the connection without an answer
    after_commit: bool = False  # do the work and commit it first: the answer is lost, the write is not
    delay: float = 0.0

    @property
    def fails(self) -> bool:
        return self.drop or self.status is not None


class FakePostgREST:
    """Serves `/rest/v1` on 127.0.0.1 like a Supabase project's PostgREST, over `dsn`, exposing `schema`."""

    def __init__(self, dsn: str, *, schema: str = "public", jwt_secret: str = JWT_SECRET) -> None:
        self.url = ""
        self.schema = schema
        self.requests: list[tuple[str, str]] = []
        self._dsn, self._secret = dsn, jwt_secret
        self._failures: deque[Failure] = deque()
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=10)
        app = web.Application()
        app.router.add_route("*", "/rest/v1/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._pool is not None:
            await self._pool.close()

    def reset(self) -> None:
        self.requests.clear()
        self._failures.clear()

    def fail_next(self, *failures: Failure) -> None:
        """Apply these to the next requests, one each."""
        self._failures.extend(failures)

    def key(self, role: str) -> str:
        return api_key(role, self._secret)

    # Requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            await asyncio.sleep(failure.delay)
            if failure.fails and not failure.after_commit:
                return self._fail(request, failure)
        try:
            claims = self._authenticate(request)
            response = await self._dispatch(request, claims)
        except Refused as e:
            response = e.response()
        return self._fail(request, failure) if failure is not None and failure.fails else response

    def _fail(self, request: web.Request, failure: Failure) -> web.Response:
        if failure.drop:
            assert request.transport is not None
            request.transport.close()  # nobody reads what the handler returns now
            return web.Response(status=499)
        assert failure.status is not None
        return Refused(failure.status, "PGRST001", "Database client error. Retrying the connection.").response()

    def _authenticate(self, request: web.Request) -> dict[str, Any]:
        """The JWT claims the request runs with; like Supabase's gateway, it needs a valid project key in `apikey`."""
        key = request.headers.get("apikey")
        if not key:
            hint = "No `apikey` request header or url param was found."
            raise Refused(401, "", "No API key found in request", hint=hint)
        try:
            valid = verify_jwt(key, self._secret).get("role") in ("anon", "service_role")
        except ValueError:
            valid = False
        if not valid:
            hint = "Double check your Supabase `anon` or `service_role` API key."
            raise Refused(401, "", "Invalid API key", hint=hint)
        authorization = request.headers.get("Authorization")
        if authorization is None:
            return {"role": "anon"}
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Refused(401, "PGRST301", "Invalid Authorization header")
        try:
            claims = verify_jwt(token.strip(), self._secret)
        except ValueError as e:
            raise Refused(401, "PGRST301", str(e)) from e
        claims.setdefault("role", "anon")
        if claims["role"] not in ROLES:
            raise Refused(401, "PGRST301", f"the stand-in knows no role {claims['role']!r}")
        return claims

    async def _dispatch(self, request: web.Request, claims: dict[str, Any]) -> web.Response:
        reading = request.method in ("GET", "HEAD")
        profile = request.headers.get("Accept-Profile" if reading else "Content-Profile", self.schema)
        if profile != self.schema:
            hint = f"Only the following schemas are exposed: {self.schema}"
            raise Refused(406, "PGRST106", f"Invalid schema: {profile}", hint=hint)
        if request.headers.get("Accept", "application/json").split(";")[0].strip() not in ("application/json", "*/*"):
            raise unsupported(f"the media type {request.headers['Accept']!r} (Accept)")
        if "Range" in request.headers:
            raise unsupported("the Range header (use limit and offset)")
        prefer = {p.strip() for value in request.headers.getall("Prefer", []) for p in value.split(",") if p.strip()}
        if prefer - _PREFERENCES:
            raise unsupported(f"the preferences {sorted(prefer - _PREFERENCES)}")
        body = await request.read() if not reading else b""
        path = request.match_info["path"]
        query = list(request.query.items())
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=5) as conn, conn.transaction(readonly=reading):
                if path.startswith("rpc/"):
                    if request.method != "POST":
                        raise Refused(405, "PGRST101", "the stand-in calls functions with POST only")
                    if query or prefer - {"return=representation", "return=minimal"}:
                        raise unsupported("filters, modifiers or preferences on function results")
                    return await self._rpc(conn, claims, path[4:], body)
                table = await self._table(conn, path)
                statement = Statement(table, self.schema, query, prefer, request.method, body)
                return await statement.run(conn, lambda: self._become(conn, claims))
        except asyncpg.PostgresError as e:
            raise Refused(
                _status_for(e.sqlstate or "XX000", claims["role"]),
                e.sqlstate or "XX000",
                getattr(e, "message", None) or str(e),
                details=getattr(e, "detail", None),
                hint=getattr(e, "hint", None),
            ) from e
        except TimeoutError as e:  # before OSError, which it is a kind of
            raise Refused(504, "PGRST003", "Timed out acquiring connection from connection pool.") from e
        except (OSError, asyncpg.InterfaceError) as e:
            raise Refused(503, "PGRST001", "Database client error. Retrying the connection.") from e

    async def _become(self, conn: PgConnection, claims: dict[str, Any]) -> None:
        """Run the rest of this transaction as PostgREST would: the JWT's role, its claims in settings."""
        await conn.execute(
            "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true),"
            " set_config('request.jwt.claim.sub', $3, true), set_config('request.jwt.claim.role', $1, true),"
            " set_config('search_path', $4, true)",
            claims["role"],
            orjson.dumps(claims).decode(),
            str(claims.get("sub") or ""),
            f"{ident(self.schema)}, public",
        )

    async def _table(self, conn: PgConnection, name: str) -> Table:
        qualified = f"{ident(self.schema)}.{ident(name)}"
        rows = await conn.fetch(
            "select a.attname, format_type(a.atttypid, a.atttypmod) as type, coalesce(i.indisprimary, false) as pk"
            " from pg_attribute a left join pg_index i on i.indrelid = a.attrelid and i.indisprimary"
            " and a.attnum = any(i.indkey) where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped"
            " order by a.attnum",
            qualified,
        )
        if not NAME.fullmatch(name) or not rows:
            raise Refused(404, "PGRST205", f"Could not find the table '{self.schema}.{name}' in the schema cache")
        return Table(name, {r["attname"]: r["type"] for r in rows}, [r["attname"] for r in rows if r["pk"]])

    async def _rpc(self, conn: PgConnection, claims: dict[str, Any], name: str, body: bytes) -> web.Response:
        args = json_body(body or b"{}")
        if not isinstance(args, dict):
            raise Refused(400, "PGRST102", "the stand-in takes a function's arguments as one JSON object")
        candidates = await conn.fetch(
            "select p.oid::regprocedure::text as signature, p.proargnames[1:p.pronargs] as names, p.proargmodes,"
            " array(select format_type(t, null) from unnest(p.proargtypes) t) as types, p.pronargdefaults,"
            " p.proretset, format_type(p.prorettype, null) as result"
            " from pg_proc p where p.pronamespace = to_regnamespace($1) and p.proname = $2",
            ident(self.schema),
            name,
        )
        fits = [
            c
            for c in candidates
            if c["proargmodes"] is None
            and set(args) <= set(c["names"] or [])
            and set((c["names"] or [])[: len(c["types"]) - c["pronargdefaults"]]) <= set(args)
        ]
        if len(fits) != 1:
            listed = ", ".join(sorted(args))
            raise Refused(
                404 if not fits else 300,
                "PGRST202" if not fits else "PGRST203",
                f"Could not find the function {self.schema}.{name}({listed}) in the schema cache",
                hint="If a new function was created in the database with this name and parameters, "
                "try reloading the schema cache.",
            )
        (fn,) = fits
        if fn["proretset"]:
            raise unsupported("functions that return sets")
        types = dict(zip(fn["names"], fn["types"], strict=True))
        call = f"{ident(self.schema)}.{ident(name)}({', '.join(f'{ident(a)} := _.{ident(a)}' for a in args)})"
        await self._become(conn, claims)
        if args:
            columns = ", ".join(f"{ident(a)} {types[a]}" for a in args)
            sql = f"select to_json({call})::text from json_to_record($1::json) as _({columns})"
            result = await conn.fetchval(sql, body.decode())
        else:
            result = await conn.fetchval(f"select to_json({call})::text")
        if fn["result"] == "void":
            return web.Response(status=204)
        return web.Response(status=200, text=result or "null", content_type="application/json", charset="utf-8")
