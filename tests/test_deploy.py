"""How the service is run and stopped: `make run` (scripts/run.sh, for real) and what `docker compose up` would run,
checked with Debian's docker-compose (no Docker engine runs here)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from core.settings import REPO_ROOT, Settings
from tests.conftest import eventually, free_port, receive, service_env
from tests.fakes import openai_server as fake


def compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed: `make test` installs it (scripts/ensure-packages.sh)")
    # Only PATH: a developer's own OPENAI_API_KEY or .env must not leak into what is checked.
    clean = {"PATH": os.environ["PATH"], **env}
    return subprocess.run(
        [binary, "--project-directory", str(REPO_ROOT), "-f", str(REPO_ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        env=clean,
        cwd=REPO_ROOT,
        timeout=60,
    )


def resolved(**env: str) -> dict[str, Any]:
    result = compose("config", **env)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_the_compose_file_is_valid():
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_the_five_services_run_the_right_commands_with_health_checks():
    services = resolved()["services"]
    assert set(services) == {"redis", "postgres", "server", "worker", "lb"}
    assert services["server"]["command"] == ["python", "-m", "server"]
    assert services["worker"]["command"] == ["arq", "worker.WorkerSettings"]
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "arq", "--check", "worker.WorkerSettings"]
    for name in services:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    # The server listens on 8001 on every interface of its container, for the load balancer only: no host port,
    # so `--scale server=3` does not collide on one.
    assert "ports" not in services["server"]
    assert [str(p) for p in services["server"]["expose"]] == ["8001"]
    assert services["server"]["environment"]["HOST"] == "0.0.0.0"
    assert services["server"]["environment"]["PORT"] == "8001"
    assert services["server"]["environment"]["AUTH_DISABLED"] == "true"
    # Both app services come from the one Dockerfile, and wait for healthy dependencies.
    assert services["server"]["build"] == services["worker"]["build"]
    for name in ("server", "worker"):
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
        }
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_the_load_balancer_publishes_the_port_and_runs_deploy_haproxy_cfg():
    lb = resolved()["services"]["lb"]
    assert lb["image"] == "haproxy:2.8-alpine"
    # Published on the host's loopback only: without AUTH_* the servers serve anyone who can reach them.
    [port] = lb["ports"]
    assert port == "127.0.0.1:8001:8001/tcp"
    assert f"{REPO_ROOT / 'deploy' / 'haproxy.cfg'}:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert lb["healthcheck"]["test"] == ["CMD", "haproxy", "-c", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
    assert lb["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert lb["restart"] == "unless-stopped"
    # Where the port goes when set.
    [port] = resolved(PUBLISH_ADDRESS="0.0.0.0", PORT="9000")["services"]["lb"]["ports"]
    assert port == "0.0.0.0:9000:8001/tcp"


def test_haproxy_checks_readyz_spreads_by_least_connections_and_keeps_no_sessions_sticky():
    lines = [line.split("#")[0].strip() for line in (REPO_ROOT / "deploy" / "haproxy.cfg").read_text().splitlines()]
    lines = [line for line in lines if line]
    assert "option httpchk GET /readyz" in lines
    assert "balance leastconn" in lines
    assert any(line.startswith("timeout tunnel ") for line in lines)
    # tests/lb.py rewrites these two lines for the test's servers: their text is fixed.
    assert "resolvers docker" in lines
    assert any(line.startswith("server-template server 10 server:8001 ") for line in lines)
    assert not [line for line in lines if line.split()[0] in ("cookie", "stick", "stick-table", "appsession")]


def test_every_server_replica_runs_one_process_per_core_by_default():
    assert resolved()["services"]["server"]["environment"]["WEB_CONCURRENCY"] == "0"
    assert resolved(WEB_CONCURRENCY="4")["services"]["server"]["environment"]["WEB_CONCURRENCY"] == "4"


def test_redis_and_postgres_keep_their_data_and_postgres_gets_the_schema():
    config = resolved()
    assert "--appendonly" in config["services"]["redis"]["command"]
    assert any(v.startswith("redis-data:") for v in config["services"]["redis"]["volumes"])
    pg_volumes = config["services"]["postgres"]["volumes"]
    assert any(v.startswith("postgres-data:") for v in pg_volumes)
    assert f"{REPO_ROOT / 'sql'}:/docker-entrypoint-initdb.d:ro" in pg_volumes
    assert set(config["volumes"]) == {"redis-data", "postgres-data", "server-spool"}


def test_the_servers_spool_outlives_its_container():
    config = resolved()
    assert any(v.startswith("server-spool:/app/data/spool") for v in config["services"]["server"]["volumes"])
    assert "SPOOL_DIR" not in config["services"]["server"]["environment"]  # the default, data/spool under /app


def test_with_nothing_configured_the_offline_model_answers_and_settings_pass_through_when_given():
    env = resolved()["services"]["server"]["environment"]
    assert env["OPENAI_API_KEY"] == "" and env["OPENAI_BASE_URL"] == ""
    assert env["DATABASE_URL"] == "postgresql://postgres:postgres@postgres:5432/realtime"

    env = resolved(OPENAI_API_KEY="sk-test", OPENAI_MODEL="m1", DATABASE_URL="postgresql://u:p@db.example/x")[
        "services"
    ]["worker"]["environment"]
    assert (env["OPENAI_API_KEY"], env["OPENAI_MODEL"]) == ("sk-test", "m1")
    assert env["DATABASE_URL"] == "postgresql://u:p@db.example/x"


def test_the_image_runs_as_a_non_root_user_with_no_secrets_baked_in():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    # TIKTOKEN_CACHE_DIR is where the tokenizer's files are (tiktoken's own name for it), not a token.
    baked = " ".join(line for line in lines if line.startswith(("ENV", "ARG"))).replace("TIKTOKEN_CACHE_DIR", "")
    for secret in ("KEY", "SECRET", "PASSWORD", "TOKEN"):
        assert secret not in baked
    # Dependencies are installed before the code is copied, so code changes reuse the cached layer.
    assert lines.index("COPY pyproject.toml ./") < next(i for i, line in enumerate(lines) if "pip install" in line)
    assert next(i for i, line in enumerate(lines) if "pip install" in line) < lines.index("COPY server ./server")
    ignored = Path(REPO_ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored


def seconds(duration: str) -> float:
    """A compose duration ("1m30s", "60s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_gives_the_server_and_worker_time_to_finish_answers_and_writes():
    services = resolved()["services"]
    # Compose passes neither shutdown setting into the containers: the defaults hold there.
    assert not {"SHUTDOWN_DRAIN_S", "SHUTDOWN_FLUSH_S"} & set(services["server"]["environment"])
    # The drain, the flush before the 1001 close, aiohttp's 10 s for the handlers, the flush of the last writes.
    defaults = Settings()
    need = defaults.shutdown_drain_s + 2 * defaults.shutdown_flush_s + 10
    for name in ("server", "worker"):
        assert seconds(services[name]["stop_grace_period"]) >= need + 5, name


# --- make run ------------------------------------------------------------------------------------------


@dataclass
class RunSh:
    """scripts/run.sh running in a session of its own, as in a terminal: `ctrl_c` signals its whole group."""

    proc: asyncio.subprocess.Process
    port: int
    marker: str
    output: list[str] = field(default_factory=list)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def said(self, text: str) -> list[str]:
        return [line for line in self.output if text in line]

    async def waits_for(self, text: str, *, timeout: float = 30) -> str:
        async def seen() -> str | None:
            if self.proc.returncode is not None:
                pytest.fail(f"run.sh exited ({self.proc.returncode}) before saying {text!r}:\n" + "".join(self.output))
            return next(iter(self.said(text)), None)

        line: str = await eventually(seen, timeout=timeout)
        return line

    def leftovers(self) -> list[int]:
        """The processes run.sh started that still run (they carry the test's marker in their environment)."""
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):
                if f"RUN_SH_TEST={self.marker}".encode() in environ.read_bytes().split(b"\0"):
                    pids.append(int(environ.parent.name))
        return pids


@contextlib.asynccontextmanager
async def run_sh(tmp_path: Path, settings: Settings, *, dotenv: str = "", **env: str) -> AsyncIterator[RunSh]:
    """`make run` for real, from a checkout of its own (the code, this run.sh, the test's .venv): so that the .env
    it reads is the test's, never a developer's. Against the test PostgreSQL and Redis (it starts no Redis then)."""
    home = tmp_path / "checkout"
    (home / "scripts").mkdir(parents=True)
    for name in ("core", "server", "worker", "web", "sql"):
        (home / name).symlink_to(REPO_ROOT / name)
    (home / "scripts" / "run.sh").symlink_to(REPO_ROOT / "scripts" / "run.sh")
    (home / ".venv").symlink_to(sys.prefix)
    (home / ".env").write_text(dotenv)
    marker, port = secrets.token_hex(8), free_port()
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(home / "scripts" / "run.sh"),
        env=service_env(settings, HOST="127.0.0.1", PORT=str(port), RUN_SH_TEST=marker, **env),
        cwd=home,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    run = RunSh(proc, port, marker)

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            run.output.append(line.decode(errors="replace"))

    reader = asyncio.create_task(read())
    try:
        await run.waits_for("worker started")
        yield run
    finally:
        for pid in run.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def ask(port: int, http: aiohttp.ClientSession, text: str) -> aiohttp.ClientWebSocketResponse:
    """Open session s1, send a message and return once the answer has begun streaming."""
    ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/s1")
    await receive(ws)
    await ws.send_str(orjson.dumps({"type": "message", "text": text, "client_msg_id": "m1"}).decode())
    while (await receive(ws))["type"] != "response.delta":
        pass
    return ws


async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict[str, Any]], int | None]:
    events: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return events, msg.data if msg.type is aiohttp.WSMsgType.CLOSE else ws.close_code
        events.append(orjson.loads(msg.data))


# About 18 s of answer still to come at the Ctrl-C: longer than the 15 s run.sh used to give before its SIGKILL.
LONG_ANSWER = " ".join(f"word{i}" for i in range(36))


async def test_ctrl_c_in_make_run_lets_a_long_answer_finish_and_stores_it(tmp_path, settings, fake_llm, db, redis):
    fake_llm.script(fake.slow(0.5, text=LONG_ANSWER))
    # The drain comes from .env, the flush from the environment over .env's: as the server reads them.
    async with run_sh(
        tmp_path, settings, dotenv="SHUTDOWN_DRAIN_S=25\nSHUTDOWN_FLUSH_S=30\n", SHUTDOWN_FLUSH_S="2"
    ) as run:
        async with aiohttp.ClientSession() as http:
            ws = await ask(run.port, http, "tell me")
            run.ctrl_c()
            ctrl_c_at = time.monotonic()
            async with asyncio.timeout(35):
                events, close_code = await until_closed(ws)
            answered_in = time.monotonic() - ctrl_c_at
        async with asyncio.timeout(15):
            assert await run.proc.wait() == 0
        assert not run.leftovers()

    # The answer finished, reached the user, and the socket closed with 1001.
    assert [(e["status"], e["text"]) for e in events if e["type"] == "response.done"] == [("completed", LONG_ANSWER)]
    assert close_code == 1001
    # Stored whole, and the session ended.
    rows = await db.fetch(
        "select event_type, content, metadata from session_events where session_id = 's1' order by id"
    )
    assert [r["event_type"] for r in rows] == ["connected", "user_message", "ai_message", "disconnected"]
    assert rows[2]["content"] == LONG_ANSWER
    assert orjson.loads(rows[2]["metadata"])["status"] == "completed"
    assert await db.fetchval("select end_time from sessions where session_id = 's1'") is not None
    assert answered_in > 15, "the answer must outlast the old 15 s before SIGKILL for this test to mean anything"

    # run.sh said how long it would wait, with room for the drain and flush it was given, and the way out.
    assert not run.said("killing")
    [stopping] = run.said("stopping: ")
    match = re.search(r"up to (\d+) s", stopping)
    assert match, stopping
    grace = int(match[1])
    assert 25 + 2 < grace < 25 + 30, stopping
    assert "Ctrl-C again" in stopping


async def test_a_second_ctrl_c_cuts_the_stop_short_without_killing(tmp_path, settings, fake_llm, db, redis):
    fake_llm.script(fake.slow(0.5, text=LONG_ANSWER))
    async with run_sh(tmp_path, settings, SHUTDOWN_DRAIN_S="30") as run:
        async with aiohttp.ClientSession() as http:
            ws = await ask(run.port, http, "tell me")
            run.ctrl_c()
            await run.waits_for("Ctrl-C again", timeout=5)
            await asyncio.sleep(0.5)
            run.ctrl_c()
            second_at = time.monotonic()
            async with asyncio.timeout(15):
                await run.proc.wait()
            stopped_in = time.monotonic() - second_at
            await ws.close()
        assert not run.leftovers()

    # The server was asked again, not killed, and obeyed within the few seconds it is given.
    assert run.said("stopping at once")
    assert not run.said("killing"), "".join(run.output)
    assert stopped_in < 5
    assert await db.fetchval("select count(*) from session_events where event_type = 'user_message'") == 1
