"""The HTTP side: the page, the sessions API, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from tests.conftest import eventually, receive, receive_until


async def raw_request(client: Any, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client fixes them up) and read the whole answer: status, headers, body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        head, _, body = (await asyncio.wait_for(reader.read(-1), 5)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


async def _chat(client, session_id: str, text: str) -> None:
    ws = await client.ws_connect(f"/ws/session/{session_id}")
    await receive(ws)
    await ws.send_str(text)
    await receive_until(ws, "response.done")
    await ws.close()


async def test_the_page_is_served_at_the_root(client):
    resp = await client.get("/")
    assert resp.status == 200
    assert "<html" in await resp.text()


async def test_sessions_are_listed_newest_first_with_their_message_counts(client, db):
    await _chat(client, "older", "one")
    await _chat(client, "newer", "two")

    async def listed():
        body = await (await client.get("/api/sessions", params={"limit": "10"})).json()
        return body if [s["message_count"] for s in body["sessions"]] == [2, 2] else None

    body = await eventually(listed)
    assert [s["session_id"] for s in body["sessions"]] == ["newer", "older"]
    first = body["sessions"][0]
    assert set(first) == {"session_id", "start_time", "end_time", "summary", "message_count", "usage"}

    body = await (await client.get("/api/sessions", params={"limit": "1"})).json()
    assert len(body["sessions"]) == 1


async def test_one_session_shows_its_events_in_order_and_unknown_ones_are_404(client, db):
    await _chat(client, "s-api", "hello api")

    async def detail():
        body = await (await client.get("/api/sessions/s-api")).json()
        return body if len(body["events"]) == 2 else None

    body = await eventually(detail)
    assert [e["role"] for e in body["events"]] == ["user", "assistant"]
    assert body["events"][0]["text"] == "hello api"
    assert body["events"][0]["id"] < body["events"][1]["id"]

    resp = await client.get("/api/sessions/nobody-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "session_not_found"


async def test_bad_parameters_and_unknown_routes_answer_json_errors(client):
    # "²" and "٣" are digits to str.isdigit(); int() refuses the first and reads the second as 3.
    for limit in ("0", "abc", "100000", "-3", "²", "٣", "1" * 5000, "5\n"):
        resp = await client.get("/api/sessions", params={"limit": limit})
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_limit"
    # A file name longer than the file system takes is just not there.
    resp = await client.get("/web/" + "a" * 300)
    assert (resp.status, (await resp.json())["error"]["code"]) == (404, "not_found")
    resp = await client.get("/api/nothing")
    assert resp.status == 404
    assert orjson.loads(await resp.read())["error"]["code"] == "not_found"


async def test_health_readiness_and_metrics(client, make_client):
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200, await resp.text()

    await _chat(client, "s-metrics", "count me")
    text = await (await client.get("/metrics")).text()
    assert 'rt_answers_total{status="completed"} 1.0' in text
    assert "rt_time_to_first_token_seconds_count 1.0" in text
    assert "rt_completion_tokens_total" in text and "rt_completion_tokens_total 0.0" not in text

    # Readiness names what does not answer.
    broken = await make_client(redis_url="redis://127.0.0.1:1/0")
    resp = await broken.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["failing"] == ["redis"]


def _trouble(caplog: Any) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_very_long_session_id_is_answered_in_json_without_a_traceback(client, caplog):
    long_id = "a" * 10_000
    resp = await client.get(f"/api/sessions/{long_id}")
    assert (resp.status, (await resp.json())["error"]["code"]) == (400, "invalid_session_id")
    # The socket route too, over a bare connection as a browser would send it.
    request = (
        f"GET /ws/session/{long_id} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\r\n"
    )
    status, headers, body = await raw_request(client, request.encode())
    assert (status, headers["content-type"]) == (400, "application/json")
    assert orjson.loads(body)["error"]["code"] == "invalid_session_id"
    assert _trouble(caplog) == []


async def test_a_request_the_http_parser_refuses_is_logged_as_a_warning_without_a_traceback(client, caplog):
    # Past the request-line limit aiohttp's parser answers before any route runs: still a 400, and the log
    # holds one warning, not an error with a traceback.
    caplog.set_level(logging.INFO)
    request = f"GET /api/sessions/{'a' * 40_000} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\n\r\n"
    status, _, _ = await raw_request(client, request.encode())
    assert status == 400
    # Not HTTP at all (scanners, TLS to a plain port): aiohttp itself keeps that at DEBUG.
    status, _, _ = await raw_request(client, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
    assert _trouble(caplog) == []
    [warning] = [r for r in caplog.records if r.getMessage() == "malformed request refused"]
    assert warning.levelno == logging.WARNING
    assert warning.fields == {"remote": "127.0.0.1", "status": 400, "error": "LineTooLong"}  # type: ignore[attr-defined]
