"""What the model is shown: the system prompt, then as many recent turns as the budget allows."""

from __future__ import annotations

from datetime import UTC, datetime

from core.store import StoredEvent
from server.live.context import Context


def _event(i: int, kind: str, text: str, **meta: object) -> StoredEvent:
    return StoredEvent(i, "s", kind, text, datetime.now(UTC), None, dict(meta))


def test_the_system_prompt_and_the_current_message_always_go_first_and_last():
    ctx = Context("SYS", max_chars=10)
    ctx.add("user", "a" * 50)
    assert ctx.messages() == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "a" * 50}]


def test_the_oldest_turns_go_first_when_over_budget():
    ctx = Context("SYS", max_chars=30)
    for i in range(5):
        ctx.add("user", f"question {i}")  # 10 characters each
        ctx.add("assistant", f"answer {i}!")  # 9
    ctx.add("user", "question 5")
    sent = ctx.messages()
    assert sent[0] == {"role": "system", "content": "SYS"}
    assert sent[-1] == {"role": "user", "content": "question 5"}
    assert sum(len(m["content"]) for m in sent[1:]) <= 30
    # Never opens with an answer whose question was dropped.
    assert sent[1]["role"] == "user"
    assert [m["content"] for m in sent[1:]] == ["question 4", "answer 4!", "question 5"]


def test_a_reloaded_context_leaves_out_failed_answers():
    ctx = Context("SYS", max_chars=1000)
    ctx.load(
        [
            _event(1, "user_message", "hi"),
            _event(2, "ai_message", "Sorry, I can't answer", status="failed"),
            _event(3, "user_message", "hi again"),
            _event(4, "ai_message", "hello", status="completed"),
            _event(5, "connected", ""),
        ]
    )
    assert [m["content"] for m in ctx.messages()[1:]] == ["hi", "hi again", "hello"]
