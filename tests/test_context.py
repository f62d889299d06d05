"""What the model is shown: the system prompt (with the context summary), then the messages after what the summary
covers, within a token budget as the provider counts it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.llm.tokens import MESSAGE_OVERHEAD, REPLY_OVERHEAD, estimate
from core.store import StoredEvent
from server.live.context import SUMMARY_HEADER, Context
from tests.fakes import openai_server as fake

SYS = "You are a test assistant."


def _event(i: int, kind: str, text: str, **meta: object) -> StoredEvent:
    return StoredEvent(i, "s", kind, text, datetime.now(UTC), None, dict(meta))


def _context(budget: int = 10_000, compact_at: float = 0.75) -> Context:
    return Context(SYS, budget=budget, compact_at=compact_at, count=estimate)


def _texts(messages: list) -> list[str]:
    return [m["content"] for m in messages[1:]]


def test_the_system_prompt_and_the_current_message_always_go_first_and_last():
    ctx = _context()
    ctx.add("user", "hello", stored=1)
    messages, dropped = ctx.request()
    assert messages == [{"role": "system", "content": SYS}, {"role": "user", "content": "hello"}]
    assert dropped == 0


def test_the_oldest_turns_are_left_out_to_stay_within_the_budget_and_never_open_with_an_answer():
    ctx = _context(budget=60)
    for i in range(5):
        ctx.add("user", f"question number {i}", stored=2 * i + 1)
        ctx.add("assistant", f"answer number {i}", stored=2 * i + 2)
    ctx.add("user", "question number 5", stored=11)
    messages, dropped = ctx.request()
    assert ctx.tokens <= 60
    assert messages[1]["role"] == "user" and messages[-1]["content"] == "question number 5"
    assert dropped == 10 - (len(messages) - 2)
    # What was left out is remembered, so the next summary covers it.
    assert ctx.dropped_through == 10 - (len(messages) - 2)
    assert ctx.wants_compaction()


def test_a_message_that_cannot_fit_even_alone_is_refused_before_it_is_sent():
    ctx = _context(budget=40)
    assert ctx.fits("short")
    assert not ctx.fits("word " * 100)


def test_a_reloaded_context_leaves_out_failed_answers():
    ctx = _context()
    ctx.load(
        [
            _event(1, "user_message", "hi"),
            _event(2, "ai_message", "Sorry, I can't answer", status="failed"),
            _event(3, "user_message", "hi again"),
            _event(4, "ai_message", "hello", status="completed"),
            _event(5, "connected", ""),
        ]
    )
    assert _texts(ctx.request()[0]) == ["hi", "hi again", "hello"]


def test_a_reloaded_context_starts_from_the_last_summary_and_the_messages_after_it():
    ctx = _context()
    summary = _event(9, "context_summary", "The user is Ada; order KX-4417.", through=4, tokens=12)
    ctx.load(
        [
            _event(1, "user_message", "I am Ada"),
            _event(2, "ai_message", "Hi Ada", status="completed"),
            _event(3, "user_message", "order KX-4417"),
            _event(4, "ai_message", "Noted", status="completed"),
            _event(5, "user_message", "what next?"),
        ],
        summary,
    )
    messages, _ = ctx.request()
    assert messages[0] == {"role": "system", "content": SYS + SUMMARY_HEADER + "The user is Ada; order KX-4417."}
    assert _texts(messages) == ["what next?"]
    assert ctx.summary_through == 4


def test_the_providers_count_replaces_the_estimate_and_raises_the_next_ones():
    ctx = _context()
    ctx.add("user", "hello there", stored=1)
    ctx.request()
    before = ctx.tokens
    # The provider counts twice what we guessed: after it says so, the context holds its count...
    ctx.observed(2 * before)
    assert ctx.tokens == 2 * before
    # ...and the next message is estimated at the provider's rate, not below it.
    ctx.add("assistant", "hi", stored=2, tokens=1)
    ctx.add("user", "how are you", stored=3)
    assert ctx.tokens - (2 * before + 1 + MESSAGE_OVERHEAD) >= 2 * estimate("how are you")


def test_a_provider_that_counts_fewer_tokens_never_lowers_the_estimate_below_the_conservative_one():
    ctx = _context()
    ctx.add("user", "hello there", stored=1)
    ctx.request()
    ctx.observed(5)
    ctx.add("user", "how are you doing today", stored=2)
    assert ctx.tokens >= 5 + estimate("how are you doing today") + MESSAGE_OVERHEAD


def test_a_compaction_covers_all_but_the_latest_turns_which_start_with_a_question():
    ctx = _context(budget=400)
    for i in range(1, 21):
        ctx.add("user" if i % 2 else "assistant", f"message {i} " + "x" * 30, stored=i)
    ctx.add("user", "the question now", stored=21)
    assert ctx.wants_compaction()
    through = ctx.compaction_cursor()
    assert through is not None and through % 2 == 0  # it ends with an answer
    kept_tokens = ctx.tokens
    changed = ctx.summarised("SUMMARY", through=through, tokens=3)
    assert changed is not None
    before, after = changed
    assert before == kept_tokens and after < before
    messages, _ = ctx.request()
    assert messages[1]["role"] == "user"
    assert _texts(messages)[0] == f"message {through + 1} " + "x" * 30
    assert _texts(messages)[-1] == "the question now"
    assert after <= 400 * 0.25 + estimate(SYS) + estimate(SUMMARY_HEADER) + 3 + MESSAGE_OVERHEAD + REPLY_OVERHEAD


def test_a_summary_that_started_before_newer_messages_still_applies_up_to_its_own_cursor():
    ctx = _context()
    for i in range(1, 7):
        ctx.add("user" if i % 2 else "assistant", f"m{i}", stored=i)
    assert ctx.summarised("S", through=2, tokens=1) is not None
    assert _texts(ctx.request()[0]) == ["m3", "m4", "m5", "m6"]
    # An older summary arriving late changes nothing.
    assert ctx.summarised("OLDER", through=1, tokens=1) is None
    assert ctx.request()[0][0]["content"].endswith("S")


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog, and then it naps until noon.",
        "我们明天上午十点在北京见面，请带上你的护照和订单号码。",
        "東京の天気は晴れです。明日も晴れるでしょう。",
        "Emoji check: 🎉🚀✨ and mixed 中文 text.",
    ],
)
def test_the_estimate_is_never_below_the_stand_in_providers_count(text: str):
    assert estimate(text) >= fake.count_tokens(text)
    # Where four characters a token would undercount (what a guess from characters gets wrong).
    if not text.isascii():
        assert len(text) / 4 < fake.count_tokens(text)


def test_without_a_cached_encoding_the_tokenizer_is_estimated_and_nothing_is_downloaded(monkeypatch, tmp_path):
    import tiktoken.load

    from core.llm.tokens import counter_for

    def download(blobpath: str) -> bytes:
        raise AssertionError(f"a tokenizer download was attempted: {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", download)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    # An OpenAI model (tiktoken knows its encoding, but its file is not on disk) and a model tiktoken does not know.
    assert counter_for("gpt-4o-mini") is estimate
    assert counter_for("llama-3.1-8b-instruct") is estimate
