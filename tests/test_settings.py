"""Configuration from the environment and `.env`: defaults, overrides, and one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from core.errors import ConfigError
from core.settings import REPO_ROOT, Settings, load_settings


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
    assert Settings.from_env({"PORT": "9100"}, env_file=env_file, port=9200).port == 9200


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
        ("AUTH_DISABLED", "maybe"),
        ("ALLOWED_ORIGINS", "app.example.com"),
        ("ON_DISCONNECT", "pause"),
        ("CONTEXT_MAX_CHARS", "0"),
        ("CONTEXT_MAX_CHARS", "many"),
        ("CONTEXT_MAX_TOKENS", "0"),
        ("CONTEXT_COMPACT_AT", "1.5"),
        ("CONTEXT_COMPACT_AT", "0"),
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


def test_a_bad_value_says_what_is_expected():
    with pytest.raises(ConfigError, match=r"^PORT='70000': must be between 1 and 65535$"):
        Settings.from_env({"PORT": "70000"}, env_file=None)
    with pytest.raises(ConfigError, match=r"^ON_DISCONNECT='pause': must be 'continue' or 'cancel'$"):
        Settings.from_env({"ON_DISCONNECT": "pause"}, env_file=None)


def test_lists_flags_and_choices_are_read_from_their_text():
    settings = Settings.from_env(
        {
            "ALLOWED_HOSTS": "App.Example.com, localhost,",
            "ALLOWED_ORIGINS": "https://app.example.com/, *",
            "AUTH_DISABLED": "yes",
            "ON_DISCONNECT": "cancel",
            "CONTEXT_MAX_CHARS": "4000",
            "OPENAI_API_KEY": "",
        },
        env_file=None,
    )
    assert settings.allowed_hosts == ("app.example.com", "localhost")
    assert settings.allowed_origins == ("https://app.example.com", "*")
    assert settings.auth_disabled
    assert settings.on_disconnect == "cancel"
    # The deprecated budget in characters still works, as a token budget of a quarter of it.
    assert (settings.context_max_chars, settings.context_max_tokens) == (4000, 1000)
    assert settings.openai_api_key is None
    assert Settings.from_env({"ALLOWED_HOSTS": ""}, env_file=None).allowed_hosts is None


def test_new_settings_have_their_defaults():
    settings = Settings()
    assert settings.on_disconnect == "continue"
    assert (settings.context_max_tokens, settings.context_compact_at, settings.context_max_chars) == (
        16_000,
        0.75,
        None,
    )
    assert (settings.presence_ttl_s, settings.session_stale_s) == (15.0, 30.0)


def test_the_env_file_may_hold_variables_for_other_tools(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("POSTGRES_PASSWORD=secret\nCOMPOSE_PROJECT_NAME=app\nPORT=9000\n")
    assert Settings.from_env({}, env_file=env_file).port == 9000


def test_settings_built_directly_ignore_the_environment_and_the_env_file(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("PORT=9000\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", "9100")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    settings = Settings(openai_model="mine")
    assert (settings.port, settings.openai_api_key, settings.openai_model) == (8001, None, "mine")
    assert Settings.from_env().port == 9100


def test_a_copy_with_changes_is_checked_and_leaves_the_original_alone():
    settings = Settings(port=9000)
    copy = settings.replace(port=9001, auth_jwt_secret="s3cret", host="0.0.0.0")
    assert (copy.port, copy.auth_enabled, settings.port, settings.auth_enabled) == (9001, True, 9000, False)

    with pytest.raises(ConfigError, match=r"^PORT=0: must be between 1 and 65535$"):
        settings.replace(port=0)
    with pytest.raises(ConfigError, match=r"^HOST='0.0.0.0' without authentication"):
        settings.replace(host="0.0.0.0")
    with pytest.raises(ConfigError, match="MAX_MESSAGE_BYTES must not exceed MAX_FRAME_BYTES"):
        settings.replace(max_frame_bytes=1024)
    with pytest.raises(ConfigError, match=r"^NO_SUCH_SETTING="):
        settings.replace(no_such_setting=1)


def test_the_deprecated_character_budget_says_so_once_at_start(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONTEXT_MAX_CHARS", "8000")
    settings = load_settings()
    assert settings.context_max_tokens == 2000
    assert capsys.readouterr().err == (
        "configuration warning: CONTEXT_MAX_CHARS is deprecated: the context budget is in tokens now "
        "(CONTEXT_MAX_TOKENS, 2000 in use)\n"
    )
    # Both set: the token budget wins.
    monkeypatch.setenv("CONTEXT_MAX_TOKENS", "3000")
    assert load_settings().context_max_tokens == 3000


def test_settings_cannot_be_changed_in_place():
    settings = Settings()
    with pytest.raises(ValueError):
        settings.port = 9000
    assert settings.port == 8001


def test_an_entry_point_stops_with_one_line_and_status_2(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONTEXT_MAX_CHARS", "-5")
    with pytest.raises(SystemExit) as e:
        load_settings()
    assert e.value.code == 2
    assert capsys.readouterr().err == "configuration error: CONTEXT_MAX_CHARS='-5': must be a positive integer\n"
