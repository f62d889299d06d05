"""Churn: hundreds of sessions connecting, chatting and leaving at once, then summarised by the real worker."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

from core.jobs import held_key, summary_job_id
from tests.conftest import eventually, receive, receive_until

SEED = 20241126
SESSIONS = 280
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "hum"]


@dataclass
class Visit:
    """One session as its client saw it: the messages it got accepted, in order, and the answers it saw end."""

    session_id: str
    rng: random.Random
    sent: list[tuple[str, str | None]] = field(default_factory=list)
    # Per accepted message: the answer's full text, or None when the client left while it streamed.
    answers: list[str | None] = field(default_factory=list)
    # client_msg_id -> the id its acknowledgement named.
    acked: dict[str, int] = field(default_factory=dict)
    user_acks: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    history_seen: list[list[tuple[str, str]]] = field(default_factory=list)

    def text(self, words: int) -> str:
        return f"{self.session_id}/{len(self.sent)}: " + " ".join(self.rng.choice(WORDS) for _ in range(words))

    def client_msg_id(self) -> str | None:
        return f"{self.session_id}-m{len(self.sent)}" if self.rng.random() < 0.6 else None


class Client:
    """One socket of a visit: sends frames and reads what comes back, keeping the acknowledgements."""

    def __init__(self, visit: Visit, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.visit = visit
        self.ws = ws
        self.owed_user_acks = 0
        self.user_acks = 0
        self.answer_acks: set[str] = set()

    async def next(self) -> dict[str, Any]:
        event = await receive(self.ws, timeout=30)
        assert event["type"] in ("response.started", "response.delta", "response.done", "message.stored"), event
        if event["type"] == "message.stored" and event["role"] == "user":
            self.user_acks += 1
            self.visit.user_acks.append(event)
            if event["client_msg_id"] is not None:
                # Every acknowledgement of one client_msg_id names the same row.
                assert self.visit.acked.setdefault(event["client_msg_id"], event["id"]) == event["id"], event
        elif event["type"] == "message.stored":
            self.answer_acks.add(event["response_id"])
        return event

    async def send_message(self, text: str, client_msg_id: str | None) -> None:
        frame: dict[str, Any] = {"type": "message", "text": text}
        if client_msg_id is not None:
            frame["client_msg_id"] = client_msg_id
        self.owed_user_acks += 1
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def ask(self, words: int = 4, *, retries: int = 0) -> None:
        """Send a message (and `retries` copies of it at once), read its whole answer and the acknowledgements."""
        visit = self.visit
        text, client_msg_id = visit.text(words), visit.client_msg_id()
        if retries and client_msg_id is None:
            client_msg_id = f"{visit.session_id}-m{len(visit.sent)}"
        for _ in range(1 + retries):
            await self.send_message(text, client_msg_id)
        visit.sent.append((text, client_msg_id))
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "response.done":
            events.append(await self.next())
        [started, *deltas, done] = [e for e in events if e["type"].startswith("response.")]
        assert started["client_msg_id"] == client_msg_id
        assert done["status"] == "completed"
        assert done["text"] == "".join(d["delta"] for d in deltas) == f"You said: {text}"
        visit.answers.append(done["text"])
        while self.user_acks < self.owed_user_acks or done["response_id"] not in self.answer_acks:
            await self.next()

    async def retry(self, client_msg_id: str) -> None:
        """Send an accepted client_msg_id again: acknowledged with the same row, not answered again."""
        await self.send_message("a retry", client_msg_id)
        while self.user_acks < self.owed_user_acks:
            await self.next()

    async def leave_mid_answer(self, *, abruptly: bool) -> None:
        """Ask for a long answer and go away after its first piece: with a close frame, or by dropping the TCP
        connection without one."""
        visit = self.visit
        text, client_msg_id = visit.text(40), visit.client_msg_id()
        await self.send_message(text, client_msg_id)
        visit.sent.append((text, client_msg_id))
        visit.answers.append(None)
        while (await self.next())["type"] != "response.delta":
            pass
        if abruptly:
            self.ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        await self.ws.close()


async def connect(http: aiohttp.ClientSession, base: str, visit: Visit) -> Client:
    ws = await http.ws_connect(f"{base}/ws/session/{visit.session_id}")
    ready = await receive(ws)
    assert ready["type"] == "session.ready"
    assert ready["resumed"] is (visit.connections > 0)
    visit.connections += 1
    visit.history_seen.append([(m["role"], m["text"]) for m in ready["history"]])
    return Client(visit, ws)


# What the clients do: each plan is one way of using a session.


async def chat(http: aiohttp.ClientSession, base: str, visit: Visit) -> None:
    client = await connect(http, base, visit)
    for _ in range(visit.rng.randint(2, 3)):
        await client.ask()
    await client.ws.close()


async def chat_with_retries(http: aiohttp.ClientSession, base: str, visit: Visit) -> None:
    client = await connect(http, base, visit)
    await client.ask(retries=1)  # the same frame twice at once: one answer, two acknowledgements
    _, client_msg_id = visit.sent[-1]
    assert client_msg_id is not None
    await client.retry(client_msg_id)
    await client.ask()
    await client.ws.close()


async def vanish_mid_answer(http: aiohttp.ClientSession, base: str, visit: Visit) -> None:
    client = await connect(http, base, visit)
    for _ in range(visit.rng.randint(1, 2)):
        await client.ask()
    await client.leave_mid_answer(abruptly=True)


async def close_mid_answer(http: aiohttp.ClientSession, base: str, visit: Visit) -> None:
    client = await connect(http, base, visit)
    await client.ask()
    await client.leave_mid_answer(abruptly=False)


async def reconnect(http: aiohttp.ClientSession, base: str, visit: Visit) -> None:
    client = await connect(http, base, visit)
    for _ in range(visit.rng.randint(1, 2)):
        await client.ask()
    await client.ws.close()

    client = await connect(http, base, visit)
    assert visit.history_seen[-1] == expected_history(visit)
    if retried := [cmid for _, cmid in visit.sent if cmid is not None]:
        await client.retry(retried[0])
    await client.ask()
    await client.ws.close()


async def vanish_and_return(http: aiohttp.ClientSession, base: str, visit: Visit) -> None:
    client = await connect(http, base, visit)
    await client.ask()
    await client.leave_mid_answer(abruptly=True)

    # The partial answer is in the history, cut where the server noticed the client was gone.
    client = await connect(http, base, visit)
    history = visit.history_seen[-1]
    assert history[:-1] == expected_history(visit)[:-1]
    role, partial = history[-1]
    assert role == "assistant" and f"You said: {visit.sent[-1][0]}".startswith(partial)
    await client.ask()
    await client.ws.close()


async def take_over(http: aiohttp.ClientSession, base: str, visit: Visit) -> None:
    first = await connect(http, base, visit)
    await first.ask()
    second = await connect(http, base, visit)
    assert visit.history_seen[-1] == expected_history(visit)
    msg = await first.ws.receive(timeout=10)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4000)
    await first.ws.close()
    await second.ask()
    await second.ws.close()


PLANS: list[Callable[[aiohttp.ClientSession, str, Visit], Awaitable[None]]] = [
    chat,
    chat_with_retries,
    vanish_mid_answer,
    close_mid_answer,
    reconnect,
    vanish_and_return,
    take_over,
]


def expected_history(visit: Visit) -> list[tuple[str, str]]:
    history = []
    for (text, _), answer in zip(visit.sent, visit.answers, strict=True):
        history += [("user", text), ("assistant", answer or "")]
    return history


# What the database must hold.


def check_session(visit: Visit, rows: list[Any], session: Any) -> None:
    where = f"{visit.session_id} ({PLANS[int(visit.session_id[-3:]) % len(PLANS)].__name__})"
    kinds = [r["event_type"] for r in rows]
    connections = [k for k in kinds if k in ("connected", "disconnected")]
    assert connections == ["connected", "disconnected"] * visit.connections, where
    assert kinds[0] == "connected" and kinds[-1] == "disconnected", where

    # Every accepted message once, in the order sent; retries added nothing.
    users = [r for r in rows if r["event_type"] == "user_message"]
    assert [(r["content"], r["client_msg_id"]) for r in users] == visit.sent, where
    by_id = {r["id"]: r for r in users}
    for ack in visit.user_acks:
        assert by_id[ack["id"]]["client_msg_id"] == ack["client_msg_id"], where

    # Every message is followed by its answer: whole, or cut where the client left.
    answers = [r for r in rows if r["event_type"] == "ai_message"]
    assert len(answers) == len(users), where
    for user, answer, (text, _), seen in zip(users, answers, visit.sent, visit.answers, strict=True):
        assert answer["id"] > user["id"], where
        if seen is None:
            assert f"You said: {text}".startswith(answer["content"]), where
        else:
            assert answer["content"] == seen, where

    assert session["end_time"] is not None, where
    assert session["summary"], where
    # As of the last message: connections coming and going change nothing to summarise.
    messages = [r for r in rows if r["event_type"] in ("user_message", "ai_message")]
    assert session["summarized_through"] == messages[-1]["id"], where


async def test_hundreds_of_sessions_churning_at_once_are_stored_exactly_once_in_order_and_all_summarised(
    client, db, redis, fake_llm, run_worker
):
    rng = random.Random(SEED)
    fake_llm.token_delay = 0.01  # answers take a moment, so clients can leave while one streams
    visits = [Visit(f"churn-{n:03d}", random.Random(rng.random())) for n in range(SESSIONS)]
    base = str(client.make_url("")).rstrip("/")
    # A connector without a connection limit: every session is open at once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(PLANS[n % len(PLANS)](http, base, visit) for n, visit in enumerate(visits)))
    fake_llm.token_delay = 0

    # Each session ends once its last connection has gone, and asks for its summary as of its last event.
    async def all_ended_and_queued() -> bool:
        if await db.fetchval("select count(*) from sessions where end_time is null"):
            return False
        last = await db.fetch(
            "select s.session_id, s.start_time, max(e.id) as last_id from sessions s"
            " join session_events e using (session_id)"
            " where e.event_type in ('user_message', 'ai_message') group by s.session_id"
        )
        queued = {m.decode() for m in await redis.zrange("arq:queue", 0, -1)}
        return len(last) == SESSIONS and all(
            summary_job_id(r["session_id"], start_time=r["start_time"], last_message_id=r["last_id"]) in queued
            for r in last
        )

    await eventually(all_ended_and_queued, timeout=20)
    await run_worker()

    sessions = {r["session_id"]: r for r in await db.fetch("select * from sessions")}
    assert len(sessions) == SESSIONS
    rows: dict[str, list[Any]] = {visit.session_id: [] for visit in visits}
    for row in await db.fetch("select * from session_events order by id"):
        rows[row["session_id"]].append(row)
    for visit in visits:
        check_session(visit, rows[visit.session_id], sessions[visit.session_id])


async def test_a_reconnect_while_the_session_is_being_ended_can_still_be_taken_over(client, db, redis):
    first = await client.ws_connect("/ws/session/s1")
    await receive(first)
    await first.send_str("hello")
    await receive_until(first, "response.done")
    await eventually(lambda: db.fetchval("select count(*) from session_events where event_type = 'ai_message'"))

    # The session row is held, so recording the end waits: that is when the client comes back.
    await db.execute("begin")
    await db.execute("select 1 from sessions where session_id = 's1' for no key update")
    await first.close()

    async def end_waiting() -> Any:
        # Someone waits for the row lock held here: by now that can only be the end being recorded. (Not by the
        # query text in pg_stat_activity: after a pool connection's reset it can lag behind the statement.)
        return await db.fetchval("select count(*) from pg_locks where not granted and locktype = 'transactionid'")

    await eventually(end_waiting)
    second_connecting = asyncio.create_task(client.ws_connect("/ws/session/s1"))
    await asyncio.sleep(0.5)  # time for the reconnect to reach the server and wait for the session
    await db.execute("commit")
    second = await second_connecting
    assert (await receive(second))["resumed"] is True

    # A newer connection takes the session over, as always.
    third = await client.ws_connect("/ws/session/s1")
    assert (await receive(third))["type"] == "session.ready"
    try:
        msg: Any = await second.receive(timeout=2)
    except TimeoutError:
        msg = None
    assert msg is not None and (msg.type, msg.data) == (WSMsgType.CLOSE, 4000), f"the older socket got {msg}"

    # Once everyone has left, no server holds the session any more.
    await third.close()

    async def let_go() -> bool:
        return not await redis.exists(held_key("s1"))

    await eventually(let_go)
