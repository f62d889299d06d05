"""Clients that stop reading: they lose their socket, never the session's data, and never lock the owner out."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import orjson

from tests.conftest import eventually, receive, receive_until
from tests.fakes import openai_server as fake

# Far more than the kernel buffers of a loopback socket hold (a few MB), in big pieces.
PIECE = "x" * 65_536
BIG_ANSWER = [PIECE] * 120


async def _stalled_client(
    host: str, port: int, session_id: str, text: str
) -> tuple[socket.socket, asyncio.StreamWriter]:
    """A raw WebSocket client with a 4 KiB receive buffer that sends one message and then never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws/session/{session_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    status = await reader.readline()
    assert b" 101 " in status, status
    await reader.readuntil(b"\r\n\r\n")
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    await writer.drain()
    return sock, writer


async def test_a_client_that_stops_reading_loses_its_socket_and_its_answer_is_stored(make_client, fake_llm, db):
    client = await make_client(send_timeout_s=1.0, max_answer_chars=10_000_000, ws_heartbeat_s=300)
    fake_llm.script(fake.reply("".join(BIG_ANSWER), chunks=BIG_ANSWER))
    host, port = client.server.host, client.server.port
    sock, writer = await _stalled_client(host, port, "stalled", "tell me everything")
    try:
        # The server gives up on the socket by itself (SEND_TIMEOUT_S), then stores what the session had.
        async def ended() -> bool:
            return bool(await db.fetchval("select end_time from sessions where session_id = 'stalled'"))

        await eventually(ended, timeout=15)
        rows = await db.fetch(
            "select event_type, metadata from session_events where session_id = 'stalled' order by id"
        )
        assert [r["event_type"] for r in rows] == ["connected", "user_message", "ai_message", "disconnected"]
        assert orjson.loads(rows[2]["metadata"])["status"] == "cancelled"
        metrics = await (await client.get("/metrics")).text()
        assert "rt_open_sockets 0.0" in metrics
    finally:
        writer.close()
        sock.close()


async def test_the_owner_takes_over_a_session_whose_old_socket_stopped_reading(make_client, fake_llm, db):
    # The stall sweep is far away: the takeover itself must not wait on the stuck socket.
    client = await make_client(send_timeout_s=60.0, max_answer_chars=10_000_000, ws_heartbeat_s=300)
    fake_llm.script(fake.reply("".join(BIG_ANSWER), chunks=BIG_ANSWER))
    host, port = client.server.host, client.server.port
    sock, writer = await _stalled_client(host, port, "owned", "tell me everything")
    try:

        async def answer_started() -> bool:
            return bool(fake_llm.requests)

        await eventually(answer_started, timeout=5)
        await asyncio.sleep(0.5)  # The answer fills the buffers of the socket nobody reads.
        ws = await client.ws_connect("/ws/session/owned")
        ready = await receive(ws, timeout=5)
        assert ready["type"] == "session.ready"
        assert [h["role"] for h in ready["history"]] == ["user", "assistant"]
        await ws.send_str("and now?")
        events = await receive_until(ws, "response.done", timeout=5)
        assert events[-1]["status"] == "completed"
        await ws.close()
    finally:
        writer.close()
        sock.close()
