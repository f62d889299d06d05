"""What a Supabase project has and plain PostgreSQL lacks, for tests: its roles, a minimal `auth` schema, grants."""

from __future__ import annotations

import orjson

from core.store.migrate import SQL_DIR, PgConnection, migrate_postgres, postgres_migrations

SUPABASE_MIGRATION = SQL_DIR / "003_supabase.sql"

# Any constant works, as long as every fixture that sets up roles uses the same one.
_LOCK_KEY = 0x5355_5041_4155_5448  # "SUPAAUTH"

# Roles are cluster-wide, and tests running against one cluster may create them at the same time.
_ROLES = """
do $$
begin
    if not exists (select from pg_roles where rolname = 'anon') then
        create role anon nologin noinherit;
    end if;
    if not exists (select from pg_roles where rolname = 'authenticated') then
        create role authenticated nologin noinherit;
    end if;
    if not exists (select from pg_roles where rolname = 'service_role') then
        create role service_role nologin noinherit bypassrls;
    end if;
end
$$;
"""

# As Supabase defines them: PostgREST puts the request's JWT claims in these settings.
_AUTH = """
create schema if not exists auth;

create or replace function auth.uid() returns uuid language sql stable as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    )::uuid
$$;

create or replace function auth.role() returns text language sql stable as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim.role', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
    )::text
$$;

create or replace function auth.jwt() returns jsonb language sql stable as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
    )::jsonb
$$;

grant usage on schema auth to anon, authenticated, service_role;
"""

# Supabase's defaults for the exposed schema: the API roles may use everything in it, now and later,
# and row level security is what keeps them to their own rows.
_GRANTS = """
grant usage on schema {schema} to anon, authenticated, service_role;
grant all on all tables in schema {schema} to anon, authenticated, service_role;
grant all on all sequences in schema {schema} to anon, authenticated, service_role;
alter default privileges in schema {schema} grant all on tables to anon, authenticated, service_role;
alter default privileges in schema {schema} grant all on sequences to anon, authenticated, service_role;
alter default privileges in schema {schema} grant all on functions to anon, authenticated, service_role;
"""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_auth_stand_in(conn: PgConnection, *, schema: str = "public") -> None:
    """Give the database Supabase's roles, `auth.uid()` and default grants on `schema`; safe to call again.

    Call it before the migrations run, as on Supabase, where 003_supabase finds all of this in place.
    """
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(_ROLES)
        await conn.execute(_AUTH)
        await conn.execute(_GRANTS.format(schema=_ident(schema)))


async def prepare_supabase_database(conn: PgConnection, *, schema: str = "public") -> None:
    """The auth stand-in, then every migration, so that `schema` looks like a Supabase project's."""
    await ensure_auth_stand_in(conn, schema=schema)
    await migrate_postgres(conn)
    # The test database is shared: another fixture may have applied 003 before the stand-in existed,
    # which leaves it without policies. Running it again is what the README tells a deployment to do,
    # and then the migrations after it, since 004 is where every function is granted to the service role.
    policies = await conn.fetchval(
        "select count(*) from pg_policies where schemaname = $1 and tablename in ('sessions', 'session_events')",
        schema,
    )
    if policies < 2:
        for path in postgres_migrations():
            if path.name >= SUPABASE_MIGRATION.name:
                await conn.execute(path.read_text(encoding="utf-8"))


async def as_role(conn: PgConnection, role: str, *, sub: str | None = None) -> None:
    """Switch this transaction to `role` with the JWT claims PostgREST would set (call inside a transaction)."""
    claims = {"role": role} if sub is None else {"role": role, "sub": sub}
    await conn.execute(
        "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true),"
        " set_config('request.jwt.claim.sub', coalesce($3, ''), true)",
        role,
        orjson.dumps(claims).decode(),
        sub,
    )
