"""A conversation's context: the turns the model sees, trimmed to a budget."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from core.llm import ChatMessage
from core.store import AI_MESSAGE, USER_MESSAGE, StoredEvent


class Context:
    """The conversation so far, oldest first, bounded to `max_chars` of message text.

    The budget is counted in characters, not tokens: tokenizers differ per provider and the
    limit only has to keep requests well inside the model's window. The system prompt and the
    message being answered are never dropped; older turns go first.
    """

    def __init__(self, system_prompt: str, *, max_chars: int) -> None:
        self._system: ChatMessage = {"role": "system", "content": system_prompt}
        self._max_chars = max_chars
        self._turns: deque[ChatMessage] = deque()
        self._chars = 0

    def add(self, role: str, text: str) -> None:
        message: ChatMessage = {"role": "assistant" if role == "assistant" else "user", "content": text}
        self._turns.append(message)
        self._chars += len(text)

    def load(self, events: Iterable[StoredEvent]) -> None:
        """Rebuild from stored messages; failed answers (the fallback text) are left out, as in a live session."""
        for event in events:
            if event.event_type == USER_MESSAGE:
                self.add("user", event.content or "")
            elif event.event_type == AI_MESSAGE and event.metadata.get("status") != "failed":
                self.add("assistant", event.content or "")

    def messages(self) -> list[ChatMessage]:
        """The request for answering the last message: system prompt, then as many recent turns as fit."""
        if not self._turns:
            return [self._system]
        # Forget turns that can never fit again; the context only grows from here.
        while len(self._turns) > 1 and self._chars > self._max_chars:
            self._chars -= len(self._turns.popleft()["content"])
        # A context that opens with an answer reads as if the model spoke first.
        while len(self._turns) > 1 and self._turns[0]["role"] == "assistant":
            self._chars -= len(self._turns.popleft()["content"])
        return [self._system, *self._turns]
