"""The service's configuration: one immutable object built from the environment and `.env`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ValidationError, model_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings import PydanticBaseSettingsSource as Source

from .errors import ConfigError

OFFLINE_MODEL = "offline-demo"
DEFAULT_DATABASE_URL = "sqlite:///data/realtime.db"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _rule(check: Callable[[Any], bool], reason: str) -> AfterValidator:
    """A validator that fails with `reason` (the end of the error line) unless the value is None or passes."""

    def validate(value: Any) -> Any:
        if value is not None and not check(value):
            raise ValueError(reason)
        return value

    return AfterValidator(validate)


def _text(clean: Callable[[str], Any]) -> BeforeValidator:
    """Cleans text (from the environment); typed values, as tests pass them, go through as they are."""
    return BeforeValidator(lambda value: clean(value) if isinstance(value, str) else value)


def _items(clean: Callable[[str], str]) -> BeforeValidator:
    """Comma-separated text as a tuple of its cleaned, non-empty items; None when there are none."""
    return _text(lambda text: tuple(clean(item) for item in text.split(",") if item.strip()) or None)


def _scheme_in(*schemes: str, host: bool = False) -> Callable[[str], bool]:
    return lambda url: urlsplit(url).scheme in schemes and (bool(urlsplit(url).netloc) or not host)


_blank_is_none = _text(lambda text: text.strip() or None)

PositiveInt = Annotated[int, _rule(lambda v: v > 0, "must be a positive integer")]
NonNegativeInt = Annotated[int, _rule(lambda v: v >= 0, "must be zero or a positive integer")]
PositiveFloat = Annotated[float, _rule(lambda v: v > 0, "must be a positive number")]
NonNegativeFloat = Annotated[float, _rule(lambda v: v >= 0, "must be zero or a positive number")]
Port = Annotated[int, _rule(lambda v: 1 <= v <= 65535, "must be between 1 and 65535")]
PortOrOff = Annotated[int, _rule(lambda v: 0 <= v <= 65535, "must be between 0 (off) and 65535")]
Flag = Annotated[bool, _text(lambda text: text.strip() or "false")]
OptionalText = Annotated[str | None, _blank_is_none]
HttpUrl = Annotated[
    str | None, _blank_is_none, _rule(_scheme_in("http", "https", host=True), "must be an http(s):// URL")
]
DatabaseUrl = Annotated[
    str | None,
    _blank_is_none,
    _rule(_scheme_in("postgresql", "postgres", "sqlite"), "must start with postgresql:// or sqlite:///"),
]
RedisUrl = Annotated[
    str, _rule(_scheme_in("redis", "rediss", "unix"), "must start with redis://, rediss:// or unix://")
]
Origins = Annotated[
    tuple[str, ...] | None,
    NoDecode,
    _items(lambda origin: origin.strip().rstrip("/")),
    _rule(
        lambda origins: all(o == "*" or _scheme_in("http", "https")(o) for o in origins),
        "must be a comma-separated list of origins like https://app.example.com, or *",
    ),
]
Hosts = Annotated[tuple[str, ...] | None, NoDecode, _items(lambda host: host.strip().lower())]

# What the error line says when pydantic cannot even read the text as the field's type.
_REASONS = {
    "int_parsing": "must be a valid int",
    "int_from_float": "must be a valid int",
    "float_parsing": "must be a valid float",
    "bool_parsing": "must be true or false",
}


class Settings(BaseSettings):
    """Everything configurable. Build it with `Settings.from_env()` in an entry point, or directly in tests.

    Built directly it takes only its arguments, never the environment; `replace` copies it with changes. Every
    way of building one checks every value and raises ConfigError naming the variable that cannot be used.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    # The model.
    openai_api_key: OptionalText = None
    openai_base_url: HttpUrl = None
    openai_model: str = "gpt-4o-mini"
    openai_max_tokens: PositiveInt | None = None
    # An answer longer than this is cut there and stored with `truncated` in its metadata.
    max_answer_chars: PositiveInt = 100_000
    system_prompt: str = "You are a helpful assistant in a realtime chat. Answer clearly and concisely."
    fallback_text: str = "Sorry, I can't answer right now. Please try again in a moment."
    # The most tokens a request may carry (prompt, context summary and messages), as the provider counts them.
    context_max_tokens: PositiveInt = 16_000
    # Past this share of the budget the worker writes a new context summary (see server/live/context.py).
    context_compact_at: Annotated[float, _rule(lambda v: 0 < v <= 1, "must be a share between 0 and 1, like 0.75")] = (
        0.75
    )
    context_summary_prompt: str = (
        "You keep the running memory of a long conversation between a user and an AI assistant. Write a new "
        "summary from the previous summary (if any) and the messages after it, in the language of the "
        "conversation. Keep every name, number, code, date, decision, preference and open question exactly as "
        "stated; drop pleasantries and repetition. Write it as short factual notes, no preamble."
    )
    # Deprecated: the budget was once in characters. When set (and CONTEXT_MAX_TOKENS is not), it becomes a token
    # budget of a quarter of it.
    context_max_chars: PositiveInt | None = None
    llm_connect_timeout_s: PositiveFloat = 5.0
    llm_first_token_timeout_s: PositiveFloat = 30.0
    llm_token_gap_timeout_s: PositiveFloat = 20.0
    llm_max_retries: NonNegativeInt = 2
    llm_retry_budget_s: PositiveFloat = 10.0
    llm_retry_after_cap_s: PositiveFloat = 5.0
    offline_token_delay_s: NonNegativeFloat = 0.02

    # Storage and queue.
    # None when DATABASE_URL is unset: Supabase is then used if configured, else the local SQLite file.
    database_url: DatabaseUrl = None
    supabase_url: HttpUrl = None
    supabase_service_role_key: OptionalText = None
    redis_url: RedisUrl = "redis://localhost:6379"
    redis_max_connections: PositiveInt = 64
    store_retry_max_s: PositiveFloat = 5.0
    store_connect_timeout_s: PositiveFloat = 5.0
    # Writes the store cannot take for SPOOL_AFTER_S, or past SPOOL_MAX_PENDING events, move to files here.
    spool_dir: Path = Path("data/spool")
    spool_after_s: PositiveFloat = 10.0
    spool_max_pending: PositiveInt = 50_000

    # Post-session summaries.
    summary_delay_s: NonNegativeFloat = 0.0
    summary_prompt: str = (
        "Summarise this conversation between a user and an AI assistant in at most {max_words} words, "
        "in the language the conversation is in. Say what the user wanted, the key facts and answers, "
        "and anything left open. Write plain prose, no preamble."
    )
    summary_max_words: PositiveInt = 120
    summary_chunk_chars: PositiveInt = 24_000
    summary_max_tries: PositiveInt = 5
    summary_retry_base_s: PositiveFloat = 5.0
    summary_job_timeout_s: PositiveFloat = 300.0
    session_stale_s: PositiveFloat = 30.0
    takeover_wait_s: PositiveFloat = 5.0
    # A running answer's lease in Redis: its server renews it; past it (the server died) the worker stores the
    # text streamed so far as `interrupted` within a few seconds more.
    answer_lease_s: PositiveFloat = 5.0
    presence_ttl_s: PositiveFloat = 15.0
    worker_metrics_port: PortOrOff = 9191
    sweep_batch: PositiveInt = 200
    worker_max_jobs: PositiveInt = 200

    # Who may connect.
    auth_jwt_secret: OptionalText = None
    auth_jwks_url: HttpUrl = None
    auth_audience: OptionalText = None
    auth_issuer: OptionalText = None
    auth_jwks_cache_s: PositiveFloat = 600.0
    auth_disabled: Flag = False
    allowed_origins: Origins = None
    # Host header values served; None: the loopback names and HOST when authentication is off, any otherwise.
    allowed_hosts: Hosts = None

    # The server.
    host: str = "127.0.0.1"
    port: Port = 8001
    # Scale-out on one machine: WEB_CONCURRENCY server processes share the port (under gunicorn when above 1;
    # 0 or `auto`: one per core this process may run on); EVENT_LOOP `auto` runs uvloop where it is installed.
    web_concurrency: Annotated[
        int,
        _text(lambda text: "0" if text.strip().lower() == "auto" else text),
        _rule(lambda v: v >= 0, "must be a number of processes, or 0 or auto for one per core"),
    ] = 1
    # asyncio until a bench shows uvloop helps here (issue 16 asks to measure first); auto: uvloop if installed.
    event_loop: Annotated[Literal["auto", "uvloop", "asyncio"], _text(str.lower)] = "asyncio"
    web_dir: Path = REPO_ROOT / "web"
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], _text(str.upper)] = "INFO"
    log_format: Annotated[Literal["text", "json"], _text(str.lower)] = "text"
    ws_heartbeat_s: PositiveFloat = 30.0
    # A send that cannot drain within this, or a connection with more than this buffered, loses its socket.
    send_timeout_s: PositiveFloat = 10.0
    max_send_buffer_bytes: PositiveInt = 4 * 1024 * 1024
    shutdown_drain_s: NonNegativeFloat = 20.0
    shutdown_flush_s: PositiveFloat = 10.0
    # What a socket that goes away mid-answer does to the answer: nothing (protocol 1.1), or cancel it (1.0).
    on_disconnect: Annotated[Literal["continue", "cancel"], _text(str.lower)] = "continue"

    # Protocol limits.
    max_message_bytes: PositiveInt = 16 * 1024
    max_frame_bytes: PositiveInt = 1024 * 1024
    max_pending_messages: NonNegativeInt = 8
    messages_per_minute: PositiveInt = 60
    user_messages_per_minute: PositiveInt = 120
    max_turns_per_session: PositiveInt = 1000
    idle_timeout_s: NonNegativeFloat = 600.0
    max_connections: PositiveInt = 10_000
    max_connections_per_user: PositiveInt = 20
    max_watchers: PositiveInt = 32
    # Token budgets (prompt and completion, as each answer's metadata counts them); unset: none. A message past
    # one is refused with `budget_exceeded`. The daily one applies per authenticated user, per UTC day.
    session_max_tokens: PositiveInt | None = None
    user_daily_max_tokens: PositiveInt | None = None
    history_limit: PositiveInt = 1000

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            error = e.errors()[0]
            name = str(error["loc"][0])
            if error["type"] == "value_error":
                reason = str(error["ctx"]["error"])
            elif error["type"] == "literal_error":
                reason = f"must be {error['ctx']['expected']}"
            else:
                reason = _REASONS.get(error["type"], error["msg"])
            raise ConfigError(f"{name.upper()}={values.get(name, error['input'])!r}: {reason}") from e

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: Source,
        env_settings: Source,
        dotenv_settings: Source,
        file_secret_settings: Source,
    ) -> tuple[Source, ...]:
        # Only the arguments: reading the environment is from_env's job, so no test sees a developer's `.env`.
        return (init_settings,)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, env_file: str | Path | None = ".env", **overrides: Any
    ) -> Settings:
        """Read every setting from `environ` (default: the process environment) over the values in `env_file`.

        Raises ConfigError naming the first variable whose value cannot be used.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for source in (DotEnvSettingsSource(cls, env_file=env_file), _Environ(cls, environ)):
            # A `.env` may hold variables for other tools (docker compose, the tests): only ours are read.
            values.update((name, value) for name, value in source().items() if name in cls.model_fields)
        return cls(**{**values, **overrides})

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, checked as any Settings is."""
        return type(self)(**{**dict(self), **changes})

    @model_validator(mode="before")
    @classmethod
    def _deprecated(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("context_max_chars") and "context_max_tokens" not in values:
            # A value that is not a number is left to the field's own check, which names the variable.
            with suppress(TypeError, ValueError):
                values = {**values, "context_max_tokens": max(1, int(values["context_max_chars"]) // 4)}
        return values

    @property
    def deprecations(self) -> list[str]:
        """One line per deprecated setting in use, for the entry points to log."""
        if self.context_max_chars is None:
            return []
        return [
            f"CONTEXT_MAX_CHARS is deprecated: the context budget is in tokens now (CONTEXT_MAX_TOKENS, "
            f"{self.context_max_tokens} in use)"
        ]

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        """The rules that span several settings."""
        if not self.auth_enabled and not self.loopback_only and not self.auth_disabled:
            raise ConfigError(
                f"HOST={self.host!r} without authentication: set AUTH_JWT_SECRET or AUTH_JWKS_URL, "
                "or AUTH_DISABLED=true to serve everyone who can reach it"
            )
        if self.max_message_bytes > self.max_frame_bytes:
            raise ConfigError("MAX_MESSAGE_BYTES must not exceed MAX_FRAME_BYTES")
        return self

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


class _Environ(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (tests pass one) instead of `os.environ`."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # As DotEnvSettingsSource does for its file; names match case-insensitively, as for `os.environ`.
        return {name.lower(): value for name, value in self._environ.items()}


def load_settings() -> Settings:
    """Settings for an entry point: a value that cannot be used stops the process with one line and status 2."""
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    for line in settings.deprecations:
        print(f"configuration warning: {line}", file=sys.stderr)
    return settings
