"""The built-in offline demo model: a deterministic, network-free answer streamed word by word."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence

from ..settings import OFFLINE_MODEL
from .base import LLM, ChatMessage, StreamStats
from .tokens import MESSAGE_OVERHEAD, REPLY_OVERHEAD, estimate

_QUOTE_MAX = 200
_PIECE_RE = re.compile(r"\S+\s*")


class OfflineLLM(LLM):
    """Echoes the last user message and counts the turns, so the whole service can be tried without a provider."""

    def __init__(self, *, token_delay_s: float = 0.02) -> None:
        self.model = OFFLINE_MODEL
        self._token_delay_s = token_delay_s

    async def stream(
        self, messages: Sequence[ChatMessage], stats: StreamStats, *, max_tokens: int | None = None
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        pieces: list[str] = _PIECE_RE.findall(reply_for(messages))
        truncated = max_tokens is not None and len(pieces) > max_tokens
        pieces = pieces[:max_tokens]
        # Counted as the service estimates tokens, so that the demo's context budget behaves as a real one.
        # `max_tokens` counts pieces (words).
        stats.prompt_tokens = sum(estimate(m["content"]) + MESSAGE_OVERHEAD for m in messages) + REPLY_OVERHEAD
        stats.completion_tokens = 0
        stats.response_model = OFFLINE_MODEL
        said = ""
        for i, piece in enumerate(pieces):
            # Sleeping even for 0 s yields control, as a network read would: other sessions keep moving.
            await asyncio.sleep(self._token_delay_s if i else 0)
            if i == 0:
                stats.first_token_s = loop.time() - started
            said += piece
            stats.completion_tokens = estimate(said)
            yield piece
        stats.finish_reason = "length" if truncated else "stop"

    async def close(self) -> None:
        pass


def reply_for(messages: Sequence[ChatMessage]) -> str:
    """The offline answer to a conversation: the same messages always give the same text."""
    said = [m["content"] for m in messages if m["role"] == "user"]
    if not said:
        return "Offline demo model. Say something and I will echo it. Set OPENAI_API_KEY to talk to a real model."
    turn = len(said)
    quote = " ".join(said[-1].split())
    if len(quote) > _QUOTE_MAX:
        quote = quote[: _QUOTE_MAX - 1] + "…"
    earlier = turn - 1
    seen = (
        "This is your first message in this conversation."
        if earlier == 0
        else f"I can see {earlier} earlier message{'s' if earlier != 1 else ''} of yours in this conversation."
    )
    return f'Offline demo model, turn {turn}. You said: "{quote}". {seen} Set OPENAI_API_KEY to talk to a real model.'
