"""How a history becomes a summary request: the transcript, the chunks, and the offline demo's own summary."""

from __future__ import annotations

from datetime import UTC, datetime

from core.llm import OfflineLLM
from core.settings import Settings
from core.store import StoredEvent
from worker.summarize import chunk, summarize, transcript_lines


def _event(i: int, kind: str, text: str, **meta: object) -> StoredEvent:
    return StoredEvent(i, "s", kind, text, datetime.now(UTC), None, dict(meta))


def test_the_transcript_keeps_the_conversation_and_leaves_out_failed_answers():
    events = [
        _event(1, "connected", ""),
        _event(2, "user_message", "hi"),
        _event(3, "ai_message", "Sorry, I can't answer", status="failed"),
        _event(4, "user_message", "hi again"),
        _event(5, "ai_message", "hello", status="completed"),
    ]
    assert transcript_lines(events) == ["User: hi", "User: hi again", "Assistant: hello"]


def test_chunks_keep_order_and_stay_within_their_budget():
    lines = [f"User: line {i:02d}" for i in range(10)]  # 13 characters each
    chunks = chunk(lines, 30)
    assert [line for part in chunks for line in part] == lines
    assert all(sum(len(line) + 1 for line in part) <= 30 for part in chunks)
    assert chunk(["x" * 100], 30) == [["x" * 30]]


async def test_the_offline_model_gets_an_honest_summary_without_a_provider():
    events = [_event(1, "user_message", "plan a trip"), _event(2, "ai_message", "ok"), _event(3, "user_message", "bye")]
    summary = await summarize(OfflineLLM(token_delay_s=0), events, Settings())
    assert (
        summary
        == 'Offline demo summary: 2 user message(s) and 1 answer(s). It began with "plan a trip" and ended with "bye".'
    )
