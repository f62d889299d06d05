"""The LLM client against a real local OpenAI-compatible server: streaming, retries, timeouts, errors, closing."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import pytest
import pytest_asyncio

from core.errors import LLMError, LLMRateLimited, LLMUnavailable
from core.llm import LLM, ChatMessage, OfflineLLM, OpenAILLM, StreamStats, make_llm
from core.llm.tokens import estimate
from core.settings import Settings
from tests.fakes import openai_server as fake_api
from tests.fakes.openai_server import FakeOpenAI

HELLO: list[ChatMessage] = [
    {"role": "system", "content": "You are a test assistant."},
    {"role": "user", "content": "Hello there, how are you today?"},
]
MakeLLM = Callable[..., OpenAILLM]


@pytest_asyncio.fixture(scope="module")
async def _server() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def upstream(_server: FakeOpenAI) -> FakeOpenAI:
    _server.reset()
    return _server


@pytest_asyncio.fixture
async def make(upstream: FakeOpenAI) -> AsyncIterator[MakeLLM]:
    """A real OpenAILLM pointed at the fake; keyword arguments override settings."""
    made: list[OpenAILLM] = []

    def build(**overrides: Any) -> OpenAILLM:
        values: dict[str, Any] = {
            "openai_base_url": upstream.base_url,
            "openai_api_key": "test-key",
            "openai_model": "fake-model",
            "llm_connect_timeout_s": 1.0,
            "llm_first_token_timeout_s": 2.0,
            "llm_token_gap_timeout_s": 2.0,
            "llm_max_retries": 2,
            "llm_retry_budget_s": 5.0,
            "llm_retry_after_cap_s": 0.05,
        }
        llm = OpenAILLM(Settings(**{**values, **overrides}))
        made.append(llm)
        return llm

    yield build
    for llm in made:
        await llm.close()


async def answer(
    llm: LLM, messages: Sequence[ChatMessage] = HELLO, stats: StreamStats | None = None, pieces: list[str] | None = None
) -> str:
    """The whole streamed answer; `pieces` collects what was yielded, also when the stream fails midway."""
    pieces = [] if pieces is None else pieces
    async with aclosing(llm.stream(messages, stats or StreamStats())) as stream:
        async for piece in stream:
            assert piece, "never an empty piece"
            pieces.append(piece)
    return "".join(pieces)


async def test_the_answer_streams_in_pieces_and_the_request_reaches_the_provider(
    make: MakeLLM, upstream: FakeOpenAI
) -> None:
    stats = StreamStats()
    pieces: list[str] = []
    # Paced, so each chunk is its own network read (chunks that arrive together are joined into one piece).
    upstream.token_delay = 0.005

    assert await answer(make(), stats=stats, pieces=pieces) == "You said: Hello there, how are you today?"

    assert len(pieces) > 1
    [body] = upstream.requests
    assert body["model"] == "fake-model"
    assert body["messages"] == HELLO
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert "max_tokens" not in body
    assert upstream.headers[0]["Authorization"] == "Bearer test-key"
    assert stats.finish_reason == "stop"
    # The provider's own counts, as it reports them.
    assert stats.prompt_tokens == fake_api.prompt_tokens(list(HELLO))
    assert stats.completion_tokens == fake_api.count_tokens("You said: Hello there, how are you today?")
    assert stats.first_token_s is not None and stats.retries == 0


async def test_complete_joins_the_answer_and_sends_max_tokens(make: MakeLLM, upstream: FakeOpenAI) -> None:
    assert await make(openai_max_tokens=50).complete(HELLO) == "You said: Hello there, how are you today?"
    assert await make(openai_max_tokens=50).complete(HELLO, max_tokens=7) == "You said: Hello there, how are you today?"
    assert [r["max_tokens"] for r in upstream.requests] == [50, 7]


async def test_a_server_that_ignores_stream_options_still_answers_without_token_counts(
    make: MakeLLM, upstream: FakeOpenAI
) -> None:
    upstream.reports_usage = False
    stats = StreamStats()

    assert await answer(make(), stats=stats) == "You said: Hello there, how are you today?"

    assert stats.finish_reason == "stop"
    assert stats.prompt_tokens is None and stats.completion_tokens is None


async def test_a_stream_sends_its_own_max_tokens_else_the_configured_one(make: MakeLLM, upstream: FakeOpenAI) -> None:
    llm = make(openai_max_tokens=50)
    async with aclosing(llm.stream(HELLO, StreamStats(), max_tokens=3)) as stream:
        assert [piece async for piece in stream]
    await answer(llm)

    assert [r["max_tokens"] for r in upstream.requests] == [3, 50]


async def test_a_local_server_needs_no_api_key(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.reply("Hi!"))
    assert await answer(make(openai_api_key=None)) == "Hi!"


async def test_events_split_across_reads_with_keepalives_and_crlf_decode_whole(
    make: MakeLLM, upstream: FakeOpenAI
) -> None:
    text = "Grüße aus Köln 🙂, naïve café — done."
    upstream.script(fake_api.fragmented(text, every=3))
    assert await answer(make()) == text


async def test_chunks_arriving_in_one_read_are_yielded_joined(make: MakeLLM, upstream: FakeOpenAI) -> None:
    chunks = [f"word{i} " for i in range(10)]
    upstream.script(fake_api.reply("".join(chunks), chunks, one_write=True))
    pieces: list[str] = []

    assert await answer(make(), pieces=pieces) == "".join(chunks)
    assert len(pieces) < len(chunks)


async def test_rate_limited_then_answered_after_the_capped_retry_after(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.rate_limited(retry_after=30), fake_api.reply("Now I can."))
    stats = StreamStats()
    started = time.monotonic()

    assert await answer(make(llm_retry_after_cap_s=0.5), stats=stats) == "Now I can."

    # Waited the Retry-After, capped from 30 s to 0.5 s (backoff alone would be at most 0.25 s).
    assert 0.45 <= time.monotonic() - started < 3
    assert stats.retries == 1 and len(upstream.requests) == 2


async def test_a_retry_after_past_the_budget_fails_at_once(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.rate_limited(retry_after=2), fake_api.reply("too late"))
    stats = StreamStats()

    with pytest.raises(LLMRateLimited):
        await answer(make(llm_retry_after_cap_s=5.0, llm_retry_budget_s=1.0), stats=stats)

    assert stats.retries == 0 and len(upstream.requests) == 1


async def test_quota_exhausted_fails_at_once(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.rate_limited(quota=True), fake_api.reply("never"))

    with pytest.raises(LLMRateLimited, match="quota"):
        await answer(make())

    assert len(upstream.requests) == 1


async def test_server_errors_are_retried_then_reported_unavailable(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(*[fake_api.server_error(s) for s in (500, 502, 503)], fake_api.reply("never"))
    stats = StreamStats()

    with pytest.raises(LLMUnavailable, match=r"\(503\)"):
        await answer(make(llm_max_retries=2), stats=stats)

    assert stats.retries == 2 and len(upstream.requests) == 3


async def test_a_server_error_then_an_answer(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.server_error(503), fake_api.reply("Back again."))
    stats = StreamStats()
    assert await answer(make(), stats=stats) == "Back again."
    assert stats.retries == 1


async def test_a_rejected_request_is_not_retried_and_says_why(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.rejected(400, "Invalid value for 'messages'."), fake_api.reply("never"))

    with pytest.raises(LLMError) as caught:
        await answer(make())

    assert type(caught.value) is LLMError
    assert str(caught.value) == "the provider rejected the request (400): Invalid value for 'messages'."
    assert len(upstream.requests) == 1


async def test_a_bad_key_error_never_shows_the_key(make: MakeLLM, upstream: FakeOpenAI) -> None:
    key = "sk-proj-SECRET1234567890"
    message = f"Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com."
    upstream.script(fake_api.rejected(401, message, code="invalid_api_key"))

    with pytest.raises(LLMError, match=r"rejected the request \(401\)") as caught:
        await answer(make(openai_api_key=key))

    assert "SECRET" not in str(caught.value)


@pytest.mark.parametrize("scenario", [fake_api.hang(), fake_api.hang_after_headers()], ids=["before", "after"])
async def test_a_provider_that_never_starts_answering_times_out(
    make: MakeLLM, upstream: FakeOpenAI, scenario: fake_api.Scenario
) -> None:
    upstream.script(scenario)
    started = time.monotonic()

    with pytest.raises(LLMUnavailable, match="first token timeout"):
        await answer(make(llm_first_token_timeout_s=0.3, llm_max_retries=0))

    assert 0.25 <= time.monotonic() - started < 2
    await upstream.wait_for_disconnect(2)


async def test_a_first_token_timeout_is_retried(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.hang_after_headers(), fake_api.reply("Sorry for the wait."))
    stats = StreamStats()
    assert await answer(make(llm_first_token_timeout_s=0.3), stats=stats) == "Sorry for the wait."
    assert stats.retries == 1


async def test_a_stall_midway_times_out_after_the_pieces_before_it(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.stall_after(2), fake_api.reply("never"))
    pieces: list[str] = []
    started = time.monotonic()

    with pytest.raises(LLMUnavailable, match="token gap timeout"):
        await answer(make(llm_token_gap_timeout_s=0.3), pieces=pieces)

    assert time.monotonic() - started < 2
    assert "".join(pieces) == "You said: "
    # Nothing is retried once text has been shown.
    assert len(upstream.requests) == 1
    await upstream.wait_for_disconnect(2)


async def test_a_stream_cut_midway_is_unavailable_and_not_retried(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.cut_after(3), fake_api.reply("never"))
    pieces: list[str] = []

    with pytest.raises(LLMUnavailable):
        await answer(make(), pieces=pieces)

    assert "".join(pieces) == "You said: Hello "
    assert len(upstream.requests) == 1


async def test_a_stream_cut_before_any_text_is_retried(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.cut_after(0), fake_api.reply("Second try."))
    stats = StreamStats()
    assert await answer(make(), stats=stats) == "Second try."
    assert stats.retries == 1


async def test_a_stream_that_ends_without_finishing_is_unavailable(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.end_early(2))
    pieces: list[str] = []

    with pytest.raises(LLMUnavailable, match="ended before it was complete"):
        await answer(make(llm_max_retries=0), pieces=pieces)

    assert "".join(pieces) == "You said: "


async def test_an_error_event_in_the_stream_is_mapped(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(
        fake_api.error_in_stream(2, code="server_error"), fake_api.error_in_stream(0, code="rate_limit_exceeded")
    )
    pieces: list[str] = []

    with pytest.raises(LLMUnavailable):
        await answer(make(), pieces=pieces)
    with pytest.raises(LLMRateLimited):
        await answer(make(llm_max_retries=0))

    assert "".join(pieces) == "You said: "


async def test_an_unreachable_provider_is_unavailable(make: MakeLLM) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    with pytest.raises(LLMUnavailable, match="could not reach"):
        await answer(make(openai_base_url=f"http://127.0.0.1:{port}/v1", llm_max_retries=0))


async def test_closing_the_stream_midway_closes_the_upstream_request(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.slow(0.05))
    async with aclosing(make().stream(HELLO, StreamStats())) as stream:
        assert await anext(stream) == "You "
        assert upstream.disconnects == 0

    await upstream.wait_for_disconnect(2)


async def test_cancelling_the_consumer_closes_the_upstream_request(make: MakeLLM, upstream: FakeOpenAI) -> None:
    upstream.script(fake_api.slow(0.05))
    first = asyncio.Event()

    async def consume() -> None:
        async with aclosing(make().stream(HELLO, StreamStats())) as stream:
            async for _ in stream:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await upstream.wait_for_disconnect(2)


async def test_the_offline_model_echoes_and_counts_turns_the_same_way_every_time() -> None:
    llm = OfflineLLM(token_delay_s=0)
    messages: list[ChatMessage] = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "And  the third one"},
    ]
    stats = StreamStats()
    pieces: list[str] = []

    text = await answer(llm, messages, stats, pieces)

    assert text == (
        'Offline demo model, turn 3. You said: "And the third one". '
        "I can see 2 earlier messages of yours in this conversation. Set OPENAI_API_KEY to talk to a real model."
    )
    assert pieces[:3] == ["Offline ", "demo ", "model, "]
    # Counted as the service estimates tokens (tests/test_context.py).
    assert stats.completion_tokens == estimate(text) and stats.finish_reason == "stop"
    assert stats.first_token_s is not None
    assert await llm.complete(messages) == text
    assert llm.model == "offline-demo"


async def test_the_offline_model_stops_at_max_tokens() -> None:
    llm = OfflineLLM(token_delay_s=0)
    stats = StreamStats()
    async with aclosing(llm.stream(HELLO, stats, max_tokens=3)) as stream:
        assert [piece async for piece in stream] == ["Offline ", "demo ", "model, "]
    assert stats.finish_reason == "length" and stats.completion_tokens == estimate("Offline demo model, ")
    assert await llm.complete(HELLO, max_tokens=3) == "Offline demo model, "


async def test_the_offline_model_quotes_a_long_message_shortened() -> None:
    text = await OfflineLLM(token_delay_s=0).complete([{"role": "user", "content": "x" * 1000}])
    assert "turn 1" in text and "first message" in text
    assert '"' + "x" * 199 + '…"' in text


async def test_the_offline_model_is_used_only_when_no_provider_is_configured() -> None:
    assert isinstance(make_llm(Settings()), OfflineLLM)
    assert Settings().model_name == "offline-demo"
    for settings in (Settings(openai_api_key="sk-x"), Settings(openai_base_url="http://127.0.0.1:1/v1")):
        llm = make_llm(settings)
        assert isinstance(llm, OpenAILLM) and llm.model == settings.openai_model
        await llm.close()


async def test_a_slow_consumer_is_not_taken_for_a_stalled_provider(make: MakeLLM, upstream: FakeOpenAI) -> None:
    # The token gap counts only while we wait on the provider, not while the reader of the pieces is busy.
    upstream.script(fake_api.slow(0.01, text="one two three four"))
    llm = make(llm_token_gap_timeout_s=0.2)
    pieces = []
    async with aclosing(llm.stream(HELLO, StreamStats())) as stream:
        async for piece in stream:
            pieces.append(piece)
            await asyncio.sleep(0.3)
    assert "".join(pieces) == "one two three four"
