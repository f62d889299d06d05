"""Stories of a client on /ws/session/{id}: what it sends, what arrives on its socket, what lands in the database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import WSMsgType

from tests.conftest import eventually, receive, receive_until
from tests.fakes import openai_server as fake


async def connect(client: Any, session_id: str = "s1", **params: Any) -> tuple[Any, dict[str, Any]]:
    ws = await client.ws_connect(f"/ws/session/{session_id}", params=params or None)
    ready = await receive(ws)
    assert ready["type"] == "session.ready"
    return ws, ready


async def send_json(ws: Any, **frame: Any) -> None:
    await ws.send_str(orjson.dumps(frame).decode())


async def ask(ws: Any, text: str, **extra: Any) -> dict[str, Any]:
    await send_json(ws, type="message", text=text, **extra)
    return await collect_answer(ws)


async def collect_answer(ws: Any) -> dict[str, Any]:
    """One whole answer: started, deltas, done, and the message.stored events of the question and the answer."""
    events = await receive_until(ws, "response.done")
    stored = [e for e in events if e["type"] == "message.stored"]
    while len(stored) < 2:
        event = await receive(ws)
        if event["type"] == "message.stored":
            stored.append(event)
    return {
        "started": next(e for e in events if e["type"] == "response.started"),
        "deltas": [e["delta"] for e in events if e["type"] == "response.delta"],
        "done": events[-1],
        "stored": stored,
    }


async def rows(db: Any, session_id: str = "s1") -> list[Any]:
    return await db.fetch(
        "select id, event_type, content, client_msg_id, metadata from session_events where session_id = $1 order by id",
        session_id,
    )


def messages(rows_: list[Any]) -> list[tuple[str, str]]:
    return [(r["event_type"], r["content"]) for r in rows_ if r["event_type"] in ("user_message", "ai_message")]


async def test_a_plain_text_frame_is_answered_token_by_token_and_stored(client, db, fake_llm):
    ws, ready = await connect(client)
    assert ready["resumed"] is False
    assert ready["model"] == "fake-model"
    assert ready["history"] == []

    fake_llm.token_delay = 0.005  # each token its own network read, so each its own delta
    await ws.send_str("Hello there")
    answer = await collect_answer(ws)

    assert answer["started"]["client_msg_id"] is None
    assert len(answer["deltas"]) >= 2
    assert answer["done"]["status"] == "completed"
    assert answer["done"]["error"] is None
    assert answer["done"]["text"] == "".join(answer["deltas"])
    assert "Hello there" in answer["done"]["text"]

    stored = await rows(db)
    assert messages(stored) == [("user_message", "Hello there"), ("ai_message", answer["done"]["text"])]
    assert stored[0]["event_type"] == "connected"
    by_role = {e["role"]: e for e in answer["stored"]}
    assert by_role["user"]["id"] == stored[1]["id"]
    assert by_role["assistant"]["id"] == stored[2]["id"]
    assert by_role["assistant"]["response_id"] == answer["done"]["response_id"]
    await ws.close()


async def test_a_json_message_carries_its_client_msg_id_through(client, db):
    ws, _ = await connect(client)
    answer = await ask(ws, "What is a WebSocket?", client_msg_id="m-1")

    assert answer["started"]["client_msg_id"] == "m-1"
    user_ack = next(e for e in answer["stored"] if e["role"] == "user")
    assert user_ack["client_msg_id"] == "m-1"
    stored = await rows(db)
    user_row = next(r for r in stored if r["event_type"] == "user_message")
    assert user_row["client_msg_id"] == "m-1"
    ai_meta = orjson.loads(next(r for r in stored if r["event_type"] == "ai_message")["metadata"])
    assert ai_meta["status"] == "completed"
    assert ai_meta["in_reply_to"] == "m-1"
    assert ai_meta["model"] == "fake-model"
    await ws.close()


async def test_the_second_turn_sends_the_first_turn_to_the_model(client, fake_llm):
    ws, _ = await connect(client)
    first = await ask(ws, "My name is Ada.")
    await ask(ws, "What is my name?")

    sent = fake_llm.requests[-1]["messages"]
    assert sent == [
        {"role": "system", "content": "You are a test assistant."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first["done"]["text"]},
        {"role": "user", "content": "What is my name?"},
    ]
    assert fake_llm.requests[-1]["stream"] is True
    await ws.close()


async def test_a_reconnect_resumes_with_history_and_context(client, db, fake_llm):
    ws, _ = await connect(client)
    first = await ask(ws, "Remember the number 42.")
    await ws.close()

    ws, ready = await connect(client)
    assert ready["resumed"] is True
    assert [(m["role"], m["text"]) for m in ready["history"]] == [
        ("user", "Remember the number 42."),
        ("assistant", first["done"]["text"]),
    ]
    ids = [m["id"] for m in ready["history"]]
    assert ids == sorted(ids)

    await ask(ws, "Which number?")
    assert fake_llm.requests[-1]["messages"][1:3] == [
        {"role": "user", "content": "Remember the number 42."},
        {"role": "assistant", "content": first["done"]["text"]},
    ]
    await ws.close()

    # The resume cursor: only what came after the last id the client saw.
    ws, ready = await connect(client, after=str(ids[-1]))
    assert (ready["history"][0]["role"], ready["history"][0]["text"]) == ("user", "Which number?")
    assert all(m["id"] > ids[-1] for m in ready["history"])
    await ws.close()


async def test_a_retried_client_msg_id_is_acknowledged_but_not_stored_or_answered_twice(client, db, fake_llm):
    ws, _ = await connect(client)
    answer = await ask(ws, "Only once, please", client_msg_id="retry-me")
    user_id = next(e["id"] for e in answer["stored"] if e["role"] == "user")

    await send_json(ws, type="message", text="Only once, please", client_msg_id="retry-me")
    ack = await receive(ws)
    assert ack == {
        "type": "message.stored",
        "id": user_id,
        "role": "user",
        "client_msg_id": "retry-me",
        "text": "Only once, please",
    }
    await ws.close()

    # Also after a reconnect, when the retry comes from a fresh socket.
    ws, _ = await connect(client)
    await send_json(ws, type="message", text="Only once, please", client_msg_id="retry-me")
    assert (await receive(ws))["id"] == user_id
    await send_json(ws, type="ping")
    assert (await receive(ws)) == {"type": "pong"}
    await ws.close()

    assert len(fake_llm.requests) == 1
    assert [m for m in messages(await rows(db)) if m[0] == "user_message"] == [("user_message", "Only once, please")]


async def test_cancel_midway_stops_the_answer_and_stores_the_partial_text(client, db, fake_llm):
    fake_llm.script(fake.slow(0.05, text=" ".join(f"word{i}" for i in range(100))))
    ws, _ = await connect(client)
    await send_json(ws, type="message", text="Tell me a long story")
    events = await receive_until(ws, "response.delta")
    await send_json(ws, type="cancel")
    events += await receive_until(ws, "response.done")

    done = events[-1]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.delta")
    assert done["status"] == "cancelled"
    assert done["text"] == deltas
    assert 0 < len(deltas) < len(" ".join(f"word{i}" for i in range(100)))
    await fake_llm.wait_for_disconnect()

    async def stored_answer() -> Any:
        return [r for r in await rows(db) if r["event_type"] == "ai_message"]

    answer_rows = await eventually(stored_answer)
    assert answer_rows[0]["content"] == deltas
    assert orjson.loads(answer_rows[0]["metadata"])["status"] == "cancelled"

    # The socket carries on: the next message is answered in full.
    answer = await ask(ws, "Short one now")
    assert answer["done"]["status"] == "completed"
    await ws.close()


async def test_a_cancel_right_behind_its_message_stops_the_answer_before_any_text(client, db, fake_llm):
    # The request leaves while the message frame is handled; a cancel read in the same network read comes before
    # the answer's task has run at all. Each time: cancelled, stored as such, and the next message answered.
    # (Every answer is slow: a request closed before the provider read it never takes a scripted one.)
    fake_llm.token_delay = 0.02
    for i in range(5):
        ws, _ = await connect(client, f"quick-cancel-{i}")
        message = orjson.dumps({"type": "message", "text": "go"}).decode()
        await asyncio.gather(ws.send_str(message), ws.send_str('{"type":"cancel"}'))
        events = await receive_until(ws, "response.done")
        done = events[-1]
        assert done["status"] == "cancelled"
        assert done["text"] == "".join(e["delta"] for e in events if e["type"] == "response.delta")
        answer = await ask(ws, "and now?")
        assert answer["done"]["status"] == "completed" and answer["done"]["text"] == "You said: and now?"
        await ws.close()

    async def cancelled() -> Any:
        stored = [r for i in range(5) for r in await rows(db, f"quick-cancel-{i}") if r["event_type"] == "ai_message"]
        return [m for m in (orjson.loads(r["metadata"]) for r in stored) if m["status"] == "cancelled"]

    assert len(await eventually(cancelled)) == 5


async def test_cancel_with_nothing_streaming_is_harmless(client):
    ws, _ = await connect(client)
    await send_json(ws, type="cancel")
    await send_json(ws, type="ping")
    assert await receive(ws) == {"type": "pong"}
    await ws.close()


async def test_a_client_that_vanishes_midway_leaves_its_partial_answer_stored(client, db, fake_llm):
    fake_llm.script(fake.slow(0.05, text=" ".join(f"word{i}" for i in range(100))))
    ws, _ = await connect(client)
    await send_json(ws, type="message", text="Tell me a long story")
    await receive_until(ws, "response.delta")
    await ws.close()
    await fake_llm.wait_for_disconnect()

    async def answer_and_disconnect() -> Any:
        stored = await rows(db)
        kinds = [r["event_type"] for r in stored]
        return stored if "ai_message" in kinds and "disconnected" in kinds else None

    stored = await eventually(answer_and_disconnect)
    kinds = [r["event_type"] for r in stored]
    assert kinds == ["connected", "user_message", "ai_message", "disconnected"]
    answer = stored[2]
    assert orjson.loads(answer["metadata"])["status"] == "cancelled"
    assert answer["content"].startswith("word0")

    async def ended() -> Any:
        return await db.fetchval("select end_time from sessions where session_id = 's1'")

    assert await eventually(ended)


async def test_a_rate_limited_provider_fails_the_answer_with_the_fallback_and_the_next_one_works(
    client, db, fake_llm, settings
):
    fake_llm.script(fake.rate_limited(quota=True))
    ws, _ = await connect(client)
    failed = await ask(ws, "Are you there?")

    assert failed["done"]["status"] == "failed"
    assert failed["done"]["error"]["code"] == "llm_rate_limited"
    assert failed["done"]["text"] == settings.fallback_text
    assert failed["deltas"] == []

    answer = await ask(ws, "And now?")
    assert answer["done"]["status"] == "completed"
    # The failed turn's fallback text is not sent back to the model as if it had said it.
    assert settings.fallback_text not in [m["content"] for m in fake_llm.requests[-1]["messages"]]

    stored = messages(await rows(db))
    assert stored[:2] == [("user_message", "Are you there?"), ("ai_message", settings.fallback_text)]
    await ws.close()


async def test_a_provider_that_stalls_midway_fails_within_the_gap_timeout(make_client, fake_llm):
    client = await make_client(llm_token_gap_timeout_s=0.5)
    fake_llm.script(fake.stall_after(2))
    ws, _ = await connect(client)
    started = time.monotonic()
    failed = await ask(ws, "Go on")
    elapsed = time.monotonic() - started

    assert failed["done"]["status"] == "failed"
    assert failed["done"]["error"]["code"] == "llm_unavailable"
    assert len(failed["deltas"]) >= 1
    assert elapsed < 3.0
    await ws.close()


async def test_a_stream_cut_midway_fails_and_keeps_the_socket(client, fake_llm, settings):
    fake_llm.script(fake.cut_after(2))
    ws, _ = await connect(client)
    failed = await ask(ws, "Go on")
    assert failed["done"]["status"] == "failed"
    assert failed["done"]["error"]["code"] == "llm_unavailable"
    assert failed["done"]["text"] == settings.fallback_text
    assert (await ask(ws, "Again"))["done"]["status"] == "completed"
    await ws.close()


async def test_messages_sent_while_answering_wait_and_are_answered_in_order(client, fake_llm):
    fake_llm.script(fake.slow(0.02, text="first answer takes a while to stream"))
    ws, _ = await connect(client)
    for text in ("one", "two", "three"):
        await send_json(ws, type="message", text=text, client_msg_id=text)

    started = []
    done = []
    async with asyncio.timeout(10):
        while len(done) < 3:
            event = await receive(ws)
            if event["type"] == "response.started":
                started.append(event["client_msg_id"])
            elif event["type"] == "response.done":
                done.append(event["status"])
    assert started == ["one", "two", "three"]
    assert done == ["completed"] * 3
    assert [r["messages"][-1]["content"] for r in fake_llm.requests] == ["one", "two", "three"]
    await ws.close()


async def test_too_many_waiting_messages_are_refused_as_busy(make_client, fake_llm):
    client = await make_client(max_pending_messages=2)
    fake_llm.script(fake.slow(0.05, text=" ".join(["slow"] * 40)))
    ws, _ = await connect(client)
    await send_json(ws, type="message", text="answering", client_msg_id="a")
    await receive_until(ws, "response.started")
    for cmid in ("w1", "w2", "w3"):
        await send_json(ws, type="message", text=cmid, client_msg_id=cmid)

    events = await receive_until(ws, "error")
    assert events[-1]["code"] == "busy"
    await send_json(ws, type="cancel")
    started = []
    async with asyncio.timeout(10):
        while len(started) < 2:
            event = await receive(ws)
            if event["type"] == "response.started":
                started.append(event["client_msg_id"])
    assert started == ["w1", "w2"]
    await ws.close()


async def test_too_many_messages_a_minute_are_rate_limited(make_client):
    client = await make_client(messages_per_minute=2)
    ws, _ = await connect(client)
    for text in ("a", "b", "c"):
        await ws.send_str(text)
    events = await receive_until(ws, "error")
    assert events[-1]["code"] == "rate_limited"
    await ws.close()


async def test_each_bad_frame_gets_its_error_and_the_socket_stays_open(client, db):
    ws, _ = await connect(client)
    bad = [
        ({"type": "dance"}, "unknown_type"),
        ({"text": "no type"}, "invalid_message"),
        ({"type": 7}, "invalid_message"),
        ({"type": "message"}, "invalid_message"),
        ({"type": "message", "text": 12}, "invalid_message"),
        ({"type": "message", "text": "   \n"}, "invalid_message"),
        ({"type": "message", "text": "hi", "client_msg_id": 5}, "invalid_message"),
        ({"type": "message", "text": "hi", "client_msg_id": "x" * 129}, "invalid_message"),
        ({"type": "message", "text": "é" * 8193}, "message_too_long"),
    ]
    for frame, code in bad:
        await send_json(ws, **frame)
        event = await receive(ws)
        assert (event["type"], event["code"]) == ("error", code), frame
        assert event["message"]

    await ws.send_str("   ")
    assert (await receive(ws))["code"] == "invalid_message"
    await ws.send_str("x" * (16 * 1024 + 1))
    assert (await receive(ws))["code"] == "message_too_long"
    await ws.send_bytes(b"\x00\x01")
    assert (await receive(ws))["code"] == "unsupported_frame"

    await send_json(ws, type="ping")
    assert await receive(ws) == {"type": "pong"}
    assert [m for m in messages(await rows(db))] == []
    await ws.close()


async def test_text_that_is_not_a_json_object_is_a_message_verbatim(client, fake_llm):
    ws, _ = await connect(client)
    for text in ('"quoted"', "[1, 2]", "{not json", "42"):
        await ws.send_str(text)
        await receive_until(ws, "response.done")
    assert [r["messages"][-1]["content"] for r in fake_llm.requests] == ['"quoted"', "[1, 2]", "{not json", "42"]
    await ws.close()


async def test_a_frame_over_the_hard_limit_closes_the_socket_with_1009(make_client):
    client = await make_client(max_frame_bytes=64 * 1024)
    ws, _ = await connect(client)
    await ws.send_str("x" * (64 * 1024 + 10))
    msg = await ws.receive(timeout=5)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
    assert ws.close_code == 1009


async def test_bad_session_ids_get_400_and_a_plain_get_gets_426(client):
    for bad in ("has space", "x" * 129, "semi;colon", "%C3%A9"):
        resp = await client.get(f"/ws/session/{bad}")
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == "invalid_session_id"

    resp = await client.get("/ws/session/fine-id")
    assert resp.status == 426
    assert (await resp.json())["error"]["code"] == "upgrade_required"

    resp = await client.get("/ws/session/fine-id", params={"after": "-1"})
    assert resp.status == 400


async def test_a_newer_connection_takes_the_session_over(client, db):
    first, _ = await connect(client)
    await ask(first, "hello from the first tab")
    second, ready = await connect(client)
    assert ready["resumed"] is True
    assert len(ready["history"]) == 2

    msg = await first.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4000)
    assert (await ask(second, "still here"))["done"]["status"] == "completed"
    await second.close()
    # The first connection's end is recorded with the reason the server gave.
    first_end = (await db.fetch("select metadata from session_events where event_type = 'disconnected' order by id"))[0]
    assert orjson.loads(first_end["metadata"])["close_code"] == 4000


async def test_the_offline_demo_model_answers_when_no_provider_is_configured(make_client, db):
    client = await make_client(openai_api_key=None, openai_base_url=None, offline_token_delay_s=0)
    ws, ready = await connect(client)
    assert ready["model"] == "offline-demo"
    first = await ask(ws, "hello offline")
    second = await ask(ws, "again")
    assert first["done"]["status"] == "completed"
    assert "hello offline" in first["done"]["text"]
    assert first["done"]["text"] != second["done"]["text"]
    assert len(first["deltas"]) > 1
    await ws.close()


async def test_an_answer_longer_than_the_cap_is_cut_there_and_stored_as_truncated(make_client, fake_llm, db):
    client = await make_client(max_answer_chars=50)
    long_text = "".join(f"piece{i:03d} " for i in range(40))
    fake_llm.script(fake.reply(long_text, chunks=[f"piece{i:03d} " for i in range(40)]))
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    await ws.send_str("talk forever")
    events = await receive_until(ws, "response.done")
    done = events[-1]
    assert done["status"] == "completed"
    assert done["text"] == long_text[:50]
    assert "".join(e["delta"] for e in events if e["type"] == "response.delta") == long_text[:50]
    row = await eventually(
        lambda: db.fetchrow("select content, metadata from session_events where event_type = 'ai_message'")
    )
    assert row["content"] == long_text[:50]
    assert orjson.loads(row["metadata"])["truncated"] is True
