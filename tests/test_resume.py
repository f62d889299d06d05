"""Protocol 1.1 on one server: an answer belongs to the session, not to the socket that asked for it."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

from core.livestream import answer_key
from tests.conftest import eventually, receive, receive_until, start_server
from tests.fakes import openai_server as fake

ANSWER = "".join(f"piece{i:02d} " for i in range(30))


async def _message(ws: Any, text: str, client_msg_id: str | None = None) -> None:
    await ws.send_str(orjson.dumps({"type": "message", "text": text, "client_msg_id": client_msg_id}).decode())


async def _answers(db: Any, session_id: str) -> list[Any]:
    return await db.fetch(
        "select id, content, metadata from session_events where session_id = $1 and event_type = 'ai_message'"
        " order by id",
        session_id,
    )


async def _until_done(ws: Any) -> list[dict[str, Any]]:
    return await receive_until(ws, "response.done", timeout=10)


async def test_a_closed_socket_does_not_stop_the_answer_and_waiting_messages_are_answered(
    make_client, fake_llm, db, redis, run_worker
):
    client = await make_client(on_disconnect="continue")
    fake_llm.script(fake.slow(0.01, text=ANSWER), fake.slow(0.01, text="second answer"))
    ws = await client.ws_connect("/ws/session/gone")
    await receive(ws)
    await _message(ws, "first", "m1")
    await _message(ws, "second", "m2")
    await receive_until(ws, "response.delta")
    await ws.close()

    async def both_answered() -> list[Any]:
        rows = await _answers(db, "gone")
        return rows if len(rows) == 2 else []

    first, second = await eventually(both_answered, timeout=10)
    assert (first["content"], orjson.loads(first["metadata"])["status"]) == (ANSWER, "completed")
    assert second["content"] == "second answer"

    # The summary waited for the session to be quiet: it covers the last answer.
    await eventually(lambda: redis.zcard("arq:queue"), timeout=10)
    await run_worker()
    assert await db.fetchval("select summarized_through from sessions where session_id = 'gone'") == second["id"]


async def test_reconnecting_at_any_moment_of_an_answer_gives_the_whole_answer_exactly_once(make_client, fake_llm, db):
    """50 random drop points, with and without `resume=`, abrupt and clean closes."""
    client = await make_client(on_disconnect="continue")
    rng = random.Random(1411)
    for n in range(50):
        session_id = f"drop-{n}"
        fake_llm.script(fake.slow(0.003, text=ANSWER))
        ws = await client.ws_connect(f"/ws/session/{session_id}")
        await receive(ws)
        await _message(ws, "tell me", f"m{n}")
        rid, held, held_seq = None, "", 0
        deadline = asyncio.get_running_loop().time() + rng.uniform(0, 0.12)
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                event = orjson.loads((await ws.receive(timeout=left)).data)
            except TimeoutError:
                break
            if event["type"] == "response.started":
                rid = event["response_id"]
            elif event["type"] == "response.delta":
                held += event["delta"]
                held_seq = event["seq"]
            elif event["type"] == "response.done":
                break
        if rng.random() < 0.5:
            ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        await ws.close()

        use_resume = rid is not None and rng.random() < 0.7
        query = f"?resume={rid}:{held_seq}" if use_resume else ""
        ws = await client.ws_connect(f"/ws/session/{session_id}{query}")
        ready = await receive(ws)
        where = f"{session_id} resume={use_resume} held={held_seq}"
        if ready["active_response"] is None:
            # It ended meanwhile: it is in the history, whole (or about to be stored: its message.stored says so).
            items = [h for h in ready["history"] if h["role"] == "assistant"]
            if items:
                assert (items[-1]["text"], items[-1]["status"]) == (ANSWER, "completed"), where
            else:
                stored = await receive_until(ws, "message.stored")
                assert (stored[-1]["text"], stored[-1]["status"]) == (ANSWER, "completed"), where
        else:
            events = await _until_done(ws)
            assert events[0]["type"] == "response.started" and events[0]["resumed"] is True, where
            got = "".join(e["delta"] for e in events if e["type"] == "response.delta")
            seqs = [e["seq"] for e in events if e["type"] == "response.delta"]
            assert seqs == sorted(seqs), where
            done = events[-1]
            assert done["status"] == "completed" and done["text"] == ANSWER, where
            assert (held + got if use_resume else got) == ANSWER, where
        await ws.close()
        rows = await eventually(lambda sid=session_id: _answers(db, sid))
        assert [r["content"] for r in rows] == [ANSWER], where


async def test_a_retried_message_joins_its_running_answer_and_is_never_answered_twice(make_client, fake_llm, db):
    client = await make_client(on_disconnect="continue")
    fake_llm.script(fake.slow(0.02, text=ANSWER))
    ws = await client.ws_connect("/ws/session/retry")
    await receive(ws)
    await _message(ws, "tell me", "m1")
    first_ack = next(e for e in await receive_until(ws, "message.stored") if e["type"] == "message.stored")
    await receive_until(ws, "response.delta")
    await ws.close()

    # The client lost its socket: it reconnects and resends everything not answered.
    ws = await client.ws_connect("/ws/session/retry")
    ready = await receive(ws)
    assert ready["active_response"]["client_msg_id"] == "m1"
    await _message(ws, "tell me", "m1")
    events = await _until_done(ws)
    acks = [e for e in events if e["type"] == "message.stored" and e["role"] == "user"]
    assert [a["id"] for a in acks] == [first_ack["id"]]
    assert events[-1]["text"] == ANSWER
    await ws.close()
    assert len(await eventually(lambda: _answers(db, "retry"))) == 1
    assert len(fake_llm.requests) == 1


async def test_a_newer_connection_takes_over_and_the_answer_goes_on_for_it(make_client, fake_llm, db):
    client = await make_client(on_disconnect="continue")
    fake_llm.script(fake.slow(0.02, text=ANSWER))
    first = await client.ws_connect("/ws/session/taken")
    await receive(first)
    await _message(first, "tell me", "m1")
    await receive_until(first, "response.delta")

    second = await client.ws_connect("/ws/session/taken")
    ready = await receive(second)
    assert ready["active_response"]["client_msg_id"] == "m1"
    old = []
    while (msg := await first.receive(timeout=5)).type is WSMsgType.TEXT:
        old.append(orjson.loads(msg.data))
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4000)
    assert not any(e["type"] == "response.done" for e in old), "the answer was not stopped"
    events = await _until_done(second)
    assert events[0]["resumed"] is True
    assert events[-1]["status"] == "completed" and events[-1]["text"] == ANSWER
    # Its cancel and its messages are the session's now.
    await _message(second, "and then?")
    assert (await _until_done(second))[-1]["status"] == "completed"
    await second.close()
    rows = await eventually(lambda: _answers(db, "taken"))
    assert orjson.loads(rows[0]["metadata"])["status"] == "completed"


async def test_watchers_see_everything_live_and_change_nothing(make_client, fake_llm, db):
    client = await make_client(on_disconnect="continue")
    writer = await client.ws_connect("/ws/session/watched")
    await receive(writer)
    watcher = await client.ws_connect("/ws/session/watched?mode=watch")
    ready = await receive(watcher)
    assert ready["mode"] == "watch"

    await _message(writer, "hello there", "m1")
    seen: list[dict[str, Any]] = []
    while not any(e["type"] == "message.stored" and e["role"] == "assistant" for e in seen):
        seen.append(await receive(watcher))
    kinds = [e["type"] for e in seen]
    assert {"message.stored", "response.started", "response.delta", "response.done"} <= set(kinds)
    assert kinds.index("response.started") < kinds.index("response.delta") < kinds.index("response.done")
    user = next(e for e in seen if e["type"] == "message.stored" and e["role"] == "user")
    assert user["text"] == "hello there"
    answer = seen[-1]
    assert answer["status"] == "completed" and answer["text"] == seen[kinds.index("response.done")]["text"]

    await watcher.send_str("may I?")
    assert (await receive(watcher))["code"] == "read_only"
    await watcher.send_str(orjson.dumps({"type": "cancel"}).decode())
    assert (await receive(watcher))["code"] == "read_only"
    await watcher.close()
    await writer.close()

    # The watcher left no trace: only the writer's connection and its conversation are stored.
    async def kinds() -> list[str]:
        rows = await db.fetch("select event_type from session_events order by id")
        return [r["event_type"] for r in rows] if len(rows) >= 4 else []

    assert await eventually(kinds) == ["connected", "user_message", "ai_message", "disconnected"]


async def test_watching_refuses_what_it_cannot_follow(make_client):
    client = await make_client(on_disconnect="continue", max_watchers=1)
    unknown = await client.get(
        "/ws/session/nobody?mode=watch", headers={"Upgrade": "websocket", "Connection": "Upgrade"}
    )
    assert (unknown.status, (await unknown.json())["error"]["code"]) == (404, "session_not_found")
    bad_mode = await client.get("/ws/session/s1?mode=read", headers={"Upgrade": "websocket"})
    assert (bad_mode.status, (await bad_mode.json())["error"]["code"]) == (400, "invalid_mode")
    bad_resume = await client.get("/ws/session/s1?resume=nothing", headers={"Upgrade": "websocket"})
    assert (bad_resume.status, (await bad_resume.json())["error"]["code"]) == (400, "invalid_resume")

    writer = await client.ws_connect("/ws/session/s1")
    await receive(writer)
    first = await client.ws_connect("/ws/session/s1?mode=watch")
    await receive(first)
    with_one_too_many = await client.get("/ws/session/s1?mode=watch", headers={"Upgrade": "websocket"})
    assert (with_one_too_many.status, (await with_one_too_many.json())["error"]["code"]) == (429, "too_many_watchers")
    await first.close()
    await writer.close()


async def test_a_graceful_shutdown_stores_an_unfinished_answer_as_interrupted(db, redis, fake_llm, settings):
    fake_llm.script(fake.slow(0.1, text=ANSWER))
    server, port = await start_server(settings.replace(on_disconnect="continue"), SHUTDOWN_DRAIN_S="0.5")
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/s1")
            await receive(ws)
            await _message(ws, "tell me", "m1")
            await receive_until(ws, "response.delta")
            server.send_signal(signal.SIGTERM)
            events = await _until_done(ws)
        async with asyncio.timeout(20):
            await server.wait()
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    assert events[-1]["status"] == "interrupted"
    # It told the other servers too: no answer is left "running" in Redis for a server that is gone.
    assert not await redis.exists(answer_key("s1"))
    rows = await _answers(db, "s1")
    assert orjson.loads(rows[0]["metadata"])["status"] == "interrupted"
    assert ANSWER.startswith(rows[0]["content"]) and rows[0]["content"] != ANSWER


async def test_without_redis_answers_still_stream_and_are_stored(make_client, fake_llm, db, redis_control):
    client = await make_client(on_disconnect="continue")
    ws = await client.ws_connect("/ws/session/no-redis")
    await receive(ws)
    await redis_control.stop()
    await _message(ws, "are you there?", "m1")
    events = await _until_done(ws)
    assert events[-1]["status"] == "completed"
    await ws.close()
    rows = await eventually(lambda: _answers(db, "no-redis"))
    assert orjson.loads(rows[0]["metadata"])["status"] == "completed"
