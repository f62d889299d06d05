"""Limits on connections and idleness, each answered as the protocol says."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType

from tests.conftest import receive, receive_until
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
