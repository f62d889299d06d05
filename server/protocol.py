"""The wire protocol (version 1.1): parsing client frames and building every server event, in one place."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

from core.errors import ProtocolError
from core.store import AI_MESSAGE, StoredEvent

SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_CLIENT_MSG_ID: Final = 128

# Error codes sent in `error` events.
INVALID_MESSAGE: Final = "invalid_message"
UNKNOWN_TYPE: Final = "unknown_type"
MESSAGE_TOO_LONG: Final = "message_too_long"
UNSUPPORTED_FRAME: Final = "unsupported_frame"
RATE_LIMITED: Final = "rate_limited"
BUDGET_EXCEEDED: Final = "budget_exceeded"
BUSY: Final = "busy"
READ_ONLY: Final = "read_only"
SHUTTING_DOWN: Final = "shutting_down"

# Close codes beyond the standard ones aiohttp names.
CLOSE_REPLACED: Final = 4000
CLOSE_IDLE: Final = 4001

# `response.done` statuses.
COMPLETED: Final = "completed"
CANCELLED: Final = "cancelled"
FAILED: Final = "failed"
INTERRUPTED: Final = "interrupted"

# Connection modes (query `mode=`).
WRITE: Final = "write"
WATCH: Final = "watch"


@dataclass(frozen=True, slots=True)
class UserMessage:
    text: str
    client_msg_id: str | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    pass


ClientFrame = UserMessage | Cancel | Ping
_CANCEL: Final = Cancel()
_PING: Final = Ping()


def valid_session_id(session_id: str) -> bool:
    return SESSION_ID_RE.fullmatch(session_id) is not None


def parse_frame(text: str, *, max_message_bytes: int) -> ClientFrame:
    """Read one client text frame; raise ProtocolError with the protocol's code when it breaks a rule."""
    if not text.lstrip().startswith("{"):
        return _user_message(text, None, max_message_bytes)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        # Any text that is not a JSON object is a message, verbatim: "{oops" included.
        return _user_message(text, None, max_message_bytes)

    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(INVALID_MESSAGE, 'a JSON frame needs a string "type"')
    if kind == "message":
        body = obj.get("text")
        if not isinstance(body, str):
            raise ProtocolError(INVALID_MESSAGE, '"text" must be a string')
        client_msg_id = obj.get("client_msg_id")
        if client_msg_id is not None:
            if not isinstance(client_msg_id, str) or not client_msg_id:
                raise ProtocolError(INVALID_MESSAGE, '"client_msg_id" must be a non-empty string')
            if len(client_msg_id) > MAX_CLIENT_MSG_ID:
                raise ProtocolError(INVALID_MESSAGE, f'"client_msg_id" is longer than {MAX_CLIENT_MSG_ID} characters')
            if "\x00" in client_msg_id:
                # PostgreSQL text cannot hold NUL: the id could not be stored as sent, nor a retry recognised.
                raise ProtocolError(INVALID_MESSAGE, '"client_msg_id" contains a NUL character')
        return _user_message(body, client_msg_id, max_message_bytes)
    if kind == "cancel":
        return _CANCEL
    if kind == "ping":
        return _PING
    raise ProtocolError(UNKNOWN_TYPE, f"unknown frame type {kind[:64]!r}")


def _user_message(text: str, client_msg_id: str | None, max_message_bytes: int) -> UserMessage:
    if not text.strip():
        raise ProtocolError(INVALID_MESSAGE, "the message text is empty")
    # Cheap bound first: a UTF-8 character is at most 4 bytes.
    if len(text) * 4 > max_message_bytes and len(text.encode("utf-8", "surrogatepass")) > max_message_bytes:
        raise ProtocolError(MESSAGE_TOO_LONG, f"the message is longer than {max_message_bytes} bytes of UTF-8")
    if "\x00" in text:
        raise ProtocolError(INVALID_MESSAGE, "the message contains a NUL character")
    return UserMessage(text, client_msg_id)


def _dumps(event: dict[str, Any]) -> bytes:
    return compact(orjson.dumps(event))


def compact(data: bytes) -> bytes:
    """`data` in a buffer of its own size. orjson's output keeps the 4 KiB buffer it was written into: a frame
    that is kept (a session's `session.ready`, the last stored answer, a queue behind a slow reader) would hold
    4 KiB however short it is. A delta that is sent at once is not worth the copy."""
    return bytes(memoryview(data))


def _iso(ts: datetime) -> str:
    return ts.isoformat()


def parse_resume(raw: str | None) -> tuple[str, int] | None:
    """`resume=<response_id>:<seq>`; raises ValueError when it is not that shape."""
    if raw is None or raw == "":
        return None
    response_id, sep, seq = raw.rpartition(":")
    if not sep or not response_id or not seq.isascii() or not seq.isdigit() or len(seq) > 12:
        raise ValueError(raw)
    return response_id, int(seq)


def history_item(event: StoredEvent) -> dict[str, Any]:
    item = {
        "id": event.id,
        "role": "assistant" if event.event_type == AI_MESSAGE else "user",
        "text": event.content or "",
        "created_at": _iso(event.created_at),
    }
    if event.event_type == AI_MESSAGE:
        item["status"] = event.metadata.get("status") or COMPLETED
    return item


def session_ready(
    session_id: str,
    *,
    resumed: bool,
    model: str,
    history: Iterable[StoredEvent],
    active_response: dict[str, Any] | None = None,
    mode: str = WRITE,
) -> bytes:
    return _dumps(
        {
            "type": "session.ready",
            "session_id": session_id,
            "resumed": resumed,
            "model": model,
            "history": [history_item(e) for e in history],
            "active_response": active_response,
            "mode": mode,
        }
    )


def response_started(response_id: str, client_msg_id: str | None, *, resumed: bool = False) -> bytes:
    return _dumps(
        {"type": "response.started", "response_id": response_id, "client_msg_id": client_msg_id, "resumed": resumed}
    )


def response_delta(response_id: str, delta: str, seq: int) -> bytes:
    # The hot path: one small dict and one orjson call per piece of text.
    return orjson.dumps({"type": "response.delta", "response_id": response_id, "delta": delta, "seq": seq})


def response_done(response_id: str, *, status: str, text: str, error_code: str | None, error_message: str) -> bytes:
    error = None if error_code is None else {"code": error_code, "message": error_message}
    return _dumps({"type": "response.done", "response_id": response_id, "status": status, "text": text, "error": error})


def user_message_stored(event_id: int, client_msg_id: str | None, text: str) -> bytes:
    return _dumps(
        {"type": "message.stored", "id": event_id, "role": "user", "client_msg_id": client_msg_id, "text": text}
    )


def answer_stored(event_id: int, response_id: str, *, text: str, status: str) -> bytes:
    return _dumps(
        {
            "type": "message.stored",
            "id": event_id,
            "role": "assistant",
            "response_id": response_id,
            "text": text,
            "status": status,
        }
    )


def context_compacted(through: int, *, tokens_before: int, tokens_after: int) -> bytes:
    return _dumps(
        {"type": "context.compacted", "through": through, "tokens_before": tokens_before, "tokens_after": tokens_after}
    )


def error(code: str, message: str) -> bytes:
    return _dumps({"type": "error", "code": code, "message": message})


PONG: Final = _dumps({"type": "pong"})


def http_error(code: str, message: str) -> dict[str, Any]:
    """The body of every HTTP error answer."""
    return {"error": {"code": code, "message": message}}
