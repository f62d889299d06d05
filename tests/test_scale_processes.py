"""Many processes on one machine: `python -m server` with WEB_CONCURRENCY=2 runs two server processes on one port
under gunicorn. Both take connections; one that dies is replaced and its clients come back to their sessions; a
stop drains every process as one process drains; the spool is per process and a replacement replays it."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import WSMsgType

from core.errors import ConfigError
from core.settings import Settings
from tests.conftest import eventually, receive, receive_until, start_server
from tests.fakes import openai_server as fake

# A dead process's sessions are taken over after a second (its leases are not let go).
TWO = {"WEB_CONCURRENCY": "2", "ON_DISCONNECT": "continue", "MESSAGES_PER_MINUTE": "10000", "TAKEOVER_WAIT_S": "1"}


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def sockets_on(pid: int, port: int, state: str) -> int:
    """How many TCP sockets of `pid` are on local `port` in `state` ("0A" listening, "01" established)."""
    mine = _socket_inodes(pid)
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == state and cols[9] in mine:
                count += 1
    return count


async def serving_workers(manager: asyncio.subprocess.Process, port: int, n: int = 2) -> set[int]:
    """The manager's worker processes, once `n` of them listen on the port."""

    async def ready() -> set[int]:
        pids = children(manager.pid)
        listening = {pid for pid in pids if sockets_on(pid, port, "0A")}
        return listening if len(listening) == n else set()

    workers: set[int] = await eventually(ready, timeout=20)
    return workers


async def _ask(ws: Any, text: str, cmid: str) -> None:
    await ws.send_str(orjson.dumps({"type": "message", "text": text, "client_msg_id": cmid}).decode())


def test_web_concurrency_is_a_number_of_processes_or_auto_for_one_per_core():
    assert Settings.from_env({}, env_file=None).web_concurrency == 1
    assert Settings.from_env({"WEB_CONCURRENCY": "auto"}, env_file=None).web_concurrency == 0
    assert Settings.from_env({"WEB_CONCURRENCY": "8", "EVENT_LOOP": "asyncio"}, env_file=None).event_loop == "asyncio"
    with pytest.raises(ConfigError, match="WEB_CONCURRENCY"):
        Settings.from_env({"WEB_CONCURRENCY": "-1"}, env_file=None)
    with pytest.raises(ConfigError, match="EVENT_LOOP"):
        Settings.from_env({"EVENT_LOOP": "trio"}, env_file=None)


async def test_two_processes_share_the_port_and_one_that_dies_is_replaced_its_clients_back_in_their_sessions(
    db, redis, fake_llm, settings
):
    manager, port = await start_server(settings, **TWO)
    try:
        workers = await serving_workers(manager, port)
        async with aiohttp.ClientSession() as http:
            sockets = [await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/p{i}") for i in range(40)]
            # The kernel spreads the connections over both processes (each listens on a socket of its own).
            held = {pid: sockets_on(pid, port, "01") for pid in workers}
            assert sum(held.values()) == 40 and min(held.values()) >= 5, held
            for i, ws in enumerate(sockets):
                await receive(ws)
                await _ask(ws, f"hello {i}", f"m{i}")
            for ws in sockets:
                while not ((e := await receive(ws))["type"] == "message.stored" and e["role"] == "assistant"):
                    pass

            # One process dies: the manager starts another; its clients reconnect and find their conversation.
            victim = max(held, key=held.__getitem__)
            os.kill(victim, signal.SIGKILL)
            await eventually(lambda: _new_worker(manager, port, workers), timeout=20)
            closed = await asyncio.gather(*(_closed(ws) for ws in sockets))
            lost = [i for i, gone in enumerate(closed) if gone]
            assert len(lost) == held[victim]
            for i in lost:
                again = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/p{i}")
                ready = await receive(again)
                assert ready["resumed"] and [h["text"] for h in ready["history"]][:2] == [
                    f"hello {i}",
                    f"You said: hello {i}",
                ]
                await again.close()
            for ws in sockets:
                await ws.close()
    finally:
        if manager.returncode is None:
            manager.terminate()
        await manager.wait()


async def _closed(ws: Any) -> bool:
    """Whether the socket was closed (its frames still buffered read first); False when it is quiet and open."""
    try:
        while (await ws.receive(timeout=1)).type is WSMsgType.TEXT:
            pass
    except TimeoutError:
        return False
    return True


async def _new_worker(manager: asyncio.subprocess.Process, port: int, old: set[int]) -> int | None:
    """A worker started since `old` were, once it listens."""
    fresh = {pid for pid in children(manager.pid) - old if sockets_on(pid, port, "0A")}
    return next(iter(fresh), None)


async def test_sigterm_to_the_manager_drains_every_process_finishing_their_answers(db, redis, fake_llm, settings):
    answer = " ".join(f"word{i}" for i in range(30))
    manager, port = await start_server(settings, SHUTDOWN_DRAIN_S="10", **TWO)
    try:
        workers = await serving_workers(manager, port)
        async with aiohttp.ClientSession() as http:
            sockets = [await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/d{i}") for i in range(12)]
            assert all(sockets_on(pid, port, "01") for pid in workers)  # both processes hold some
            fake_llm.script(*[fake.slow(0.05, text=answer)] * len(sockets))
            for i, ws in enumerate(sockets):
                await receive(ws)
                await _ask(ws, "tell me", f"m{i}")
            for ws in sockets:
                await receive_until(ws, "response.delta")
            manager.send_signal(signal.SIGTERM)
            for ws in sockets:
                events = []
                while (msg := await ws.receive(timeout=15)).type is WSMsgType.TEXT:
                    events.append(orjson.loads(msg.data))
                done = next(e for e in events if e["type"] == "response.done")
                assert (done["status"], done["text"]) == ("completed", answer)
                assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
                assert any(e["type"] == "message.stored" and e["role"] == "assistant" for e in events)
        async with asyncio.timeout(30):
            assert await manager.wait() == 0
    finally:
        if manager.returncode is None:
            manager.kill()
            await manager.wait()
    rows = await db.fetch("select content from session_events where event_type = 'ai_message'")
    assert [r["content"] for r in rows] == [answer] * 12


async def test_a_second_sigterm_stops_every_process_at_once_keeping_the_partial_answers(
    db, redis, fake_llm, settings, tmp_path
):
    answer = " ".join(f"word{i}" for i in range(200))
    spool = str(tmp_path / "spool")
    manager, port = await start_server(settings, SHUTDOWN_DRAIN_S="30", SPOOL_DIR=spool, **TWO)
    try:
        workers = await serving_workers(manager, port)
        async with aiohttp.ClientSession() as http:
            sockets = [await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/f{i}") for i in range(12)]
            assert all(sockets_on(pid, port, "01") for pid in workers)
            fake_llm.script(*[fake.slow(0.05, text=answer)] * len(sockets))
            for i, ws in enumerate(sockets):
                await receive(ws)
                await _ask(ws, "tell me", f"m{i}")
            for ws in sockets:
                await receive_until(ws, "response.delta")
            manager.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            stopped_at = asyncio.get_running_loop().time()
            manager.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await manager.wait() == 0
            # Well before the answers' 10 s or the 30 s drain.
            assert asyncio.get_running_loop().time() - stopped_at < 5
    finally:
        if manager.returncode is None:
            manager.kill()
            await manager.wait()

    # A forced stop does not wait for the database: what it had no time to write is in the processes' spools,
    # and the next start writes it.
    manager, _ = await start_server(settings, SPOOL_DIR=spool, **TWO)
    try:

        async def all_stored() -> list[Any]:
            rows = await db.fetch("select content, metadata from session_events where event_type = 'ai_message'")
            return rows if len(rows) >= 12 else []

        rows = await eventually(all_stored, timeout=15)
    finally:
        manager.terminate()
        await manager.wait()
    assert len(rows) == 12
    for row in rows:
        assert orjson.loads(row["metadata"])["status"] == "interrupted"
        assert answer.startswith(row["content"]) and row["content"] != answer


def _segments(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix in (".jsonl", ".partial")]


async def test_every_process_spools_on_its_own_and_their_replacements_replay_it(
    db, redis, fake_llm, settings, postgres_control, tmp_path
):
    spool = tmp_path / "machine-spool"
    # Left by a process of an earlier run, in a slot nobody takes again (it ran more processes).
    orphan = spool / "proc-7"
    orphan.mkdir(parents=True)
    event = {
        "session_id": "orphan",
        "event_type": "user_message",
        "content": "left behind",
        "event_key": "k-orphan",
        "created_at": "2026-12-02T04:00:00+00:00",
        "client_msg_id": "o1",
        "metadata": {},
    }
    await db.execute("insert into sessions (session_id, start_time) values ('orphan', now())")
    (orphan / "00000000000000000001-1-abcd.jsonl").write_bytes(orjson.dumps(event) + b"\n")

    manager, port = await start_server(settings, SPOOL_DIR=str(spool), SPOOL_AFTER_S="0.5", **TWO)
    try:
        workers = await serving_workers(manager, port)
        assert await eventually(lambda: db.fetchval("select count(*) from session_events where session_id = 'orphan'"))
        # The file goes once its events are committed: just after they show.
        await eventually(lambda: asyncio.to_thread(lambda: not _segments(spool)), timeout=10)
        async with aiohttp.ClientSession() as http:
            sockets = [await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/sp{i}") for i in range(12)]
            assert all(sockets_on(pid, port, "01") for pid in workers)
            for ws in sockets:
                await receive(ws)
            await postgres_control.stop()
            for i, ws in enumerate(sockets):
                await _ask(ws, f"while the database is away {i}", f"m{i}")
            for ws in sockets:
                await receive_until(ws, "response.done", timeout=10)

            # Both processes spool, each in a slot of its own; then both die before the database is back.
            async def both_spooled() -> bool:
                whole = [p for p in _segments(spool) if p.suffix == ".jsonl"]
                kinds = [orjson.loads(line)["event_type"] for p in whole for line in p.read_bytes().splitlines()]
                slots = {p.parent for p in _segments(spool)}
                return len(slots) == 2 and kinds.count("user_message") == kinds.count("ai_message") == len(sockets)

            await eventually(both_spooled, timeout=15)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            await postgres_control.start()
            await eventually(lambda: _new_worker(manager, port, workers), timeout=20)

            # Their replacements took the slots and replayed everything, in order.
            pg = await asyncpg.connect(settings.database_url)  # the test's own connection died with the outage

            async def all_stored() -> bool:
                count = await pg.fetchval(
                    "select count(*) from session_events where event_type = 'user_message' and session_id like 'sp%'"
                )
                return bool(count == len(sockets))

            await eventually(all_stored, timeout=30)
            await eventually(lambda: asyncio.to_thread(lambda: not _segments(spool)), timeout=10)
            for ws in sockets:
                await ws.close()
    finally:
        if manager.returncode is None:
            manager.terminate()
        await manager.wait()
    for i in range(12):
        rows = await pg.fetch(
            "select event_type, content from session_events where session_id = $1"
            " and event_type in ('user_message', 'ai_message') order by id",
            f"sp{i}",
        )
        assert [r["event_type"] for r in rows] == ["user_message", "ai_message"]
    await pg.close()
