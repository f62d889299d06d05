"""Parts that fail for real mid-conversation: PostgreSQL stopped for 20 seconds, Redis restarted."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson

from tests.conftest import eventually, receive, receive_until


async def _ask(ws: Any, text: str, client_msg_id: str) -> list[dict[str, Any]]:
    await ws.send_str(orjson.dumps({"type": "message", "text": text, "client_msg_id": client_msg_id}).decode())
    return await receive_until(ws, "response.done")


async def test_postgres_down_for_20_seconds_the_conversation_goes_on_and_every_message_is_stored_once_in_order(
    client, db, fake_llm, postgres_control
):
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    seen = await _ask(ws, "before the outage", "m0")
    while sum(e["type"] == "message.stored" for e in seen) < 2:
        seen.append(await receive(ws))
    await postgres_control.stop()

    # For 20 seconds the database is gone: answers keep streaming, only the acknowledgements wait.
    outage: list[dict[str, Any]] = []
    for i in range(1, 5):
        events = await _ask(ws, f"during the outage {i}", f"m{i}")
        assert events[-1]["status"] == "completed"
        outage += events
        await asyncio.sleep(5)
    assert not [e for e in outage if e["type"] == "message.stored"]

    await postgres_control.start()
    acks = [e for e in seen + outage if e["type"] == "message.stored"]
    async with asyncio.timeout(30):
        while len(acks) < 10:
            event = await receive(ws, timeout=30)
            if event["type"] == "message.stored":
                acks.append(event)
    await ws.close()

    conn = await asyncpg.connect(postgres_control.url)
    try:
        stored = await conn.fetch(
            "select id, event_type, content, client_msg_id from session_events where session_id = 's1' order by id"
        )
    finally:
        await conn.close()
    users = [(r["content"], r["client_msg_id"]) for r in stored if r["event_type"] == "user_message"]
    assert users == [("before the outage", "m0")] + [(f"during the outage {i}", f"m{i}") for i in range(1, 5)]
    # Each question is followed by its answer, in the order they happened, none twice.
    kinds = [r["event_type"] for r in stored if r["event_type"] in ("user_message", "ai_message")]
    assert kinds == ["user_message", "ai_message"] * 5
    assert sorted(a["id"] for a in acks) == sorted(r["id"] for r in stored if r["event_type"] != "connected")[:10]


async def test_redis_restarting_mid_conversation_disturbs_nothing_and_the_summary_is_still_queued(
    client, db, redis, fake_llm, redis_control
):
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    await _ask(ws, "hello", "m1")
    await redis_control.stop()
    assert (await _ask(ws, "while redis is away", "m2"))[-1]["status"] == "completed"
    await redis_control.start()
    assert (await _ask(ws, "after redis is back", "m3"))[-1]["status"] == "completed"
    await ws.close()

    # The end of the session is queued on the restarted Redis for the worker, as of its last message.
    await eventually(lambda: db.fetchval("select max(id) from session_events where event_type = 'disconnected'"))
    last_id = await db.fetchval("select max(id) from session_events where event_type = 'ai_message'")
    assert await eventually(lambda: redis.keys(f"arq:job:summary:s1:*:{last_id}"), timeout=10)


async def test_a_redis_that_stops_answering_costs_one_connection_its_timeout_not_every_one(make_client, db, caplog):
    # A "Redis" that accepts connections and never answers: a network partition, not a refusal.
    received = bytearray()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
        writer.close()

    hole = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    try:
        client = await make_client(redis_url=f"redis://127.0.0.1:{port}/0", shutdown_flush_s=1.0)
        first = await client.ws_connect("/ws/session/s1")
        assert (await receive(first, timeout=15))["type"] == "session.ready"
        # The first claim waited out Redis's timeout; the next connections do not ask it again for a while.
        for session_id in ("s2", "s3"):
            ws = await client.ws_connect(f"/ws/session/{session_id}")
            assert (await receive(ws))["type"] == "session.ready"
            assert (await _ask(ws, "still served", "m1"))[-1]["status"] == "completed"
            await ws.close()
        claims = [r for r in caplog.records if r.getMessage().startswith("could not claim the session lease")]
        assert len(claims) == 1, [r.getMessage() for r in claims]
        assert received  # it was asked, once
        await first.close()
    finally:
        hole.close()
