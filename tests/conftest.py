"""Shared fixtures: real PostgreSQL and Redis (started by `make test`), the LLM stand-in, and the app under test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient
from arq.worker import Worker
from redis.asyncio import Redis

from core.settings import REPO_ROOT, Settings
from core.store.migrate import migrate_postgres
from server.app import create_app
from tests.fakes.openai_server import FakeOpenAI
from tests.supabase_env import ensure_auth_stand_in
from worker.settings import worker_options


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(
            f"{name} is not set: run the tests with `make test`, which starts PostgreSQL and Redis for them",
            returncode=2,
        )
    return value


@pytest.fixture(scope="session")
def pg_url() -> str:
    return _required_env("TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _required_env("TEST_REDIS_URL")


@pytest_asyncio.fixture(scope="session")
async def _migrated(pg_url: str) -> str:
    conn = await asyncpg.connect(pg_url)
    try:
        # Supabase's roles and auth.uid() first, as on a Supabase project, so 003_supabase adds its policies.
        await ensure_auth_stand_in(conn)
        await migrate_postgres(conn)
    finally:
        await conn.close()
    return pg_url


@pytest_asyncio.fixture
async def db(_migrated: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to the test database, with both tables emptied first: tests read what the app stored."""
    conn = await asyncpg.connect(_migrated)
    await conn.execute("truncate session_events, sessions restart identity cascade")
    try:
        yield conn
    finally:
        # A fault-injection test may have restarted the server under this connection.
        conn.terminate()


class PostgresControl:
    """Stops and starts the test PostgreSQL for real (through `make test`'s pg-ctl), to inject outages."""

    def __init__(self, script: str, url: str) -> None:
        self._script = script
        self.url = url

    async def _run(self, *args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            self._script, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await proc.wait()

    async def stop(self) -> None:
        assert await self._run("stop", "-m", "fast") == 0, "could not stop PostgreSQL"

    async def start(self) -> None:
        if await self._run("status") != 0:
            assert await self._run("start") == 0, "could not start PostgreSQL"


@pytest_asyncio.fixture
async def postgres_control(pg_url: str) -> AsyncIterator[PostgresControl]:
    control = PostgresControl(os.path.join(_required_env("TEST_SERVICES_DIR"), "pg-ctl"), pg_url)
    try:
        yield control
    finally:
        await control.start()  # Whatever the test did, the next one finds the database up.


class RedisControl:
    """Stops and starts the test Redis for real (through `make test`'s redis-ctl)."""

    def __init__(self, script: str) -> None:
        self._script = script

    async def _run(self, command: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            self._script, command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        assert await proc.wait() == 0, f"redis-ctl {command} failed"

    async def stop(self) -> None:
        await self._run("stop")

    async def start(self) -> None:
        await self._run("start")


@pytest_asyncio.fixture
async def redis_control() -> AsyncIterator[RedisControl]:
    control = RedisControl(os.path.join(_required_env("TEST_SERVICES_DIR"), "redis-ctl"))
    try:
        yield control
    finally:
        await control.start()  # A no-op when it runs: the next test finds Redis up.


@pytest_asyncio.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(scope="session")
async def _fake_llm_server() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest_asyncio.fixture
async def fake_llm(_fake_llm_server: FakeOpenAI) -> FakeOpenAI:
    """The OpenAI-compatible stand-in, reset for each test."""
    _fake_llm_server.reset()
    return _fake_llm_server


@pytest.fixture
def settings(
    db: asyncpg.Connection, redis: Redis, fake_llm: FakeOpenAI, pg_url: str, redis_url: str, tmp_path: Path
) -> Settings:
    return Settings(
        database_url=pg_url,
        redis_url=redis_url,
        openai_base_url=fake_llm.base_url,
        openai_api_key="test-key",
        openai_model="fake-model",
        system_prompt="You are a test assistant.",
        llm_first_token_timeout_s=2.0,
        llm_token_gap_timeout_s=2.0,
        llm_retry_budget_s=2.0,
        llm_retry_after_cap_s=0.2,
        store_retry_max_s=0.5,
        shutdown_drain_s=1.0,
        worker_metrics_port=0,
        shutdown_flush_s=5.0,
        spool_dir=tmp_path / "spool",
        # The 1.0 suite runs with the 1.0 behaviour, which ON_DISCONNECT=cancel keeps; tests/test_resume.py
        # (and every test that says so) runs the 1.1 default.
        on_disconnect="cancel",
    )


AppClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest_asyncio.fixture
async def make_client(aiohttp_client: Any, settings: Settings) -> AppClientFactory:
    """Start the real app against the test services; keyword arguments override settings."""

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(settings.replace(**overrides)))  # type: ignore[no-any-return]

    return make


@pytest_asyncio.fixture
async def run_worker(settings: Settings) -> Callable[..., Awaitable[Worker]]:
    """Run the real arq worker in burst mode until its queue is empty; keyword arguments override settings."""

    async def run(**overrides: Any) -> Worker:
        options = worker_options(settings.replace(**overrides))
        # The sweeper is run on demand in tests (as the SWEEP_JOB function), not on the clock.
        options.update(cron_jobs=None, burst=True, handle_signals=False, poll_delay=0.05)
        worker = Worker(**options)
        try:
            await worker.async_run()
        finally:
            await worker.close()
        return worker

    return run


@pytest_asyncio.fixture
async def client(make_client: AppClientFactory) -> TestClient[Any, Any]:
    return await make_client()


async def receive(ws: ClientWebSocketResponse, *, timeout: float = 5.0) -> dict[str, Any]:
    """The next event from the server, decoded; fails the test on a close or a timeout."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type is WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}"
    event: dict[str, Any] = orjson.loads(msg.data)
    return event


async def receive_until(ws: ClientWebSocketResponse, event_type: str, *, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every event up to and including the first of `event_type`."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            event = await receive(ws, timeout=timeout)
            events.append(event)
            if event["type"] == event_type:
                return events


async def eventually(check: Callable[[], Awaitable[Any]], *, timeout: float = 5.0) -> Any:
    """Poll `check` until it returns something truthy; for outcomes that land in the background (database rows)."""
    async with asyncio.timeout(timeout):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.02)


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment for a real `python -m server` or `arq worker.WorkerSettings` against the test services."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": settings.database_url_or_default,
        "REDIS_URL": settings.redis_url,
        "OPENAI_BASE_URL": settings.openai_base_url or "",
        "OPENAI_API_KEY": "test-key",
        "OPENAI_MODEL": "fake-model",
        "LOG_LEVEL": "INFO",
        "WORKER_METRICS_PORT": "0",
        "ON_DISCONNECT": settings.on_disconnect,
        # Every process a spool of its own, unless the test shares one on purpose.
        "SPOOL_DIR": tempfile.mkdtemp(prefix="spool-"),
    }
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(
    settings: Settings, *, port: int | None = None, **env: str
) -> tuple[asyncio.subprocess.Process, int]:
    """A real server process on `port` (default: a free one), answering /healthz; the caller stops it."""
    port = port or free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        env=service_env(settings, PORT=str(port), **env),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )

    async def up() -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                return resp.status == 200
        return False

    try:
        await eventually(up, timeout=20)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, port
