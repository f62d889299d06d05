"""SIGTERM to a real server mid-answer: it finishes the answer, closes with 1001, stores and enqueues everything."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import orjson

from tests.conftest import eventually, receive, start_server
from tests.fakes import openai_server as fake

LONG_ANSWER = " ".join(f"word{i}" for i in range(30))


async def test_sigterm_mid_answer_finishes_it_closes_with_1001_and_loses_nothing(db, redis, fake_llm, settings):
    fake_llm.script(fake.slow(0.05, text=LONG_ANSWER))
    server, port = await start_server(settings, SHUTDOWN_DRAIN_S="10")
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/s1")
            await receive(ws)
            await ws.send_str(orjson.dumps({"type": "message", "text": "tell me", "client_msg_id": "m1"}).decode())
            events = []
            while not any(e["type"] == "response.delta" for e in events):
                events.append(await receive(ws))

            server.send_signal(signal.SIGTERM)
            close_code = None
            async with asyncio.timeout(15):
                while True:
                    msg = await ws.receive()
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        events.append(orjson.loads(msg.data))
                    else:
                        close_code = msg.data if msg.type is aiohttp.WSMsgType.CLOSE else ws.close_code
                        break
        async with asyncio.timeout(20):
            assert await server.wait() == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()

    # The answer in flight was allowed to finish, then the server said it was going away.
    done = next(e for e in events if e["type"] == "response.done")
    assert done["status"] == "completed"
    assert done["text"] == LONG_ANSWER
    assert close_code == 1001
    # Its writes landed before the close, so the client heard that both messages are stored.
    stored = {e["role"]: e["id"] for e in events if e["type"] == "message.stored"}

    # Everything accepted is stored, in order, and the session is ended and queued for its summary.
    rows = await db.fetch(
        "select id, event_type, content, metadata from session_events where session_id = 's1' order by id"
    )
    assert [r["event_type"] for r in rows] == ["connected", "user_message", "ai_message", "disconnected"]
    # The server's reason, not the client's reply to it.
    assert orjson.loads(rows[-1]["metadata"])["close_code"] == 1001
    assert rows[2]["content"] == LONG_ANSWER
    assert stored == {"user": rows[1]["id"], "assistant": rows[2]["id"]}
    assert await db.fetchval("select end_time from sessions where session_id = 's1'") is not None
    assert await redis.keys("arq:job:summary:s1:*")


async def test_during_the_drain_messages_are_stored_and_refused_and_cancel_still_works(db, redis, fake_llm, settings):
    # Slow enough that the drain is still running when the client speaks.
    fake_llm.script(fake.slow(0.1, text=LONG_ANSWER))
    server, port = await start_server(settings, SHUTDOWN_DRAIN_S="20")
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/s1")
            await receive(ws)
            await ws.send_str(orjson.dumps({"type": "message", "text": "tell me", "client_msg_id": "m1"}).decode())
            events = []
            while not any(e["type"] == "response.delta" for e in events):
                events.append(await receive(ws))
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)  # The drain has begun: the listener is closed, the socket still read.

            await ws.send_str(orjson.dumps({"type": "message", "text": "one more", "client_msg_id": "m2"}).decode())
            async with asyncio.timeout(5):
                while not any(e["type"] == "error" for e in events):
                    events.append(await receive(ws))
            await ws.send_str(orjson.dumps({"type": "cancel"}).decode())
            async with asyncio.timeout(5):
                while not any(e["type"] == "response.done" for e in events):
                    events.append(await receive(ws))
            async with asyncio.timeout(10):
                while (msg := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
                    events.append(orjson.loads(msg.data))
        async with asyncio.timeout(20):
            assert await server.wait() == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()

    error = next(e for e in events if e["type"] == "error")
    assert error["code"] == "shutting_down"
    # The cancel stopped the answer long before its 3 s of tokens.
    assert next(e for e in events if e["type"] == "response.done")["status"] == "cancelled"
    rows = await db.fetch("select event_type, client_msg_id from session_events where session_id = 's1' order by id")
    messages = [r["client_msg_id"] for r in rows if r["event_type"] == "user_message"]
    assert messages == ["m1", "m2"]
    acked = {e.get("client_msg_id") for e in events if e["type"] == "message.stored" and e["role"] == "user"}
    assert acked == {"m1", "m2"}


async def test_a_second_sigterm_stops_at_once_and_keeps_the_partial_answer(db, redis, fake_llm, settings, tmp_path):
    fake_llm.script(fake.slow(0.2, text=LONG_ANSWER))
    spool = str(tmp_path / "spool")
    server, port = await start_server(settings, SHUTDOWN_DRAIN_S="30", SPOOL_DIR=spool)
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/s1")
            await receive(ws)
            await ws.send_str(orjson.dumps({"type": "message", "text": "tell me", "client_msg_id": "m1"}).decode())
            while (await receive(ws))["type"] != "response.delta":
                pass
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            stopped_at = asyncio.get_running_loop().time()
            server.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await server.wait() == 0
            # Far sooner than the 30 s drain, or the 6 s the answer still had to go.
            assert asyncio.get_running_loop().time() - stopped_at < 5
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()

    # What it had no time to store is in its spool, and the next start writes it.
    server, _ = await start_server(settings, SPOOL_DIR=spool)
    try:

        async def stored() -> list[Any]:
            rows = await db.fetch("select event_type, content from session_events where session_id = 's1' order by id")
            return rows if len(rows) >= 4 else []

        rows = await eventually(stored, timeout=10)
    finally:
        server.terminate()
        await server.wait()
    assert [r["event_type"] for r in rows] == ["connected", "user_message", "ai_message", "disconnected"]
    partial = rows[2]["content"]
    assert partial and LONG_ANSWER.startswith(partial) and partial != LONG_ANSWER
