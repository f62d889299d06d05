"""The store stays down longer than memory should hold: pending writes go to the local spool and are replayed,
in order and once, when it is back, by this process or, after a crash or a shutdown, by the next one."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from core.errors import ConfigError
from tests.conftest import eventually, receive, receive_until, start_server


async def _ask(ws: Any, text: str, client_msg_id: str) -> list[dict[str, Any]]:
    await ws.send_str(orjson.dumps({"type": "message", "text": text, "client_msg_id": client_msg_id}).decode())
    events = await receive_until(ws, "response.done")
    assert events[-1]["status"] == "completed"
    return events


def _list_segments(spool: Path) -> list[Path]:
    return sorted(p for p in spool.iterdir() if p.suffix in (".jsonl", ".partial")) if spool.is_dir() else []


async def _segments(spool: Path) -> list[Path]:
    return await asyncio.to_thread(_list_segments, spool)


async def _messages(url: str, session_id: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "select event_type, client_msg_id, content from session_events"
            " where session_id = $1 and event_type in ('user_message', 'ai_message') order by id",
            session_id,
        )
    finally:
        await conn.close()
    return [(r["event_type"], r["client_msg_id"] or "") for r in rows]


def _conversation(*ids: str) -> list[tuple[str, str]]:
    return [pair for i in ids for pair in (("user_message", i), ("ai_message", ""))]


async def _stored_when_complete(url: str, session_id: str, expected: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The session's messages once as many as expected are stored (or the timeout), to compare whole."""

    async def enough() -> list[tuple[str, str]] | None:
        stored = await _messages(url, session_id)
        return stored if len(stored) >= len(expected) else None

    with contextlib.suppress(TimeoutError):
        await eventually(enough, timeout=15)
    return await _messages(url, session_id)


async def test_writes_the_store_cannot_take_are_spooled_then_replayed_in_order_and_acknowledged(
    make_client, settings, fake_llm, postgres_control
):
    client = await make_client(spool_after_s=0.5)
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    seen = await _ask(ws, "before", "m0")
    await postgres_control.stop()

    seen += await _ask(ws, "during 1", "m1")
    seen += await _ask(ws, "during 2", "m2")
    # The writes waited past SPOOL_AFTER_S: they left memory for a segment on disk.
    assert await eventually(lambda: _segments(settings.spool_dir), timeout=10)

    await postgres_control.start()
    acks = [e for e in seen if e["type"] == "message.stored"]
    async with asyncio.timeout(30):
        while {a.get("client_msg_id") for a in acks if a["role"] == "user"} < {"m0", "m1", "m2"}:
            event = await receive(ws, timeout=30)
            if event["type"] == "message.stored":
                acks.append(event)

    # The segment goes once its events are committed: just after their acknowledgements, not before.
    async def replayed() -> bool:
        return not await _segments(settings.spool_dir)

    await eventually(replayed, timeout=10)
    assert await _messages(postgres_control.url, "s1") == _conversation("m0", "m1", "m2")

    # The conversation goes on after the replay, in order after it.
    await _ask(ws, "after", "m3")
    await ws.close()
    expected = _conversation("m0", "m1", "m2", "m3")
    assert await _stored_when_complete(postgres_control.url, "s1", expected) == expected


async def _through_an_outage(
    settings: Any, postgres_control: Any, spool: Path, during: list[str], end: Any, **env: str
) -> None:
    """A real server process: one message before PostgreSQL stops, `during` while it is down, then `end(server)`."""
    server, port = await start_server(settings, SPOOL_DIR=str(spool), **env)
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/s1")
            await receive(ws)
            await _ask(ws, "before", "m0")
            await postgres_control.stop()
            for i, client_msg_id in enumerate(during, 1):
                await _ask(ws, f"during {i}", client_msg_id)
            await end(server)
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


async def _next_start_stores(settings: Any, postgres_control: Any, spool: Path, *client_msg_ids: str) -> None:
    """PostgreSQL back, a new server on the same spool: the whole conversation is stored, in order, once."""
    await postgres_control.start()
    server, _ = await start_server(settings, SPOOL_DIR=str(spool))
    try:
        expected = _conversation(*client_msg_ids)
        assert await _stored_when_complete(postgres_control.url, "s1", expected) == expected
        assert await eventually(lambda: _no_segments(spool), timeout=10)
    finally:
        server.terminate()
        await server.wait()


async def _no_segments(spool: Path) -> bool:
    return not await _segments(spool)


async def test_a_server_killed_with_writes_in_the_spool_has_them_replayed_by_the_next_start(
    settings, fake_llm, postgres_control, tmp_path
):
    spool = tmp_path / "shared-spool"

    async def killed_once_spooled(server: asyncio.subprocess.Process) -> None:
        assert await eventually(lambda: _segments(spool), timeout=10)
        # Gone without a chance to flush anything: only the spool remembers.
        server.kill()
        await server.wait()

    await _through_an_outage(settings, postgres_control, spool, ["m1", "m2"], killed_once_spooled, SPOOL_AFTER_S="0.5")
    await _next_start_stores(settings, postgres_control, spool, "m0", "m1", "m2")


async def test_sigterm_while_the_store_is_down_spools_what_is_pending_for_the_next_start(
    settings, fake_llm, postgres_control, tmp_path
):
    spool = tmp_path / "shared-spool"

    async def terminated(server: asyncio.subprocess.Process) -> None:
        server.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await server.wait() == 0

    # The spool is only reached through the shutdown: the outage is shorter than SPOOL_AFTER_S.
    await _through_an_outage(
        settings, postgres_control, spool, ["m1"], terminated, SPOOL_AFTER_S="600", SHUTDOWN_FLUSH_S="1"
    )
    assert await _segments(spool)
    await _next_start_stores(settings, postgres_control, spool, "m0", "m1")


async def test_a_segment_cut_by_a_crash_mid_spill_keeps_its_whole_lines(make_client, settings, db):
    await db.execute("insert into sessions (session_id, start_time) values ('s1', now())")
    settings.spool_dir.mkdir(parents=True)
    lines = [
        orjson.dumps(
            {
                "session_id": "s1",
                "event_type": "user_message",
                "content": f"spooled {i}",
                "event_key": f"k{i}",
                "created_at": "2026-11-25T04:00:00+00:00",
                "client_msg_id": f"m{i}",
                "metadata": {},
            }
        )
        for i in range(2)
    ]
    (settings.spool_dir / "00000000000000000001-1-abcd.partial").write_bytes(b"\n".join(lines) + b'\n{"session_id": "s')
    await make_client()
    rows = await eventually(lambda: db.fetch("select content from session_events where session_id = 's1' order by id"))
    assert [r["content"] for r in rows] == ["spooled 0", "spooled 1"]
    assert await eventually(lambda: _no_segments(settings.spool_dir))


async def test_a_spool_directory_that_cannot_be_written_stops_the_start_with_a_clear_error(make_client, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ConfigError, match="SPOOL_DIR"):
        await make_client(spool_dir=not_a_dir / "spool")


async def test_an_unreadable_segment_is_set_aside_and_holds_nothing_back(make_client, settings, db):
    settings.spool_dir.mkdir(parents=True)
    # A directory where a segment should be: reading it fails, like a file the server may not read.
    (settings.spool_dir / "00000000000000000001-1-abcd.jsonl").mkdir()
    client = await make_client()
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    await _ask(ws, "after it", "m1")
    await ws.close()
    assert await eventually(lambda: db.fetchval("select count(*) from session_events where client_msg_id = 'm1'"))
    assert (settings.spool_dir / "00000000000000000001-1-abcd.jsonl.unreadable").exists()
