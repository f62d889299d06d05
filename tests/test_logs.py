"""Log lines: one per event with its fields, readable text by default and JSON with LOG_FORMAT=json, one time format."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
from typing import Any

import orjson

from core.logs import JSONFormatter, TextFormatter
from tests.conftest import eventually


def _record(message: str, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("server.ws", logging.INFO, __file__, 1, message, None, None)
    record.fields = fields
    return record


def test_json_lines_carry_the_event_and_its_fields():
    line = JSONFormatter().format(_record("connected", session_id="s1", resumed=False, history=3))
    entry = orjson.loads(line)
    assert entry["event"] == "connected"
    assert entry["level"] == "info"
    assert (entry["session_id"], entry["resumed"], entry["history"]) == ("s1", False, 3)
    assert "\n" not in line


def test_text_lines_are_key_value_pairs():
    line = TextFormatter().format(_record("answer done", session_id="s1", status="completed", error=None))
    assert line.endswith("INFO server.ws answer done session_id=s1 status=completed error=None")


def test_text_and_json_lines_carry_the_same_timestamp():
    record = _record("connected", session_id="s1")
    text_ts = TextFormatter().format(record).split(" ", 1)[0]
    json_ts = orjson.loads(JSONFormatter().format(record))["ts"]
    assert text_ts == json_ts
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", json_ts)


async def test_a_close_without_a_code_is_logged_as_1005_and_a_dropped_socket_as_1006(client, db, caplog):
    caplog.set_level(logging.INFO, logger="server.live.connection")

    async def open_socket(session_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # By hand: aiohttp's client always puts a code in its close frame.
        reader, writer = await asyncio.open_connection(client.host, client.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws/session/{session_id} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
        await reader.read(1)  # session.ready has begun: the session is served
        return reader, writer

    async def disconnected(session_id: str) -> list[Any]:
        return [
            r.fields["close_code"]  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "disconnected" and r.fields["session_id"] == session_id  # type: ignore[attr-defined]
        ]

    reader, writer = await open_socket("no-code")
    writer.write(bytes([0x88, 0x80]) + os.urandom(4))  # FIN + CLOSE, masked, no payload: no status code
    await writer.drain()
    await reader.read()  # the server answers the close and hangs up
    writer.close()
    assert await eventually(lambda: disconnected("no-code")) == [1005]

    reader, writer = await open_socket("dropped")
    writer.transport.abort()  # no close frame at all
    assert await eventually(lambda: disconnected("dropped")) == [1006]

    async def stored(session_id: str) -> Any:
        return await db.fetchval(
            "select metadata->>'close_code' from session_events where session_id = $1 and event_type = 'disconnected'",
            session_id,
        )

    assert await eventually(lambda: stored("no-code")) == "1005"
