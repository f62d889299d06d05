"""Configuration from the environment and `.env`: defaults, overrides, and one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from core.errors import ConfigError
from core.settings import REPO_ROOT, Settings


def test_defaults_need_nothing_and_use_the_offline_model(tmp_path):
    settings = Settings.from_env({}, env_file=tmp_path / "missing.env")
    assert settings.offline
    assert settings.model_name == "offline-demo"
    assert settings.database_url is None
    assert settings.database_url_or_default.startswith("sqlite:///")
    assert (settings.host, settings.port) == ("127.0.0.1", 8001)
    assert settings.redis_url == "redis://localhost:6379"


def test_a_key_or_a_base_url_turns_the_offline_model_off(tmp_path):
    assert not Settings.from_env({"OPENAI_API_KEY": "sk-x"}, env_file=None).offline
    assert not Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, env_file=None).offline


def test_the_environment_wins_over_the_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=9000\nOPENAI_MODEL=from-file\n")
    settings = Settings.from_env({"PORT": "9100"}, env_file=env_file)
    assert settings.port == 9100
    assert settings.openai_model == "from-file"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_MESSAGE_BYTES", "0"),
        ("LLM_FIRST_TOKEN_TIMEOUT_S", "-1"),
        ("DATABASE_URL", "mysql://x"),
        ("REDIS_URL", "http://x"),
        ("OPENAI_BASE_URL", "not a url"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_a_bad_value_names_its_variable(name, value):
    with pytest.raises(ConfigError) as e:
        Settings.from_env({name: value}, env_file=None)
    assert str(e.value).startswith(f"{name}=")
    assert "\n" not in str(e.value)


def test_python_m_server_stops_with_one_line_for_a_bad_value(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server"],
        env={"PORT": "nope", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["configuration error: PORT='nope': must be a valid int"]
