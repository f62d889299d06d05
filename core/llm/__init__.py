"""The chat model behind the service: the interface, its two implementations, and the choice between them."""

from __future__ import annotations

from ..settings import Settings
from .base import LLM, ChatMessage, PieceStream, StreamStats
from .offline import OfflineLLM
from .openai_llm import OpenAILLM

__all__ = ["LLM", "ChatMessage", "OfflineLLM", "OpenAILLM", "PieceStream", "StreamStats", "make_llm"]


def make_llm(settings: Settings) -> LLM:
    """The offline demo model when no provider is configured (neither key nor base URL), else the real one."""
    if settings.offline:
        return OfflineLLM(token_delay_s=settings.offline_token_delay_s)
    return OpenAILLM(settings)
