"""What `docker compose up` would run, checked with Debian's docker-compose (no Docker engine runs here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import REPO_ROOT


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


def test_the_four_services_run_the_right_commands_with_health_checks():
    services = resolved()["services"]
    assert set(services) == {"redis", "postgres", "server", "worker"}
    assert services["server"]["command"] == ["python", "-m", "server"]
    assert services["worker"]["command"] == ["arq", "worker.WorkerSettings"]
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "arq", "--check", "worker.WorkerSettings"]
    for name in services:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    # The server listens on 8001 inside and out, on every interface of the container.
    [port] = services["server"]["ports"]
    # Published on the host's loopback only: without AUTH_* the server serves anyone who can reach it.
    assert port == "127.0.0.1:8001:8001/tcp"
    assert services["server"]["environment"]["HOST"] == "0.0.0.0"
    assert services["server"]["environment"]["AUTH_DISABLED"] == "true"
    # Both app services come from the one Dockerfile, and wait for healthy dependencies.
    assert services["server"]["build"] == services["worker"]["build"]
    for name in ("server", "worker"):
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
        }
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


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
    baked = " ".join(line for line in lines if line.startswith(("ENV", "ARG")))
    for secret in ("KEY", "SECRET", "PASSWORD", "TOKEN"):
        assert secret not in baked
    # Dependencies are installed before the code is copied, so code changes reuse the cached layer.
    assert lines.index("COPY pyproject.toml ./") < next(i for i, line in enumerate(lines) if "pip install" in line)
    assert next(i for i, line in enumerate(lines) if "pip install" in line) < lines.index("COPY server ./server")
    ignored = Path(REPO_ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored
