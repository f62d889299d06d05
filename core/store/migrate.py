"""Applies the numbered SQL migrations in `sql/` (PostgreSQL) and `sql/sqlite/` (SQLite), each once, in name order."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import aiosqlite
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..errors import AppError
from ..settings import REPO_ROOT, Settings

SQL_DIR = REPO_ROOT / "sql"

# Any constant works, as long as every migrating process uses the same one.
_LOCK_KEY = 0x5254_4149_4D49_4752  # "RTAIMIGR"

_PG_TABLE = "create table if not exists schema_migrations (name text primary key, applied_at timestamptz default now())"
_SQLITE_TABLE = (
    "create table if not exists schema_migrations"
    " (name text primary key, applied_at text default (strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now')))"
)

PgConnection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"


def postgres_migrations(sql_dir: Path = SQL_DIR) -> list[Path]:
    return sorted(sql_dir.glob("*.sql"))


def sqlite_migrations(sql_dir: Path = SQL_DIR) -> list[Path]:
    return sorted((sql_dir / "sqlite").glob("*.sql"))


async def migrate_postgres(
    conn_or_dsn: PgConnection | str, *, sql_dir: Path = SQL_DIR, connect_timeout: float = 10.0
) -> list[str]:
    """Apply the pending PostgreSQL migrations; return the names applied (empty when up to date).

    Each migration runs in its own transaction with its `schema_migrations` row, under a transaction-level
    advisory lock, so processes starting together apply each one exactly once (and it also works through a
    transaction-mode pooler, which a session lock would not).
    """
    if not isinstance(conn_or_dsn, str):
        return await _migrate_postgres(conn_or_dsn, sql_dir)
    conn: asyncpg.Connection[Any] = await asyncpg.connect(conn_or_dsn, timeout=connect_timeout)
    try:
        return await _migrate_postgres(conn, sql_dir)
    finally:
        await conn.close()


async def _migrate_postgres(conn: PgConnection, sql_dir: Path) -> list[str]:
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(_PG_TABLE)
    done = {row["name"] for row in await conn.fetch("select name from schema_migrations")}
    applied: list[str] = []
    for path in postgres_migrations(sql_dir):
        if path.name in done:
            continue
        sql = path.read_text(encoding="utf-8")
        async with conn.transaction():
            await conn.execute("select pg_advisory_xact_lock($1)", _LOCK_KEY)
            # Another process may have applied it while we waited for the lock.
            if await conn.fetchval("select 1 from schema_migrations where name = $1", path.name):
                continue
            # No arguments: the simple query protocol, which runs a file of several statements.
            await conn.execute(sql)
            await conn.execute("insert into schema_migrations (name) values ($1)", path.name)
        applied.append(path.name)
    return applied


async def migrate_sqlite(db: aiosqlite.Connection, *, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the pending SQLite migrations; return the names applied. `db` must be in autocommit mode.

    `begin immediate` takes SQLite's write lock, which serializes processes that migrate the same file.
    """
    await db.execute(_SQLITE_TABLE)
    applied: list[str] = []
    for path in sqlite_migrations(sql_dir):
        statements = _split_sqlite(path.read_text(encoding="utf-8"))
        await db.execute("begin immediate")
        try:
            async with db.execute("select 1 from schema_migrations where name = ?", (path.name,)) as cursor:
                if await cursor.fetchone() is not None:
                    await db.execute("rollback")
                    continue
            # Statement by statement: `executescript` would commit first and break the transaction.
            for statement in statements:
                await db.execute(statement)
            await db.execute("insert into schema_migrations (name) values (?)", (path.name,))
            await db.execute("commit")
        except BaseException:
            if db.in_transaction:
                await db.execute("rollback")
            raise
        applied.append(path.name)
    return applied


def _split_sqlite(script: str) -> list[str]:
    """The script's statements; `sqlite3.complete_statement` knows about quotes, comments and trigger bodies."""
    statements: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            statements.append(current)
            current = ""
    if current.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement at the end of the script: {current.strip()[:80]!r}")
    return [s for s in statements if s.strip(" \t\r\n;") and not _only_comments(s)]


def _only_comments(statement: str) -> bool:
    lines = (line.strip() for line in statement.splitlines())
    return all(not line or line.startswith("--") or line == ";" for line in lines)


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:///relative/path` or `sqlite:////absolute/path` URL (or `:memory:`)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"not an SQLite URL: {url!r} (expected sqlite:///path/to/file.db)")
    return url[len(prefix) :]


async def migrate_url(url: str, *, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the migrations to the database at `url` (postgresql://, postgres:// or sqlite:///)."""
    if url.startswith(("postgresql://", "postgres://")):
        return await migrate_postgres(url, sql_dir=sql_dir)
    path = sqlite_path(url)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    async with aiosqlite.connect(path, isolation_level=None) as db:
        return await migrate_sqlite(db, sql_dir=sql_dir)


def main(argv: Sequence[str]) -> int:
    """`python -m server migrate [DATABASE_URL]`: print each migration applied, or "up to date"."""
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m server migrate [DATABASE_URL]", file=sys.stderr)
        return 2
    try:
        url = argv[0] if argv else Settings.from_env().database_url_or_default
        applied = asyncio.run(migrate_url(url))
    except (AppError, ValueError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, sqlite3.Error) as e:
        print(f"migration failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("up to date")
    return 0
