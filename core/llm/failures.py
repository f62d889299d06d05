"""What a provider's failures mean to us: HTTP statuses and in-stream errors mapped to our LLMError kinds, with the
provider's own message made safe to show."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from contextlib import suppress
from email.utils import parsedate_to_datetime
from typing import Any

from ..errors import LLMError, LLMRateLimited, LLMUnavailable

_SECRET_RE = re.compile(r"\b(sk|rk|pk)-[\w*.\-]+")
_MAX_PROVIDER_MESSAGE = 200


def status_error(status: int, headers: Mapping[str, str], body: object, api_key: str | None) -> LLMError:
    """An HTTP error status with its headers and (parsed) body, read as the `openai` client reads it: the body's
    `error` object when there is one."""
    data = body.get("error", body) if isinstance(body, dict) else body
    kinds = (data.get("code"), data.get("type")) if isinstance(data, dict) else ()
    wait_s = retry_after(headers)
    if status == 429:
        if "insufficient_quota" in kinds:
            # Quota does not come back within a retry budget: fail at once.
            return LLMRateLimited("the model provider's quota is used up")
        return LLMRateLimited("the model provider is rate limiting requests", retry_after=wait_s, retryable=True)
    if status >= 500 or status in (408, 409):
        return LLMUnavailable(f"the model provider failed ({status})", retry_after=wait_s, retryable=True)
    detail = provider_message(data, api_key)
    return LLMError(f"the provider rejected the request ({status})" + (f": {detail}" if detail else ""))


def provider_message(body: object, api_key: str | None) -> str:
    """The provider's own explanation, made safe to show: secrets redacted, length bounded."""
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        return ""
    if api_key:
        message = message.replace(api_key, "***")
    message = _SECRET_RE.sub(r"\1-***", " ".join(message.split()))
    if len(message) > _MAX_PROVIDER_MESSAGE:
        message = message[: _MAX_PROVIDER_MESSAGE - 1] + "…"
    return message


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asks us to wait, from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    seconds: float | None = None
    with suppress(ValueError, TypeError):
        if ms := headers.get("retry-after-ms"):
            seconds = float(ms) / 1000
        elif value := headers.get("retry-after"):
            try:
                seconds = float(value)
            except ValueError:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
    if seconds is None or not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def stream_error(error: Any) -> LLMError:
    """An `{"error": {...}}` event sent in place of the next chunk."""
    info: Mapping[str, Any] = error if isinstance(error, dict) else {"message": str(error)}
    kinds = {str(info.get("code")), str(info.get("type"))}
    if "insufficient_quota" in kinds:
        return LLMRateLimited("the model provider's quota is used up")
    if kinds & {"rate_limit_exceeded", "rate_limit_error", "requests", "tokens", "429"}:
        return LLMRateLimited("the model provider is rate limiting requests", retryable=True)
    if kinds & {"server_error", "overloaded", "overloaded_error", "internal_error", "500", "503"}:
        return LLMUnavailable("the model provider failed mid-answer", retryable=True)
    detail = provider_message(info, None)
    return LLMError("the model provider reported an error" + (f": {detail}" if detail else ""))
