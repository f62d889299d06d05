"""Usage accounting: every session's token totals in the API, and the budgets that refuse a message instead of
running up a bill."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import eventually, receive
from tests.fakes import openai_server as fake
from tests.test_auth import SECRET, token
from tests.test_compaction import UNLIMITED, turn

pytestmark = pytest.mark.asyncio


async def refused(ws: Any, text: str) -> dict[str, Any]:
    await ws.send_str(text)
    event = await receive(ws)
    assert event["type"] == "error", event
    return event


async def answers(db: Any, session_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "select metadata from session_events where session_id = $1 and event_type = 'ai_message' order by id",
        session_id,
    )
    return [orjson.loads(r["metadata"]) for r in rows]


async def test_each_session_shows_the_tokens_its_answers_used(client, db, fake_llm):
    ws = await client.ws_connect("/ws/session/used")
    await receive(ws)
    for text in ("Hello there", "How are you today?", "Tell me a story"):
        await turn(ws, text)
    await ws.close()
    meta = await eventually(lambda: _all(db, "used", 3))
    expected = {
        "prompt_tokens": sum(m["prompt_tokens"] for m in meta),
        "completion_tokens": sum(m["completion_tokens"] for m in meta),
    }
    # The provider's own counts, as it reported them.
    assert [m["completion_tokens"] for m in meta] == [
        fake.count_tokens(f"You said: {t}") for t in ("Hello there", "How are you today?", "Tell me a story")
    ]
    detail = await (await client.get("/api/sessions/used")).json()
    assert detail["usage"] == expected
    listed = await (await client.get("/api/sessions")).json()
    assert next(s for s in listed["sessions"] if s["session_id"] == "used")["usage"] == expected


async def _all(db: Any, session_id: str, n: int) -> list[dict[str, Any]] | None:
    meta = await answers(db, session_id)
    return meta if len(meta) >= n else None


async def test_a_session_past_its_token_budget_refuses_new_messages_even_after_a_reconnect(make_client, db, fake_llm):
    client = await make_client(session_max_tokens=60, **UNLIMITED)
    ws = await client.ws_connect("/ws/session/capped")
    await receive(ws)
    sent = 0
    while True:
        await ws.send_str(f"message number {sent}")
        event = await receive(ws)
        if event["type"] == "error":
            break
        sent += 1
        while event["type"] != "response.done":
            event = await receive(ws)
        assert sent < 20, "the budget never applied"
    assert event["code"] == "budget_exceeded" and "60 tokens" in event["message"]
    # The socket stays up: a ping is answered.
    await ws.send_str('{"type": "ping"}')
    assert (await receive(ws))["type"] == "pong"
    meta = await eventually(lambda: _all(db, "capped", sent))
    assert sum(m["prompt_tokens"] + m["completion_tokens"] for m in meta) >= 60
    await ws.close()

    # Another server (a new app), rebuilt from the store, refuses too, and nothing refused was stored.
    other = await make_client(session_max_tokens=60, **UNLIMITED)
    again = await other.ws_connect("/ws/session/capped")
    await receive(again)
    assert (await refused(again, "one more?"))["code"] == "budget_exceeded"
    stored = await db.fetchval(
        "select count(*) from session_events where session_id = 'capped' and event_type = 'user_message'"
    )
    assert stored == sent


async def test_a_users_daily_budget_holds_across_sessions_and_servers(make_client, db, redis, fake_llm):
    settings = {"auth_jwt_secret": SECRET, "user_daily_max_tokens": 80, **UNLIMITED}
    first, second = await make_client(**settings), await make_client(**settings)
    headers = {"Authorization": f"Bearer {token('ada')}"}
    ws = await first.ws_connect("/ws/session/ada-1", headers=headers)
    await receive(ws)
    while True:
        await ws.send_str("Tell me something about the sea")
        event = await receive(ws)
        if event["type"] == "error":
            break
        while event["type"] != "response.done":
            event = await receive(ws)
    assert event["code"] == "budget_exceeded" and "renews at 00:00 UTC" in event["message"]

    # Another session of the same user on another server: refused from its first message.
    other = await second.ws_connect("/ws/session/ada-2", headers=headers)
    await receive(other)
    assert (await refused(other, "hello?"))["code"] == "budget_exceeded"
    # Another user is not.
    bob = await second.ws_connect("/ws/session/bob-1", headers={"Authorization": f"Bearer {token('bob')}"})
    await receive(bob)
    assert (await turn(bob, "hello"))["status"] == "completed"
    # The count in Redis is the sum of the user's answers, as their metadata counts them.
    meta = await answers(db, "ada-1")
    [key] = [k async for k in redis.scan_iter("rt:tokens:{ada}:*")]
    assert int(await redis.get(key)) == sum(m["prompt_tokens"] + m["completion_tokens"] for m in meta)
