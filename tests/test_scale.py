"""Many machines behind a load balancer: three real server processes behind a real HAProxy (deploy/haproxy.cfg),
sharing one Redis and one PostgreSQL. Connections spread over the servers; a server killed mid-answer leaves its
clients to reconnect through the load balancer to another one and resume; a rolling restart loses no message."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from aiohttp import WSMsgType

from core.settings import Settings
from tests.conftest import eventually, free_port, receive, receive_until
from tests.fakes.openai_server import FakeOpenAI
from tests.lb import Fleet, haproxy_binary, served_by
from tests.test_worker import start_worker_process

# Short leases and waits, so that a killed server's sessions move within a second or two.
FLEET_ENV = {
    "TAKEOVER_WAIT_S": "1",
    "PRESENCE_TTL_S": "3",
    "ANSWER_LEASE_S": "1",
    "SHUTDOWN_DRAIN_S": "5",
    "SHUTDOWN_FLUSH_S": "3",
    "MESSAGES_PER_MINUTE": "10000",
    "USER_MESSAGES_PER_MINUTE": "10000",
    "LOG_LEVEL": "WARNING",
}


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    """The model, for this module's servers alone: every answer is "You said: <the message>", a word every 20 ms."""
    fake = FakeOpenAI()
    await fake.start()
    fake.token_delay = 0.02
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture(scope="module")
def fleet_settings(_migrated: str, redis_url: str, fake: FakeOpenAI) -> Settings:
    return Settings(
        database_url=_migrated,
        redis_url=redis_url,
        openai_base_url=fake.base_url,
        openai_api_key="test-key",
        on_disconnect="continue",
        worker_metrics_port=0,
    )


@pytest_asyncio.fixture(scope="module")
async def fleet(fleet_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    binary = haproxy_binary()
    ports = {f"s{i}": free_port() for i in (1, 2, 3)}
    fleet = Fleet(fleet_settings, FLEET_ENV, tmp_path_factory.mktemp("fleet"), ports)
    try:
        await asyncio.gather(*(fleet.start(name) for name in ports))
        await fleet.start_lb(binary)
        yield fleet
    finally:
        await fleet.close()


@pytest_asyncio.fixture(scope="module")
async def recovery_worker(fleet_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[None]:
    """The summary worker, which also stores the answers of a server that died."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = await start_worker_process(fleet_settings, log, **FLEET_ENV)
    try:
        yield
    finally:
        worker.terminate()
        await worker.wait()


@pytest_asyncio.fixture
async def pg(_migrated: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(_migrated)
    try:
        yield conn
    finally:
        await conn.close()


async def _send(ws: Any, text: str, client_msg_id: str) -> None:
    await ws.send_str(orjson.dumps({"type": "message", "text": text, "client_msg_id": client_msg_id}).decode())


async def _stored(pg: asyncpg.Connection, session_id: str) -> list[tuple[str, str | None, str, str | None]]:
    rows = await pg.fetch(
        "select event_type, client_msg_id, content, metadata from session_events where session_id = $1"
        " and event_type in ('user_message', 'ai_message') order by id",
        session_id,
    )
    return [
        (
            r["event_type"],
            r["client_msg_id"],
            r["content"],
            orjson.loads(r["metadata"]).get("status") if r["event_type"] == "ai_message" else None,
        )
        for r in rows
    ]


async def _answered(pg: asyncpg.Connection, session_id: str) -> list[Any] | None:
    rows = await _stored(pg, session_id)
    return rows if any(r[0] == "ai_message" for r in rows) else None


def _words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def test_connections_spread_over_every_server_and_each_one_answers(fleet):
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(f"{fleet.url}/ws/session/spread-{i}") for i in range(30)]
        where = Counter(served_by(ws) for ws in sockets)
        assert set(where) == set(fleet.ports), where
        assert min(where.values()) >= 5, where
        for i, ws in enumerate(sockets):
            assert (await receive(ws))["type"] == "session.ready"
            await _send(ws, f"hello {i}", f"m{i}")
        for i, ws in enumerate(sockets):
            done = (await receive_until(ws, "response.done", timeout=10))[-1]
            assert (done["status"], done["text"]) == ("completed", f"You said: hello {i}")
        await asyncio.gather(*(ws.close() for ws in sockets))


async def test_a_server_killed_mid_answer_leaves_its_clients_to_resume_on_another_through_the_load_balancer(
    fleet, recovery_worker, pg, fake
):
    rng = random.Random(16)
    question = _words(80, "w")
    answer = f"You said: {question}"
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(f"{fleet.url}/ws/session/kill-{i}") for i in range(9)]
        for i, ws in enumerate(sockets):
            await receive(ws)
            await _send(ws, question, f"k{i}")
        victim = served_by(sockets[0])
        held: dict[int, tuple[str, str, int]] = {}  # session -> (response id, text held, seq held)

        async def read_some(i: int, ws: Any, count: int) -> None:
            rid, text, seq = "", "", 0
            while count > 0:
                event = await receive(ws)
                if event["type"] == "response.started":
                    rid = event["response_id"]
                elif event["type"] == "response.delta":
                    text, seq, count = text + event["delta"], event["seq"], count - 1
            held[i] = (rid, text, seq)

        await asyncio.gather(*(read_some(i, ws, rng.randint(2, 15)) for i, ws in enumerate(sockets)))
        await fleet.kill(victim)
        try:
            for i, ws in enumerate(sockets):
                rid, text, seq = held[i]
                if served_by(ws) != victim:
                    # Untouched: the answer goes on to its end on its own server.
                    events = await receive_until(ws, "response.done", timeout=10)
                    got = text + "".join(e["delta"] for e in events if e["type"] == "response.delta")
                    assert (events[-1]["status"], got) == ("completed", answer)
                    continue
                while (msg := await ws.receive(timeout=10)).type is WSMsgType.TEXT:
                    event = orjson.loads(msg.data)
                    if event["type"] == "response.delta":
                        text, seq = text + event["delta"], event["seq"]
                # It reconnects through the load balancer, which hands it to a live server, and resumes there.
                again = await http.ws_connect(f"{fleet.url}/ws/session/kill-{i}?resume={rid}:{seq}")
                assert served_by(again) not in ("", victim)
                ready = await receive(again)
                if ready["active_response"] is not None:
                    done = (await receive_until(again, "response.done", timeout=15))[-1]
                    assert done["status"] == "interrupted"
                    # What was streamed before the kill is kept (at most the last ~100 ms may be missing).
                    assert answer.startswith(done["text"]) and len(text) - len(done["text"]) <= 40
                # Within 15 s the text streamed so far is stored, once, as `interrupted`.
                rows = await eventually(lambda i=i: _answered(pg, f"kill-{i}"), timeout=15)
                assert [r[3] for r in rows if r[0] == "ai_message"] == ["interrupted"], rows
                # And it goes on there: its next message is answered.
                await _send(again, "still there?", f"k{i}-2")
                done = (await receive_until(again, "response.done", timeout=10))[-1]
                assert (done["status"], done["text"]) == ("completed", "You said: still there?")
                await again.close()
            assert sum(served_by(ws) == victim for ws in sockets) >= 1
        finally:
            await fleet.start(victim)
            await asyncio.gather(*(ws.close() for ws in sockets))


@dataclass
class Chatter:
    """A client that chats without pause. Whenever its socket closes it reconnects through the load balancer with
    `after=` and resumes: a running answer it joins, a stored one it finds in `history`, a message that never
    reached the server it sends again (the same `client_msg_id`). A message a draining server refused
    (`shutting_down`: stored, not answered) it sends again as a new message once reconnected."""

    url: str
    session_id: str
    sent: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    servers: set[str] = field(default_factory=set)
    reconnects: int = 0
    last_id: int = 0
    _ready: dict[str, Any] = field(default_factory=dict)

    async def run(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        ws = await self._connect(http)
        text: str | None = None
        n = 0
        while not stop.is_set() or text is not None:
            if text is None:
                text, n = f"message {n} of {self.session_id} " + _words(10, "x"), n + 1
            cmid = f"{self.session_id}-{len(self.sent)}"
            self.sent.append(cmid)
            self.texts[cmid] = text
            ws, answered = await self._turn(http, ws, cmid, text)
            if answered:
                text = None
            else:
                self.refused.append(cmid)
        await ws.close()

    async def _connect(self, http: aiohttp.ClientSession) -> Any:
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                ws = await http.ws_connect(f"{self.url}/ws/session/{self.session_id}?after={self.last_id}")
                self.servers.add(served_by(ws))
                self._ready = await receive(ws, timeout=10)
                assert self._ready["type"] == "session.ready", self._ready
                return ws
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.session_id}: could not reconnect through the load balancer")

    async def _turn(self, http: aiohttp.ClientSession, ws: Any, cmid: str, text: str) -> tuple[Any, bool]:
        """Until `cmid` is answered (True) or refused (False), whatever closes meanwhile."""
        await _send(ws, text, cmid)
        rid, done, user_id, refused = "", False, 0, False
        while True:
            msg = await ws.receive(timeout=15)
            if msg.type is WSMsgType.TEXT:
                event = orjson.loads(msg.data)
                kind = event["type"]
                if kind == "message.stored":
                    self.last_id = max(self.last_id, event["id"])
                    if event["role"] == "user" and event.get("client_msg_id") == cmid:
                        user_id = event["id"]
                    elif event["role"] == "assistant" and done and event.get("response_id") == rid:
                        return ws, True
                elif kind == "response.started" and event.get("client_msg_id") == cmid:
                    rid = event["response_id"]
                elif kind == "response.done" and event["response_id"] == rid:
                    self.answers[cmid], done = event["text"], True
                elif kind == "error":
                    assert event["code"] == "shutting_down", event
                    refused = True
                continue
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
            # Closed (1001: its server is stopping): reconnect, and see where the message stands.
            self.reconnects += 1
            ws = await self._connect(http)
            history, active = self._ready["history"], self._ready["active_response"] or {}
            for item in history:
                self.last_id = max(self.last_id, item["id"])
            answer = next((h for h in history if h["role"] == "assistant" and h["id"] > user_id), None)
            if answer is not None:
                self.answers[cmid] = answer["text"]
                return ws, True
            if done:
                return ws, True  # answered and stored before: its message.stored was the last frame lost
            if active.get("client_msg_id") == cmid:
                rid = active["response_id"]  # still running elsewhere: joined, its events follow
                continue
            stored = user_id or any(h["role"] == "user" and h["text"] == text for h in history)
            if refused or stored:
                return ws, False
            await _send(ws, text, cmid)  # it never reached a server


async def test_a_rolling_restart_of_every_server_loses_no_message(fleet, pg):
    chatters = [Chatter(fleet.url, f"roll-{i}") for i in range(9)]
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        running = [asyncio.create_task(c.run(http, stop)) for c in chatters]
        try:
            await asyncio.sleep(1.0)
            for name in list(fleet.ports):
                # As an orchestrator rolls a deployment: stop one (it drains, then exits), start it again.
                assert await fleet.stop(name) == 0
                await fleet.start(name)
                await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*running), timeout=30)
        finally:
            stop.set()
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    assert sum(c.reconnects for c in chatters) >= 3  # every server had sessions to hand over
    for c in chatters:
        assert len(c.sent) >= 3, c.session_id
        rows = await eventually(lambda c=c: _complete(pg, c), timeout=15)
        # Every message sent is stored once, in order.
        assert [r[1] for r in rows if r[0] == "user_message"] == c.sent, c.session_id
        # Each is answered once, completely, right after it; but those a draining server refused, which the client
        # sent again as new messages (and those were answered).
        answered_after = {}
        for prev, row in itertools.pairwise(rows):
            if prev[0] == "user_message" and row[0] == "ai_message":
                answered_after[prev[1]] = (row[2], row[3])
        for cmid in c.sent:
            if cmid in c.refused:
                assert cmid not in answered_after, (c.session_id, cmid)
            else:
                assert answered_after[cmid] == (c.answers[cmid], "completed"), (c.session_id, cmid)
                assert c.answers[cmid] == f"You said: {c.texts[cmid]}"
        assert len({c.texts[cmid] for cmid in c.sent}) == len(c.sent) - len(c.refused)


async def _complete(pg: asyncpg.Connection, chatter: Chatter) -> list[Any] | None:
    rows = await _stored(pg, chatter.session_id)
    answered = sum(r[0] == "ai_message" for r in rows)
    return rows if answered >= len(chatter.sent) - len(chatter.refused) else None
