"""Limits on connections and idleness, each answered as the protocol says."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType

from tests.conftest import eventually, receive, receive_until, start_server
from tests.fakes import openai_server as fake

SECRET = "limits-test-secret-long-enough-for-hs256"


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


async def test_an_idle_session_is_closed_with_4001_but_not_while_it_is_being_answered(make_client, fake_llm):
    client = await make_client(idle_timeout_s=0.5)
    fake_llm.script(fake.slow(0.1, text=" ".join(["slowly"] * 12)))
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    await ws.send_str("take your time")
    # The answer takes longer than the idle timeout: the silent client is reading, not idle.
    done = (await receive_until(ws, "response.done", timeout=10))[-1]
    assert done["status"] == "completed"
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type is not WSMsgType.TEXT:
            break
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4001)


async def test_a_ping_keeps_a_quiet_session_open(make_client):
    client = await make_client(idle_timeout_s=0.6)
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    for _ in range(4):
        await ws.send_str('{"type":"ping"}')
        assert await receive(ws) == {"type": "pong"}
        await asyncio.sleep(0.3)
    assert not ws.closed
    await ws.close()


async def test_a_full_server_refuses_new_connections_with_503(make_client):
    client = await make_client(max_connections=2)
    first = await client.ws_connect("/ws/session/a")
    second = await client.ws_connect("/ws/session/b")
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect("/ws/session/c")
    assert e.value.status == 503
    await first.close()
    third = await client.ws_connect("/ws/session/c")
    await receive(third)
    await second.close()
    await third.close()


async def test_one_user_may_hold_only_so_many_connections(make_client):
    client = await make_client(auth_jwt_secret=SECRET, max_connections_per_user=1)
    alice = await client.ws_connect("/ws/session/a1", params={"access_token": token("alice")})
    await receive(alice)
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect("/ws/session/a2", params={"access_token": token("alice")})
    assert e.value.status == 429
    bob = await client.ws_connect("/ws/session/b1", params={"access_token": token("bob")})
    await receive(bob)
    await alice.close()
    again = await client.ws_connect("/ws/session/a2", params={"access_token": token("alice")})
    await receive(again)
    await bob.close()
    await again.close()


async def _outcome(ws: aiohttp.ClientWebSocketResponse, text: str) -> dict[str, Any]:
    """Send a message; its acceptance (`message.stored`) or its refusal (`error`), whichever comes."""
    await ws.send_str(text)
    while True:
        event = await receive(ws, timeout=10)
        if event["type"] == "error" or (event["type"] == "message.stored" and event["role"] == "user"):
            return event


async def test_a_session_takes_only_so_many_turns_also_after_a_reconnect(make_client):
    client = await make_client(max_turns_per_session=2)
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    assert (await _outcome(ws, "one"))["type"] == "message.stored"
    assert (await _outcome(ws, "two"))["type"] == "message.stored"
    refused = await _outcome(ws, "three")
    assert refused["code"] == "rate_limited" and "limit of 2 turns" in refused["message"]
    await ws.close()

    # The count lives with the session, not the socket: it is read back from the store.
    await eventually(lambda: _ended(client, "s1"))
    again = await client.ws_connect("/ws/session/s1")
    await receive(again)
    assert (await _outcome(again, "three, again"))["code"] == "rate_limited"
    other = await client.ws_connect("/ws/session/s2")
    await receive(other)
    assert (await _outcome(other, "a new session"))["type"] == "message.stored"
    await again.close()
    await other.close()


async def _ended(client: Any, session_id: str) -> bool:
    resp = await client.get(f"/api/sessions/{session_id}")
    return resp.status == 200 and (await resp.json())["end_time"] is not None


async def test_a_user_is_rate_limited_across_their_connections(make_client):
    client = await make_client(auth_jwt_secret=SECRET, user_messages_per_minute=3, messages_per_minute=100)
    a = await client.ws_connect("/ws/session/a1", params={"access_token": token("alice")})
    b = await client.ws_connect("/ws/session/a2", params={"access_token": token("alice")})
    bob = await client.ws_connect("/ws/session/b1", params={"access_token": token("bob")})
    for ws in (a, b, bob):
        await receive(ws)
    assert [(await _outcome(ws, "hi"))["type"] for ws in (a, b, a)] == ["message.stored"] * 3
    refused = await _outcome(b, "one more")
    assert refused["code"] == "rate_limited" and "across connections" in refused["message"]
    # Each connection alone is far below its own limit, and other users are not affected.
    assert (await _outcome(bob, "hi"))["type"] == "message.stored"
    for ws in (a, b, bob):
        await ws.close()


async def test_a_user_is_rate_limited_across_server_processes(settings, fake_llm, redis):
    if time.time() % 60 > 50:  # The shared count is per clock minute: do not straddle two.
        await asyncio.sleep(61 - time.time() % 60)
    env = {"AUTH_JWT_SECRET": SECRET, "USER_MESSAGES_PER_MINUTE": "3", "MESSAGES_PER_MINUTE": "100"}
    servers = [await start_server(settings, **env) for _ in range(2)]
    try:
        async with aiohttp.ClientSession() as http:
            sockets = []
            for i, (_, port) in enumerate(servers):
                ws = await http.ws_connect(
                    f"http://127.0.0.1:{port}/ws/session/p{i}", params={"access_token": token("alice")}
                )
                await receive(ws)
                sockets.append(ws)
            first, second = sockets
            # Alternating: each process alone would take 3. The shared count stops alice after the limit, give or
            # take the one message a process accepts before its own count tells it (the hot path never waits for
            # Redis).
            outcomes = [(await _outcome(ws, "hi"))["type"] for ws in (first, second, first, second)]
            assert outcomes == ["message.stored"] * 4
            for ws in (first, second):
                assert (await _outcome(ws, "one more"))["code"] == "rate_limited"
            for ws in sockets:
                await ws.close()
    finally:
        for proc, _ in servers:
            proc.terminate()
            await proc.wait()


async def test_a_peer_that_stops_answering_pings_is_found_and_its_session_ended(make_client, db):
    client = await make_client(ws_heartbeat_s=0.3, idle_timeout_s=0)
    # A client that never answers pings: a dead phone, a half-open TCP connection.
    ws = await client.ws_connect("/ws/session/s1", autoping=False)
    await receive(ws)
    ended = await eventually(
        lambda: db.fetchval("select end_time from sessions where session_id = 's1' and end_time is not null"),
        timeout=10,
    )
    assert ended is not None
    kinds = await db.fetch("select event_type from session_events where session_id = 's1' order by id")
    assert [r["event_type"] for r in kinds] == ["connected", "disconnected"]
    await ws.close()
