"""The service's configuration: one immutable object built from the environment and `.env`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

from .errors import ConfigError

OFFLINE_MODEL = "offline-demo"
DEFAULT_DATABASE_URL = "sqlite:///data/realtime.db"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _env(name: str, parse: Callable[[str], Any] = str) -> Any:
    """Field metadata: the environment variable a setting comes from and how its text is read."""
    return {"env": name, "parse": parse}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be zero or a positive number")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be between 1 and 65535")
    return value


def _port_or_zero(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 (off) and 65535")
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _origins(text: str) -> tuple[str, ...] | None:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and urlsplit(origin).scheme not in ("http", "https"):
            raise ValueError("must be a comma-separated list of origins like https://app.example.com, or *")
    return origins or None


def _optional(text: str) -> str | None:
    return text.strip() or None


def _hosts(text: str) -> tuple[str, ...] | None:
    hosts = tuple(h.strip().lower() for h in text.split(",") if h.strip())
    return hosts or None


def _http_url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http(s):// URL")
    return text


def _database_url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    if urlsplit(text).scheme not in ("postgresql", "postgres", "sqlite"):
        raise ValueError("must start with postgresql:// or sqlite:///")
    return text


def _redis_url(text: str) -> str:
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return text


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable. Build it with `Settings.from_env()` in an entry point, or directly in tests."""

    # The model.
    openai_api_key: str | None = field(default=None, metadata=_env("OPENAI_API_KEY", _optional))
    openai_base_url: str | None = field(default=None, metadata=_env("OPENAI_BASE_URL", _http_url))
    openai_model: str = field(default="gpt-4o-mini", metadata=_env("OPENAI_MODEL"))
    openai_max_tokens: int | None = field(default=None, metadata=_env("OPENAI_MAX_TOKENS", _positive_int))
    # An answer longer than this is cut there and stored with `truncated` in its metadata.
    max_answer_chars: int = field(default=100_000, metadata=_env("MAX_ANSWER_CHARS", _positive_int))
    system_prompt: str = field(
        default="You are a helpful assistant in a realtime chat. Answer clearly and concisely.",
        metadata=_env("SYSTEM_PROMPT"),
    )
    fallback_text: str = field(
        default="Sorry, I can't answer right now. Please try again in a moment.",
        metadata=_env("FALLBACK_TEXT"),
    )
    context_max_chars: int = field(default=48_000, metadata=_env("CONTEXT_MAX_CHARS", _positive_int))
    llm_connect_timeout_s: float = field(default=5.0, metadata=_env("LLM_CONNECT_TIMEOUT_S", _positive_float))
    llm_first_token_timeout_s: float = field(default=30.0, metadata=_env("LLM_FIRST_TOKEN_TIMEOUT_S", _positive_float))
    llm_token_gap_timeout_s: float = field(default=20.0, metadata=_env("LLM_TOKEN_GAP_TIMEOUT_S", _positive_float))
    llm_max_retries: int = field(default=2, metadata=_env("LLM_MAX_RETRIES", _non_negative_int))
    llm_retry_budget_s: float = field(default=10.0, metadata=_env("LLM_RETRY_BUDGET_S", _positive_float))
    llm_retry_after_cap_s: float = field(default=5.0, metadata=_env("LLM_RETRY_AFTER_CAP_S", _positive_float))
    offline_token_delay_s: float = field(default=0.02, metadata=_env("OFFLINE_TOKEN_DELAY_S", _non_negative_float))

    # Storage and queue.
    # None when DATABASE_URL is unset: Supabase is then used if configured, else the local SQLite file.
    database_url: str | None = field(default=None, metadata=_env("DATABASE_URL", _database_url))
    supabase_url: str | None = field(default=None, metadata=_env("SUPABASE_URL", _http_url))
    supabase_service_role_key: str | None = field(default=None, metadata=_env("SUPABASE_SERVICE_ROLE_KEY", _optional))
    redis_url: str = field(default="redis://localhost:6379", metadata=_env("REDIS_URL", _redis_url))
    redis_max_connections: int = field(default=64, metadata=_env("REDIS_MAX_CONNECTIONS", _positive_int))
    store_retry_max_s: float = field(default=5.0, metadata=_env("STORE_RETRY_MAX_S", _positive_float))
    store_connect_timeout_s: float = field(default=5.0, metadata=_env("STORE_CONNECT_TIMEOUT_S", _positive_float))
    # Writes the store cannot take for SPOOL_AFTER_S, or past SPOOL_MAX_PENDING events, move to files here.
    spool_dir: Path = field(default=Path("data/spool"), metadata=_env("SPOOL_DIR", Path))
    spool_after_s: float = field(default=10.0, metadata=_env("SPOOL_AFTER_S", _positive_float))
    spool_max_pending: int = field(default=50_000, metadata=_env("SPOOL_MAX_PENDING", _positive_int))

    # Post-session summaries.
    summary_delay_s: float = field(default=0.0, metadata=_env("SUMMARY_DELAY_S", _non_negative_float))
    summary_prompt: str = field(
        default=(
            "Summarise this conversation between a user and an AI assistant in at most {max_words} words, "
            "in the language the conversation is in. Say what the user wanted, the key facts and answers, "
            "and anything left open. Write plain prose, no preamble."
        ),
        metadata=_env("SUMMARY_PROMPT"),
    )
    summary_max_words: int = field(default=120, metadata=_env("SUMMARY_MAX_WORDS", _positive_int))
    summary_chunk_chars: int = field(default=24_000, metadata=_env("SUMMARY_CHUNK_CHARS", _positive_int))
    summary_max_tries: int = field(default=5, metadata=_env("SUMMARY_MAX_TRIES", _positive_int))
    summary_retry_base_s: float = field(default=5.0, metadata=_env("SUMMARY_RETRY_BASE_S", _positive_float))
    summary_job_timeout_s: float = field(default=300.0, metadata=_env("SUMMARY_JOB_TIMEOUT_S", _positive_float))
    session_stale_s: float = field(default=30.0, metadata=_env("SESSION_STALE_S", _positive_float))
    takeover_wait_s: float = field(default=5.0, metadata=_env("TAKEOVER_WAIT_S", _positive_float))
    presence_ttl_s: float = field(default=15.0, metadata=_env("PRESENCE_TTL_S", _positive_float))
    worker_metrics_port: int = field(default=9191, metadata=_env("WORKER_METRICS_PORT", _port_or_zero))
    sweep_batch: int = field(default=200, metadata=_env("SWEEP_BATCH", _positive_int))
    worker_max_jobs: int = field(default=200, metadata=_env("WORKER_MAX_JOBS", _positive_int))

    # Who may connect.
    auth_jwt_secret: str | None = field(default=None, metadata=_env("AUTH_JWT_SECRET", _optional))
    auth_jwks_url: str | None = field(default=None, metadata=_env("AUTH_JWKS_URL", _http_url))
    auth_audience: str | None = field(default=None, metadata=_env("AUTH_AUDIENCE", _optional))
    auth_issuer: str | None = field(default=None, metadata=_env("AUTH_ISSUER", _optional))
    auth_jwks_cache_s: float = field(default=600.0, metadata=_env("AUTH_JWKS_CACHE_S", _positive_float))
    auth_disabled: bool = field(default=False, metadata=_env("AUTH_DISABLED", _bool))
    allowed_origins: tuple[str, ...] | None = field(default=None, metadata=_env("ALLOWED_ORIGINS", _origins))
    # Host header values served; None: the loopback names and HOST when authentication is off, any otherwise.
    allowed_hosts: tuple[str, ...] | None = field(default=None, metadata=_env("ALLOWED_HOSTS", _hosts))

    # The server.
    host: str = field(default="127.0.0.1", metadata=_env("HOST"))
    port: int = field(default=8001, metadata=_env("PORT", _port))
    web_dir: Path = field(default=REPO_ROOT / "web", metadata=_env("WEB_DIR", Path))
    log_level: str = field(default="INFO", metadata=_env("LOG_LEVEL", _log_level))
    log_format: str = field(default="text", metadata=_env("LOG_FORMAT", _log_format))
    ws_heartbeat_s: float = field(default=30.0, metadata=_env("WS_HEARTBEAT_S", _positive_float))
    # A send that cannot drain within this, or a connection with more than this buffered, loses its socket.
    send_timeout_s: float = field(default=10.0, metadata=_env("SEND_TIMEOUT_S", _positive_float))
    max_send_buffer_bytes: int = field(default=4 * 1024 * 1024, metadata=_env("MAX_SEND_BUFFER_BYTES", _positive_int))
    shutdown_drain_s: float = field(default=20.0, metadata=_env("SHUTDOWN_DRAIN_S", _non_negative_float))
    shutdown_flush_s: float = field(default=10.0, metadata=_env("SHUTDOWN_FLUSH_S", _positive_float))

    # Protocol limits.
    max_message_bytes: int = field(default=16 * 1024, metadata=_env("MAX_MESSAGE_BYTES", _positive_int))
    max_frame_bytes: int = field(default=1024 * 1024, metadata=_env("MAX_FRAME_BYTES", _positive_int))
    max_pending_messages: int = field(default=8, metadata=_env("MAX_PENDING_MESSAGES", _non_negative_int))
    messages_per_minute: int = field(default=60, metadata=_env("MESSAGES_PER_MINUTE", _positive_int))
    user_messages_per_minute: int = field(default=120, metadata=_env("USER_MESSAGES_PER_MINUTE", _positive_int))
    max_turns_per_session: int = field(default=1000, metadata=_env("MAX_TURNS_PER_SESSION", _positive_int))
    idle_timeout_s: float = field(default=600.0, metadata=_env("IDLE_TIMEOUT_S", _non_negative_float))
    max_connections: int = field(default=10_000, metadata=_env("MAX_CONNECTIONS", _positive_int))
    max_connections_per_user: int = field(default=20, metadata=_env("MAX_CONNECTIONS_PER_USER", _positive_int))
    history_limit: int = field(default=1000, metadata=_env("HISTORY_LIMIT", _positive_int))

    @property
    def offline(self) -> bool:
        """True when no provider is configured and the built-in demo model answers."""
        return self.openai_api_key is None and self.openai_base_url is None

    @property
    def auth_enabled(self) -> bool:
        return self.auth_jwt_secret is not None or self.auth_jwks_url is not None

    @property
    def loopback_only(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    @property
    def database_url_or_default(self) -> str:
        """DATABASE_URL, or the local SQLite file when it is unset."""
        return self.database_url or DEFAULT_DATABASE_URL

    @property
    def model_name(self) -> str:
        return OFFLINE_MODEL if self.offline else self.openai_model

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, env_file: str | Path | None = ".env", **overrides: Any
    ) -> Settings:
        """Read every setting from `environ` (default: the process environment) over the values in `env_file`.

        Raises ConfigError naming the first variable whose value cannot be used.
        """
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)

        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name not in values:
                continue
            try:
                kwargs[f.name] = f.metadata["parse"](values[name])
            except ValueError as e:
                reason = str(e) if "must" in str(e) else f"must be a valid {f.type}"
                raise ConfigError(f"{name}={values[name]!r}: {reason}") from e
        kwargs.update(overrides)
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check the rules that span several settings."""
        if not self.auth_enabled and not self.loopback_only and not self.auth_disabled:
            raise ConfigError(
                f"HOST={self.host!r} without authentication: set AUTH_JWT_SECRET or AUTH_JWKS_URL, "
                "or AUTH_DISABLED=true to serve everyone who can reach it"
            )
        if self.max_message_bytes > self.max_frame_bytes:
            raise ConfigError("MAX_MESSAGE_BYTES must not exceed MAX_FRAME_BYTES")
