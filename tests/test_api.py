"""The HTTP side: the page, the sessions API, health, readiness and metrics."""

from __future__ import annotations

import orjson

from tests.conftest import eventually, receive, receive_until


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
    assert set(first) == {"session_id", "start_time", "end_time", "summary", "message_count"}

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
