"""The assembled application: the resources it holds stay within their bounds."""

from __future__ import annotations

import asyncio

from tests.conftest import receive, receive_until


async def test_a_burst_of_connections_uses_no_more_redis_connections_than_allowed(make_client, redis):
    before = {c["id"] for c in await redis.client_list()}
    client = await make_client(redis_max_connections=3)

    async def visit(n: int) -> None:
        ws = await client.ws_connect(f"/ws/session/burst-{n}")
        assert (await receive(ws, timeout=20))["type"] == "session.ready"
        await ws.send_str("hello")
        await receive_until(ws, "response.done", timeout=20)
        await ws.close()

    # Every connection claims its session's lease in Redis at once.
    await asyncio.gather(*(visit(n) for n in range(40)))
    # Only the connections opened since the app started: its pool.
    clients = [c for c in await redis.client_list() if c["id"] not in before]
    assert len(clients) <= 3, [c.get("cmd") for c in clients]
