"""The model interface the service depends on: chat messages in, pieces of text out, our own errors on failure."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict


class ChatMessage(TypedDict):
    """One turn of the conversation as the model sees it."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(slots=True)
class StreamStats:
    """Facts about one answer, filled in by the stream as it goes, so they are there even when it fails midway.

    The token counts are the provider's own when it reports them, and stay None when it does not."""

    retries: int = 0
    first_token_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    # The model that answered, as the provider names it (it may differ from the one asked for).
    response_model: str | None = None


class PieceStream(Protocol):
    """What `LLM.stream` returns: the answer's pieces, and `aclose` to stop the request (also one never read)."""

    def __aiter__(self) -> AsyncIterator[str]: ...

    def __anext__(self) -> Awaitable[str]: ...

    async def aclose(self) -> None: ...


class LLM(Protocol):
    """A chat model that streams its answer.

    `stream` returns an async iterator of non-empty pieces of text, at most `max_tokens` tokens of them when given
    (else the implementation's default). It may send the request at the call, before the first read. It raises
    `LLMError` subclasses only; closing or cancelling it closes the upstream request at once, so the provider stops
    generating (and billing).

    Implementations subclass this protocol to inherit `complete`, written once here on top of `stream`.
    """

    model: str

    # Closable, so callers can `aclosing()` it: an async generator is one.
    def stream(
        self, messages: Sequence[ChatMessage], stats: StreamStats, *, max_tokens: int | None = None
    ) -> PieceStream: ...

    async def complete(
        self, messages: Sequence[ChatMessage], *, max_tokens: int | None = None, stats: StreamStats | None = None
    ) -> str:
        """The whole answer at once, for callers that do not show it as it comes (summaries); `stats` gets the
        usage the provider reports."""
        stats = StreamStats() if stats is None else stats
        async with aclosing(self.stream(messages, stats, max_tokens=max_tokens)) as pieces:
            return "".join([piece async for piece in pieces])

    async def close(self) -> None: ...
