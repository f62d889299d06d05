"""Context budgets and compaction (protocol 1.1, *Context*): every request within CONTEXT_MAX_TOKENS as the provider
counts it, and nothing said forgotten: it is in the request, or in the context summary the real worker writes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.settings import Settings
from tests.conftest import eventually, receive, receive_until
from tests.fakes import openai_server as fake
from tests.test_worker import start_worker_process

pytestmark = pytest.mark.asyncio

SYS = "You are a test assistant."
COMPACT_PROMPT = Settings().context_summary_prompt
# A long conversation in seconds: the per-minute message limits would refuse it.
UNLIMITED = {"messages_per_minute": 100_000, "user_messages_per_minute": 100_000}
FACT = "Please remember this: my name is Zanzibar Quill and my order code is KX-4417."


def model(messages: list[dict[str, Any]]) -> str:
    """The stand-in model: answers chat turns briefly, and writes context summaries that keep what it was asked to
    remember (a real model is asked to keep names and numbers; this one keeps the lines that say 'remember')."""
    system = messages[0]["content"]
    if system == COMPACT_PROMPT:
        previous, _, since = messages[1]["content"].partition("\n\nMessages since:\n")
        facts = [line for line in previous.splitlines() if line.startswith("- ")]
        facts += ["- " + line.removeprefix("User: ") for line in since.splitlines() if "remember" in line]
        return "Facts so far:\n" + "\n".join(facts)
    if "Summarise" in system:
        return "An end-of-session summary."
    return "Okay, noted."


def chat_requests(fake_llm: Any) -> list[list[dict[str, Any]]]:
    return [r["messages"] for r in fake_llm.requests if r["messages"][0]["content"].startswith(SYS)]


def compaction_requests(fake_llm: Any) -> list[list[dict[str, Any]]]:
    return [r["messages"] for r in fake_llm.requests if r["messages"][0]["content"] == COMPACT_PROMPT]


async def summaries(db: Any, session_id: str) -> list[Any]:
    return await db.fetch(
        "select id, content, metadata from session_events where session_id = $1 and event_type = 'context_summary'"
        " order by id",
        session_id,
    )


async def metric(client: Any, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


async def turn(ws: Any, text: str, seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Send a message and return its `response.done`; every event on the way goes to `seen`."""
    await ws.send_str(text)
    events = []
    async with asyncio.timeout(10):
        while not events or events[-1]["type"] != "response.done":
            events.append(await receive(ws))
            assert events[-1]["type"] != "error", events[-1]
    if seen is not None:
        seen.extend(events)
    return events[-1]


def question(i: int) -> str:
    return f"Turn {i}: what is the weather like today in the town with the number {i} on our list?"


@contextlib.asynccontextmanager
async def worker_process(settings: Settings, log: Path, **env: str) -> Any:
    proc = await start_worker_process(settings, log, **env)
    try:
        await eventually(lambda: asyncio.to_thread(lambda: "worker ready" in log.read_text()), timeout=20)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def test_a_fact_from_the_first_turn_is_still_in_the_request_at_turn_300(
    make_client, db, redis, fake_llm, settings, tmp_path
):
    fake_llm.responder = model
    budget = 400
    client = await make_client(context_max_tokens=budget, **UNLIMITED)
    async with worker_process(settings, tmp_path / "worker.log", CONTEXT_MAX_TOKENS=str(budget)):
        ws = await client.ws_connect("/ws/session/long")
        await receive(ws)
        seen: list[dict[str, Any]] = []
        assert (await turn(ws, FACT, seen))["status"] == "completed"
        for i in range(2, 301):
            assert (await turn(ws, question(i), seen))["status"] == "completed"

        requests = chat_requests(fake_llm)
        assert len(requests) == 300
        # Every request within the budget as the provider counts it (not as four characters a token would).
        assert max(fake.prompt_tokens(r) for r in requests) <= budget
        assert max(sum(len(m["content"]) for m in r) / 4 for r in requests) < max(
            fake.prompt_tokens(r) for r in requests
        )
        # Turn 300's request still knows turn 1, through the summaries.
        last = requests[-1]
        assert "Zanzibar Quill" in last[0]["content"] and "KX-4417" in last[0]["content"]
        assert last[-1]["content"] == question(300)

        # The worker wrote them, each from the previous one and the messages after it, each covering more.
        rows = await summaries(db, "long")
        assert len(rows) >= 5
        throughs = [orjson.loads(r["metadata"])["through"] for r in rows]
        assert throughs == sorted(throughs) and len(set(throughs)) == len(throughs)
        assert all(orjson.loads(r["metadata"])["tokens"] == fake.count_tokens(r["content"]) for r in rows)
        assert len(compaction_requests(fake_llm)) >= len(rows)
        # And the socket was told each time one was put in use.
        compacted = [e for e in seen if e["type"] == "context.compacted"]
        assert compacted and {e["through"] for e in compacted} <= set(throughs)

        # The end-of-session summary starts from the last context summary instead of re-reading 600 messages.
        await ws.close()
        await eventually(lambda: db.fetchval("select summary from sessions where session_id = 'long'"), timeout=10)
        [request] = [r["messages"] for r in fake_llm.requests if "Summarise" in r["messages"][0]["content"]]
        assert request[1]["content"].startswith("(Summary of the conversation before the messages below: Facts")
        assert "User: Turn 2:" not in request[1]["content"]


async def test_with_the_worker_stopped_requests_still_fit_and_it_compacts_once_it_is_back(
    make_client, db, redis, fake_llm, settings, tmp_path
):
    fake_llm.responder = model
    budget = 300
    client = await make_client(context_max_tokens=budget, **UNLIMITED)
    ws = await client.ws_connect("/ws/session/no-worker")
    await receive(ws)
    await turn(ws, FACT)
    for i in range(2, 41):
        await turn(ws, question(i))
    requests = chat_requests(fake_llm)
    assert max(fake.prompt_tokens(r) for r in requests) <= budget
    # The oldest messages were left out to fit, and counted; nothing compacted them (no worker runs).
    assert await metric(client, "rt_context_trimmed_total") > 0
    assert "Zanzibar" not in str(requests[-1])
    assert await summaries(db, "no-worker") == []
    assert compaction_requests(fake_llm) == []

    async with worker_process(settings, tmp_path / "worker.log", CONTEXT_MAX_TOKENS=str(budget)):
        compacted = (await receive_until(ws, "context.compacted", timeout=15))[-1]
        # What it covers was left out already: the summary brings it back.
        assert compacted["tokens_after"] > compacted["tokens_before"]
        await turn(ws, question(41))
        assert "Zanzibar Quill" in chat_requests(fake_llm)[-1][0]["content"]
    assert fake.prompt_tokens(chat_requests(fake_llm)[-1]) <= budget


async def test_a_compaction_that_fails_is_retried_while_the_chat_goes_on(
    make_client, db, redis, fake_llm, settings, tmp_path
):
    fake_llm.responder = model
    failures = itertools.count()
    # The first two compaction requests get a 500.
    fake_llm.failing = lambda messages: messages[0]["content"] == COMPACT_PROMPT and next(failures) < 2
    budget = 300
    client = await make_client(context_max_tokens=budget, **UNLIMITED)
    env = {"CONTEXT_MAX_TOKENS": str(budget), "SUMMARY_RETRY_BASE_S": "0.1", "LLM_MAX_RETRIES": "0"}
    async with worker_process(settings, tmp_path / "worker.log", **env):
        ws = await client.ws_connect("/ws/session/retried")
        await receive(ws)
        await turn(ws, FACT)
        i = 1
        while not await summaries(db, "retried"):
            i += 1
            assert (await turn(ws, question(i)))["status"] == "completed"
            assert i < 200, "no compaction landed"
            await asyncio.sleep(0.02)
    assert len(compaction_requests(fake_llm)) >= 3
    log = (tmp_path / "worker.log").read_text()
    assert "compaction failed, will retry" in log


async def test_a_reconnect_to_another_server_rebuilds_the_same_context(
    make_client, db, redis, fake_llm, settings, tmp_path
):
    fake_llm.responder = model
    budget = 400
    first = await make_client(context_max_tokens=budget, **UNLIMITED)
    second = await make_client(context_max_tokens=budget, **UNLIMITED)
    async with worker_process(settings, tmp_path / "worker.log", CONTEXT_MAX_TOKENS=str(budget)):
        ws = await first.ws_connect("/ws/session/moved")
        await receive(ws)
        await turn(ws, FACT)
        # A watcher on the other server is told of the compaction too.
        watcher = await second.ws_connect("/ws/session/moved?mode=watch")
        await receive(watcher)
        i = 1
        seen: list[dict[str, Any]] = []
        while not any(e["type"] == "context.compacted" for e in seen):
            i += 1
            await turn(ws, question(i), seen)
            assert i < 200, "no compaction landed"
            # At a pace the worker keeps up with, so that nothing is left out before the summary lands.
            await asyncio.sleep(0.1)
        # One more turn on this server, well under the threshold again: the context as this server holds it.
        done = await turn(ws, question(i + 1))
        here = chat_requests(fake_llm)[-1]
        told = (await receive_until(watcher, "context.compacted"))[-1]
        assert told["through"] == next(e for e in seen if e["type"] == "context.compacted")["through"]
        await watcher.close()

        again = await second.ws_connect("/ws/session/moved")
        ready = await receive(again)
        assert ready["resumed"] is True
        await turn(again, "And what did I tell you first?")
        there = chat_requests(fake_llm)[-1]
    # Built from the last context summary and the messages after it, it is what the first server would have sent:
    # the same summary, the same messages, the new turn. (When the worker fell behind, the first server left out
    # a few of the oldest messages after the summary to stay in budget; the second, with room, may keep them.)
    assert there[0] == here[0] and "Zanzibar Quill" in there[0]["content"]
    assert there[-2:] == [
        {"role": "assistant", "content": done["text"]},
        {"role": "user", "content": "And what did I tell you first?"},
    ]
    after_summary = there[1:-2]
    assert after_summary[len(after_summary) - len(here) + 1 :] == here[1:]
    assert fake.prompt_tokens(there) <= budget


@pytest.mark.parametrize("usage", [True, False], ids=["usage", "no-usage"])
@pytest.mark.parametrize(
    "text",
    [
        "Tell me about the lighthouse on the northern coast and the people who kept it running",
        "请告诉我北方海岸的灯塔以及守护它的人们的故事",
    ],
    ids=["english", "chinese"],
)
async def test_every_request_fits_the_budget_whether_or_not_the_provider_reports_usage(
    make_client, db, fake_llm, usage, text
):
    fake_llm.reports_usage = usage
    budget = 200
    client = await make_client(context_max_tokens=budget, **UNLIMITED)
    ws = await client.ws_connect(f"/ws/session/budget-{usage}-{text.isascii()}")
    await receive(ws)
    for i in range(30):
        assert (await turn(ws, f"{text} ({i})"))["status"] == "completed"
    requests = chat_requests(fake_llm)
    assert len(requests) == 30
    assert max(fake.prompt_tokens(r) for r in requests) <= budget
    # The budget was used, not wasted: the trimmed requests are at least half full.
    assert min(fake.prompt_tokens(r) for r in requests[10:]) >= budget / 2
    assert await metric(client, "rt_context_trimmed_total") > 0
    # Each answer's usage is stored: the provider's, or our own count marked as an estimate.
    session_id = f"budget-{usage}-{text.isascii()}"

    async def all_answers() -> list[Any]:
        rows = await db.fetch(
            "select metadata from session_events where session_id = $1 and event_type = 'ai_message' order by id",
            session_id,
        )
        return rows if len(rows) == len(requests) else []

    rows = await eventually(all_answers)
    meta = orjson.loads(rows[-1]["metadata"])
    if usage:
        assert meta["prompt_tokens"] == fake.prompt_tokens(requests[len(rows) - 1]) and "tokens_estimated" not in meta
    else:
        assert meta["tokens_estimated"] is True
        assert fake.prompt_tokens(requests[len(rows) - 1]) <= meta["prompt_tokens"] <= budget
        assert meta["completion_tokens"] >= fake.count_tokens("Okay, noted.")


async def test_a_message_longer_than_the_whole_budget_is_refused_and_not_stored(make_client, db, fake_llm):
    client = await make_client(context_max_tokens=100, **UNLIMITED)
    ws = await client.ws_connect("/ws/session/too-long")
    await receive(ws)
    await ws.send_str("word " * 200)
    error = await receive(ws)
    assert error["type"] == "error" and error["code"] == "message_too_long"
    assert "100 tokens" in error["message"]
    # The socket stays up and the next message is answered.
    assert (await turn(ws, "short one"))["status"] == "completed"
    stored = await eventually(
        lambda: db.fetch(
            "select content from session_events where session_id = 'too-long' and event_type = 'user_message'"
        )
    )
    assert [r["content"] for r in stored] == ["short one"]


async def test_the_offline_demo_model_compacts_deterministically(make_client, db, redis, run_worker):
    offline = {
        "openai_base_url": None,
        "openai_api_key": None,
        "offline_token_delay_s": 0.002,
        "context_max_tokens": 300,
    }
    client = await make_client(**offline, **UNLIMITED)
    ws = await client.ws_connect("/ws/session/offline")
    await receive(ws)
    await turn(ws, FACT)
    for i in range(2, 12):
        await turn(ws, question(i))
    await eventually(lambda: redis.zcard("arq:queue"))
    await run_worker(**offline)
    event = await receive_until(ws, "context.compacted", timeout=10)
    [row] = await summaries(db, "offline")
    assert row["content"].startswith("Offline demo context summary. Earlier, the user said:")
    assert "Zanzibar Quill" in row["content"]
    assert event[-1]["through"] == orjson.loads(row["metadata"])["through"]
