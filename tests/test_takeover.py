"""One live connection per session across server processes: a newer one on another server takes over."""

from __future__ import annotations

import aiohttp
import orjson
from aiohttp import WSMsgType

from tests.conftest import receive, receive_until, start_server
from tests.fakes import openai_server as fake

LONG = " ".join(f"word{i}" for i in range(60))


async def test_a_connection_on_another_server_takes_the_session_over_and_sees_everything(db, redis, fake_llm, settings):
    fake_llm.script(fake.slow(0.05, text=LONG))
    server_a, port_a = await start_server(settings)
    server_b, port_b = await start_server(settings)
    try:
        async with aiohttp.ClientSession() as http:
            first = await http.ws_connect(f"http://127.0.0.1:{port_a}/ws/session/s1")
            await receive(first)
            await first.send_str(
                orjson.dumps({"type": "message", "text": "tell me a story", "client_msg_id": "m1"}).decode()
            )
            await receive_until(first, "response.delta")

            # The same session opened on server B: A stops answering, stores what it had, and closes with 4000.
            second = await http.ws_connect(f"http://127.0.0.1:{port_b}/ws/session/s1")
            ready = await receive(second)
            events = []
            while True:
                msg = await first.receive(timeout=10)
                if msg.type is not WSMsgType.TEXT:
                    break
                events.append(orjson.loads(msg.data))
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4000)
            done = next(e for e in events if e["type"] == "response.done")
            assert done["status"] == "cancelled"

            # B started from the complete history, the cut answer included.
            assert ready["resumed"] is True
            assert [(m["role"], m["text"]) for m in ready["history"]] == [
                ("user", "tell me a story"),
                ("assistant", done["text"]),
            ]
            await second.send_str("and the ending?")
            answer = (await receive_until(second, "response.done"))[-1]
            assert answer["status"] == "completed"
            # B's model saw the conversation, partial answer and all.
            assert fake_llm.requests[-1]["messages"][1:] == [
                {"role": "user", "content": "tell me a story"},
                {"role": "assistant", "content": done["text"]},
                {"role": "user", "content": "and the ending?"},
            ]
            await second.close()
    finally:
        for server in (server_a, server_b):
            server.terminate()
            await server.wait()

    kinds = [r["event_type"] for r in await db.fetch("select event_type from session_events order by id")]
    assert kinds[:4] == ["connected", "user_message", "ai_message", "disconnected"]
    assert kinds[4:7] == ["connected", "user_message", "ai_message"]


async def test_in_a_reconnect_storm_every_message_is_stored_and_acknowledged_or_refused_by_the_close(
    make_client, fake_llm, db
):
    """Thirty connections to one session at once, each sending one plain-text message: each message ends either
    stored and acknowledged, or not stored on a socket the server closed (4000: the client resends it)."""
    import asyncio

    client = await make_client()
    clients = 30

    async def one(n: int) -> tuple[str, bool, int | None]:
        text = f"storm message {n}"
        ws = await client.ws_connect("/ws/session/storm")
        acked = done = False
        try:
            msg = await ws.receive(timeout=20)
            if msg.type is not WSMsgType.TEXT:
                return text, False, ws.close_code
            await ws.send_str(text)
            while True:
                msg = await ws.receive(timeout=20)
                if msg.type is not WSMsgType.TEXT:
                    return text, acked, ws.close_code
                event = orjson.loads(msg.data)
                if event["type"] == "message.stored" and event["role"] == "user":
                    acked = True
                done = done or event["type"] == "response.done"
                if acked and done:
                    return text, acked, None
        finally:
            await ws.close()

    outcomes = await asyncio.gather(*(one(n) for n in range(clients)))

    async def settled() -> list[str]:
        await asyncio.sleep(0.5)
        rows = await db.fetch(
            "select content from session_events where session_id = 'storm' and event_type = 'user_message' order by id"
        )
        return [r["content"] for r in rows]

    stored = await settled()
    assert len(stored) == len(set(stored)), "a message was stored twice"
    acked = {text for text, was_acked, _ in outcomes if was_acked}
    assert set(stored) == acked, "stored without an acknowledgement, or acknowledged without being stored"
    for text, was_acked, close_code in outcomes:
        if not was_acked:
            assert close_code == 4000, f"{text!r} was neither acknowledged nor refused by a 4000 close"
