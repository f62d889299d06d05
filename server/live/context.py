"""A conversation's context: what the model sees, kept within a token budget, and compacted off the answer's path.

The request is the system prompt (with the session's context summary, once there is one) and every message after
the last one that summary covers. Each part carries its token count: the provider's, once a reported usage
accounts for it, else an estimate that errs high. When the parts pass the budget the oldest messages are left out
of the request (they are in the store, and the next summary covers them); past `compact_at` of the budget the
conversation asks the worker for a new summary, and `summarised` applies it whenever it lands.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from core.errors import LLMError
from core.llm import ChatMessage
from core.llm.tokens import MESSAGE_OVERHEAD, REPLY_OVERHEAD, Counter
from core.store import AI_MESSAGE, USER_MESSAGE, StoredEvent

# How the summary joins the system prompt: one system message, as every chat template accepts.
SUMMARY_HEADER = "\n\nSummary of the conversation before the messages below (names, numbers and decisions kept):\n"
# Of the budget: what a compaction leaves verbatim (the latest turns), and the most its summary may take.
KEEP_SHARE = 0.25
SUMMARY_SHARE = 0.2
# A summary larger than this share of the budget is refused (it is asked for at SUMMARY_SHARE).
SUMMARY_MAX_SHARE = 0.5
# A provider far off our estimate is a sign of a bad report, not of a tokenizer: calibration stays inside this.
_MAX_CALIBRATION = 4.0


class ContextTooLong(LLMError):
    """Even the message being answered does not fit the budget beside the system prompt and the summary."""


@dataclass(slots=True)
class Part:
    """One piece of the request and its tokens: the provider's count once a reported usage covered it
    (`estimated` False), else our estimate."""

    message: ChatMessage
    tokens: int
    estimated: bool = True
    # The stored event id, or its pending write; None for the system prompt and the summary.
    stored: asyncio.Future[int] | int | None = None

    @property
    def role(self) -> str:
        return self.message["role"]

    @property
    def text(self) -> str:
        return self.message["content"]

    @property
    def stored_id(self) -> int | None:
        stored = self.stored
        if isinstance(stored, int) or stored is None:
            return stored
        if stored.done() and not stored.cancelled() and stored.exception() is None:
            return stored.result()
        return None


class Context:
    """The conversation as the model sees it, oldest first, within `budget` tokens as the provider counts them."""

    def __init__(self, system_prompt: str, *, budget: int, compact_at: float, count: Counter) -> None:
        self.budget = budget
        self._compact_above = int(budget * compact_at)
        self._count = count
        self._calibration = 1.0
        self._system: ChatMessage = {"role": "system", "content": system_prompt}
        self._prompt = Part(self._system, count(system_prompt) + MESSAGE_OVERHEAD)
        self._summary: Part | None = None
        # The id of the last message the summary covers, and of the last one left out of the request.
        self.summary_through = 0
        self.dropped_through = 0
        # A list, not a deque: an empty deque costs 600 bytes per session, and the budget keeps this short.
        self._parts: list[Part] = []
        self._tokens = 0  # of `_parts`
        # The parts of the last request, for `observed`; void once the parts change under it.
        self._sent: list[Part] | None = None

    @property
    def tokens(self) -> int:
        """The next request's tokens, as far as known: prompt, summary, messages and the reply's priming."""
        summary = 0 if self._summary is None else self._summary.tokens
        return self._prompt.tokens + summary + self._tokens + REPLY_OVERHEAD

    def add(
        self,
        role: Literal["user", "assistant"],
        text: str,
        *,
        stored: asyncio.Future[int] | int | None = None,
        tokens: int | None = None,
    ) -> None:
        """Append a message; `tokens` when the provider counted it (a completed answer's completion tokens)."""
        message: ChatMessage = {"role": role, "content": text}
        if tokens is None:
            part = Part(message, self._estimate(text), stored=stored)
        else:
            part = Part(message, tokens + MESSAGE_OVERHEAD, estimated=False, stored=stored)
        self._parts.append(part)
        self._tokens += part.tokens

    def fits(self, text: str) -> bool:
        """Whether a message of `text` could be answered at all: alone beside the prompt and the summary."""
        summary = 0 if self._summary is None else self._summary.tokens
        return self._prompt.tokens + summary + self._estimate(text) + REPLY_OVERHEAD <= self.budget

    def load(self, events: Iterable[StoredEvent], summary: StoredEvent | None = None) -> None:
        """Rebuild from the store: the last context summary, then the messages after what it covers. Failed answers
        (the fallback text) are left out, as in a live session."""
        if summary is not None:
            text = summary.content or ""
            tokens = summary.metadata.get("tokens")
            if not isinstance(tokens, int):
                tokens = self._count(text)
            self._set_summary(text, through=int(summary.metadata["through"]), tokens=tokens)
        for event in events:
            if event.id <= self.summary_through:
                continue
            if event.event_type == USER_MESSAGE:
                self.add("user", event.content or "", stored=event.id)
            elif event.event_type == AI_MESSAGE and event.metadata.get("status") != "failed":
                meta = event.metadata
                exact = (
                    meta.get("status") == "completed" and not meta.get("truncated") and not meta.get("tokens_estimated")
                )
                tokens = meta.get("completion_tokens") if exact else None
                self.add("assistant", event.content or "", stored=event.id, tokens=tokens)

    def request(self) -> tuple[list[ChatMessage], int]:
        """The request for answering the last message, and how many old messages had to be left out of it to stay
        within the budget. Raises ContextTooLong when even the last message alone does not fit."""
        parts = self._parts
        dropped = 0
        while len(parts) > 1 and (
            self.tokens > self.budget or (self._summary is None and parts[0].role == "assistant")
        ):
            # Without a summary, a context that opens with an answer reads as if the model spoke first.
            self._drop_oldest()
            dropped += 1
        if self.tokens > self.budget:
            raise ContextTooLong(f"the message does not fit the model's context budget ({self.budget} tokens)")
        self._sent = list(parts)
        system = self._system
        if self._summary is not None:
            system = {"role": "system", "content": self._prompt.text + SUMMARY_HEADER + self._summary.text}
        return [system, *(p.message for p in parts)], dropped

    def observed(self, prompt_tokens: int) -> None:
        """The provider counted the last request: its parts now carry the provider's counts, and what it says of
        our estimates calibrates the next ones."""
        sent, self._sent = self._sent, None
        if sent is None:
            return
        parts = [self._prompt, *([] if self._summary is None else [self._summary]), *sent]
        guessed = [p for p in parts if p.estimated]
        known = sum(p.tokens for p in parts if not p.estimated) + REPLY_OVERHEAD
        if not guessed:
            # Counts taken from elsewhere (an answer's completion tokens) can be off by a few: the newest absorbs it.
            guessed = [parts[-1]]
            known -= parts[-1].tokens
        estimated = sum(p.tokens for p in guessed)
        ratio = max(prompt_tokens - known, len(guessed)) / estimated
        for part in guessed:
            tokens = max(1, round(part.tokens * ratio))
            if part is not self._prompt and part is not self._summary:
                self._tokens += tokens - part.tokens
            part.tokens, part.estimated = tokens, False
        # Only ever upwards from the conservative count: a lower estimate would save little (it applies to the
        # newest message only) and could cross the budget for text unlike the last.
        self._calibration = min(_MAX_CALIBRATION, max(1.0, self._calibration * ratio))

    def wants_compaction(self) -> bool:
        """Past `compact_at` of the budget, or messages left out that no summary covers yet."""
        return self.tokens > self._compact_above or self.dropped_through > self.summary_through

    def compaction_cursor(self) -> int | None:
        """The last stored message a new summary should cover: all but the latest turns, which stay verbatim
        (within KEEP_SHARE of the budget, starting with a user message). None when nothing new can be covered."""
        keep = self.budget * KEEP_SHARE
        parts = list(self._parts)
        kept = 0
        cut = len(parts)
        while cut > 0 and kept + parts[cut - 1].tokens <= keep:
            cut -= 1
            kept += parts[cut].tokens
        # The kept turns start with a question; the message being answered always stays.
        while cut < len(parts) - 1 and parts[cut].role == "assistant":
            cut += 1
        cut = min(cut, len(parts) - 1)
        through = self.dropped_through
        # The newest covered message whose write has landed (the last answer's may still be on its way).
        for part in reversed(parts[:cut]):
            stored = part.stored_id
            if stored is not None:
                through = max(through, stored)
                break
        return through if through > self.summary_through else None

    def summarised(self, text: str, *, through: int, tokens: int) -> tuple[int, int] | None:
        """Apply a new context summary that covers the messages up to `through`: (tokens before, tokens after), or
        None when the summary in use already covers as much. Messages after `through` (newer than the job) stay."""
        if through <= self.summary_through:
            return None
        if tokens > self.budget * SUMMARY_MAX_SHARE:
            # A summary that leaves no room for the conversation (a worker with another budget, a model that
            # ignored max_tokens) is not used: trimming keeps the requests within the budget meanwhile.
            return None
        before = self.tokens
        parts = self._parts
        while parts:
            stored = parts[0].stored_id
            if stored is None or stored > through:
                break
            self._tokens -= parts.pop(0).tokens
        self._set_summary(text, through=through, tokens=tokens)
        return before, self.tokens

    def _set_summary(self, text: str, *, through: int, tokens: int) -> None:
        self._summary = Part({"role": "system", "content": text}, tokens + self._count(SUMMARY_HEADER))
        self.summary_through = through
        self.dropped_through = max(self.dropped_through, through)
        self._sent = None

    def _drop_oldest(self) -> None:
        part = self._parts.pop(0)
        self._tokens -= part.tokens
        stored = part.stored_id
        if stored is not None:
            self.dropped_through = max(self.dropped_through, stored)

    def _estimate(self, text: str) -> int:
        return math.ceil(self._count(text) * self._calibration) + MESSAGE_OVERHEAD
