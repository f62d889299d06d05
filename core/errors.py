"""Every exception the service raises on purpose, and the stable codes clients see.

AppError
├── ConfigError           a setting is missing or malformed; start-up stops
├── StoreError            a store operation failed and retrying will not help
│   └── StoreUnavailable  the database cannot be reached right now; retrying may help
├── LLMError              the model could not answer (code ``llm_error``)
│   ├── LLMRateLimited    the provider refused for quota or rate (``llm_rate_limited``)
│   └── LLMUnavailable    the provider is down, slow or cut the stream (``llm_unavailable``)
└── ProtocolError         a client frame broke the wire protocol (``code`` as in PROTOCOL.md)
"""

from __future__ import annotations


class AppError(Exception):
    """Root of the service's own exceptions."""


class ConfigError(AppError):
    """A setting is missing or malformed; the message names the variable."""


class StoreError(AppError):
    """A store operation failed in a way that retrying will not fix."""


class StoreUnavailable(StoreError):
    """The database cannot be reached right now; the same call may succeed later."""


class LLMError(AppError):
    """The model could not produce an answer."""

    code = "llm_error"

    def __init__(self, message: str, *, retry_after: float | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.retryable = retryable


class LLMRateLimited(LLMError):
    """The provider refused the request for rate or quota reasons."""

    code = "llm_rate_limited"


class LLMUnavailable(LLMError):
    """The provider is down, too slow, or cut the stream."""

    code = "llm_unavailable"


class ProtocolError(AppError):
    """A client frame broke the wire protocol; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Forbidden(AppError):
    """The caller is authenticated but the session belongs to someone else."""
