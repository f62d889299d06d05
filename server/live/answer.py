"""One answer: streaming the model's pieces to the session's sink, and what is stored and counted when it ends."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.errors import LLMError, ProtocolError
from core.llm import PieceStream, StreamStats
from core.llm.tokens import estimate

from .. import protocol
from ..metrics import Metrics
from .audience import Audience

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Turn:
    """A user message waiting for, or getting, its answer."""

    text: str
    client_msg_id: str | None
    received_at: float  # time.time(), comparable with other processes' clocks on the machine
    stored: asyncio.Future[int] | None = None
    # The trace context it arrived in (the connection's span), when tracing is on.
    trace: Any = None


@dataclass(slots=True)
class Answer:
    """What one answer produced so far; filled in while it streams, so it is there when it fails or is stopped."""

    response_id: str
    parts: list[str] = field(default_factory=list)
    stats: StreamStats = field(default_factory=StreamStats)
    truncated: bool = False
    first_delta_at: float | None = None
    # The request's tokens as we counted them before sending it, for when the provider reports no usage.
    request_tokens: int | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Publisher(Protocol):
    def delta(self) -> None: ...


async def stream(
    pieces: PieceStream,
    answer: Answer,
    audience: Audience,
    publisher: Publisher | None,
    *,
    max_chars: int,
) -> None:
    """Relay the model's pieces (its request already sent) as `response.delta` frames; an answer longer than
    `max_chars` is cut there.

    The hot path: per piece one append, one frame and one send that normally completes without suspending.
    A delta's `seq` is the number of pieces so far, so a catch-up can say how far it goes.
    """
    delta, rid, parts = protocol.response_delta, answer.response_id, answer.parts
    room = max_chars
    async with aclosing(pieces):
        async for piece in pieces:
            room -= len(piece)
            if room < 0:
                piece = piece[: len(piece) + room]
                answer.truncated = True
            if piece:
                parts.append(piece)
                # Read per piece, so a connection that joins gets the next one; one member is the common case.
                everyone = audience.everyone
                if len(everyone) == 1:
                    await everyone[0].send(delta(rid, piece, len(parts)))
                else:
                    await audience.send(delta(rid, piece, len(parts)))
                if publisher is not None:
                    publisher.delta()
            if answer.first_delta_at is None:
                # The relay's added latency is measured up to here.
                answer.first_delta_at = time.time()
            if answer.truncated:
                return


def metadata(answer: Answer, turn: Turn, *, status: str, model: str, error: LLMError | None) -> dict[str, Any]:
    """The facts stored with the answer."""
    stats = answer.stats
    prompt_tokens, completion_tokens = stats.prompt_tokens, stats.completion_tokens
    # A provider that reports no usage (or an answer cut before its usage came): our own count, marked so.
    estimated = prompt_tokens is None or (completion_tokens is None and bool(answer.parts))
    if prompt_tokens is None:
        prompt_tokens = answer.request_tokens
    if completion_tokens is None and answer.parts:
        completion_tokens = estimate(answer.text)
    meta: dict[str, Any] = {
        "status": status,
        "response_id": answer.response_id,
        "model": model,
        "latency_ms": round((time.time() - turn.received_at) * 1000, 1),
        "first_token_ms": None if stats.first_token_s is None else round(stats.first_token_s * 1000, 1),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "retries": stats.retries,
        "in_reply_to": turn.client_msg_id,
        # Wall-clock times (epoch seconds): when the message arrived and when its first delta left.
        "received_at": round(turn.received_at, 6),
        "first_delta_at": answer.first_delta_at,
    }
    if estimated and prompt_tokens is not None:
        meta["tokens_estimated"] = True
    if answer.truncated:
        meta["truncated"] = True
    if error is not None:
        meta["error"] = {"code": error.code, "message": str(error)}
        if answer.parts:
            meta["partial_text"] = answer.text
    return meta


def answer_tokens(meta: dict[str, Any]) -> int:
    """The tokens an answer used, prompt and completion, as its stored metadata counts them."""
    total = 0
    for key in ("prompt_tokens", "completion_tokens"):
        if isinstance(value := meta.get(key), int):
            total += value
    return total


def observe(
    metrics: Metrics, session_id: str, answer: Answer, *, status: str, error: LLMError | None, model: str
) -> None:
    """Count the answer and log its one line."""
    stats = answer.stats
    metrics.answers.labels(status).inc()
    if stats.prompt_tokens is not None:
        metrics.token_usage.labels("chat", model, "input").observe(stats.prompt_tokens)
    if stats.completion_tokens is not None:
        metrics.token_usage.labels("chat", model, "output").observe(stats.completion_tokens)
    metrics.operation_duration.labels("chat", model, "" if error is None else error.code).observe(
        time.perf_counter() - answer.started
    )
    metrics.deltas_streamed.inc(len(answer.parts))
    if stats.completion_tokens:
        metrics.completion_tokens.inc(stats.completion_tokens)
    if stats.retries:
        metrics.llm_retries.inc(stats.retries)
    if stats.first_token_s is not None:
        metrics.first_token.observe(stats.first_token_s)
    if error is not None:
        metrics.llm_errors.labels(error.code).inc()
    log.info(
        "answer done",
        extra={
            "fields": {
                "session_id": session_id,
                "status": status,
                "error": None if error is None else error.code,
                "first_token_ms": None if stats.first_token_s is None else round(stats.first_token_s * 1000, 1),
                "deltas": len(answer.parts),
                "truncated": answer.truncated,
                "prompt_tokens": stats.prompt_tokens,
                "completion_tokens": stats.completion_tokens,
                "retries": stats.retries,
            }
        },
    )


class StoredNotAnswered(ProtocolError):
    """The message was stored but will not be answered here (the server is shutting down)."""

    def __init__(self, stored: asyncio.Future[int], client_msg_id: str | None) -> None:
        super().__init__(
            protocol.SHUTTING_DOWN, "the server is restarting: your message is stored but not answered here"
        )
        self.stored = stored
        self.client_msg_id = client_msg_id
