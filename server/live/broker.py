"""Carrying a session's live events between server processes through Redis Streams (layout: core/livestream.py).

The generating server publishes, coalesced and in the background: the answer's path never waits on Redis. When
Redis is away nothing is published (and the first failure of an outage is logged): answers still stream to the
connections of their own server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from core import livestream as ls
from core.flag import Flag

from ..protocol import compact
from .answer import Answer

log = logging.getLogger(__name__)

# At most one stream write per this long while an answer streams (plus one per other event).
COALESCE_S = 0.05
_ERRORS = (RedisError, OSError)
# At shutdown, how long a round trip already under way may take before it is cut.
_CLOSE_WAIT_S = 2.0
# How often a session's stream has its expiry (STREAM_TTL_MS, minutes) pushed back while entries are added.
_EXPIRY_EVERY_S = 10.0


class Broker:
    """This process's side of the shared streams."""

    def __init__(
        self, redis: ArqRedis, *, server_id: str, lease_s: float, on_failure: Callable[[], None] = lambda: None
    ) -> None:
        self._on_failure = on_failure
        # Publishers with something to write, and those whose answer streams (their lease is renewed).
        self._due: set[Publisher] = set()
        self._answering: set[Publisher] = set()
        self._wake = Flag()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.redis = redis
        self.server_id = server_id
        self.lease_s = lease_s
        self._down = False

    def publisher(self, session_id: str) -> Publisher:
        return Publisher(self, session_id)

    async def running(self, session_id: str) -> dict[str, Any] | None:
        """The answer another server is generating for the session now, if any."""
        try:
            raw = await self.redis.get(ls.answer_key(session_id))
        except _ERRORS as e:
            self.failed(e)
            return None
        info: dict[str, Any] | None = None if raw is None else orjson.loads(raw)
        return None if info is None or info.get("server") == self.server_id else info

    async def entries(self, session_id: str, after: str = "-") -> list[tuple[str, dict[str, str]]]:
        rows = await self.redis.xrange(ls.events_key(session_id), min=after)
        return [(i.decode() if isinstance(i, bytes) else i, ls.text_of(f)) for i, f in rows]

    async def last_id(self, session_id: str) -> str:
        rows = await self.redis.xrevrange(ls.events_key(session_id), count=1)
        return "0-0" if not rows else (rows[0][0].decode() if isinstance(rows[0][0], bytes) else rows[0][0])

    async def read(self, session_id: str, last_id: str, *, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        reply = await self.redis.xread({ls.events_key(session_id): last_id}, block=block_ms, count=500)
        out: list[tuple[str, dict[str, str]]] = []
        for _, rows in reply or []:
            out += [(i.decode() if isinstance(i, bytes) else i, ls.text_of(f)) for i, f in rows]
        return out

    async def cancel(self, session_id: str, response_id: str) -> None:
        try:
            await self.redis.publish(ls.CANCEL_CHANNEL, ls.answer_member(session_id, response_id))
        except _ERRORS as e:
            self.failed(e)

    async def close(self) -> None:
        """Shutdown: write what every publisher still holds, now, so a stopped server leaves no answer "running"."""
        task, self._closing = self._task, True
        if task is not None:
            # A round trip under way finishes (its entries are already taken off the publishers).
            self._wake.set()
            done, _ = await asyncio.wait((task,), timeout=_CLOSE_WAIT_S)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._flush(everyone=True)

    # The writer: one task and one pipeline per coalescing window for every session of the process. (One per
    # session cost a round trip per 50 ms per streaming session: a third of the CPU of 100 paced answers.)

    def due(self, publisher: Publisher) -> None:
        self._due.add(publisher)
        self._wake.set()
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._run(), name="publish")

    async def _run(self) -> None:
        while (self._due or self._answering) and not self._closing:
            try:
                async with asyncio.timeout(self.lease_s / 3):
                    await self._wake.wait()
            except TimeoutError:
                pass  # Nothing new: the leases are renewed all the same.
            # Everything of the next ~50 ms goes in one round trip, the answers' starts included: the first tokens
            # of a burst of answers go out before any of this work.
            if not self._closing:
                await asyncio.sleep(COALESCE_S)
            self._wake.clear()
            await self._flush()
        self._task = None

    async def _flush(self, *, everyone: bool = False) -> None:
        now = time.monotonic()
        renew = [p for p in self._answering if everyone or now - p.renewed > self.lease_s / 3]
        batch, self._due = {*self._due, *renew}, set()
        if not batch:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for publisher in batch:
                    publisher.write(pipe, now)
                await pipe.execute()
        except _ERRORS as e:
            self.failed(e)
            return
        self.ok()

    def failed(self, error: Exception) -> None:
        self._on_failure()
        if not self._down:
            self._down = True
            log.warning("live events not shared through Redis", extra={"fields": {"error": str(error)}})

    def ok(self) -> None:
        if self._down:
            self._down = False
            log.info("live events shared through Redis again", extra={"fields": {}})


class Publisher:
    """One session's publishing: entries queue here and the broker's writer takes them, coalescing deltas."""

    __slots__ = (
        "_answer",
        "_broker",
        "_dirty",
        "_expiry_set",
        "_info",
        "_pending",
        "_sent_seq",
        "_session_id",
        "renewed",
    )

    def __init__(self, broker: Broker, session_id: str) -> None:
        self._broker = broker
        self._session_id = session_id
        self._pending: list[dict[str, str]] = []
        self._answer: Answer | None = None
        self._info = b""
        self._sent_seq = 0
        self._dirty = False
        self.renewed = 0.0
        self._expiry_set = -math.inf

    # Called by the conversation; none of these waits.

    def started(self, answer: Answer, client_msg_id: str | None) -> None:
        self._answer, self._sent_seq, self.renewed = answer, 0, 0.0
        info = {"rid": answer.response_id, "cmid": client_msg_id, "server": self._broker.server_id}
        self._info = compact(orjson.dumps(info))
        self._broker._answering.add(self)
        self._add(
            {"k": ls.STARTED, "rid": answer.response_id, "cmid": client_msg_id or "", "server": self._broker.server_id}
        )

    def delta(self) -> None:
        """The hot path: a flag, and a wake-up once per coalescing window."""
        if not self._dirty:
            self._dirty = True
            self._broker.due(self)

    def done(self, *, status: str, text: str, error_code: str | None, error_message: str) -> None:
        rid = "" if self._answer is None else self._answer.response_id
        entry = {"k": ls.DONE, "rid": rid, "status": status, "text": text}
        self._add({**entry, "error_code": error_code or "", "error_message": error_message})

    def stored_answer(self, event_id: int, response_id: str, *, text: str, status: str) -> None:
        self._add({"k": ls.STORED, "rid": response_id, "id": str(event_id), "text": text, "status": status})

    def stored_message(self, event_id: int, client_msg_id: str | None, text: str) -> None:
        self._add(
            {
                "k": ls.MESSAGE,
                "id": str(event_id),
                "cmid": client_msg_id or "",
                "text": text,
                "server": self._broker.server_id,
            }
        )

    def _add(self, entry: dict[str, str]) -> None:
        self._pending.append(entry)
        self._broker.due(self)

    def write(self, pipe: Any, now: float) -> None:
        """Queue this session's entries (and the lease of its answer) on the broker's pipeline."""
        broker, sid = self._broker, self._session_id
        entries, self._pending = self._pending, []
        out: list[dict[str, str]] = []
        ending = False
        for entry in entries:
            if entry["k"] == ls.DONE:
                out += self._coalesced()
                ending = True
            out.append(entry)
        out += self._coalesced()
        answer = self._answer
        if ending:
            self._answer = None
            broker._answering.discard(self)
        key = ls.events_key(sid)
        for entry in out:
            pipe.xadd(key, entry, maxlen=ls.STREAM_MAXLEN, approximate=True)
        if out and now - self._expiry_set > _EXPIRY_EVERY_S:
            # The stream's expiry is minutes away: pushing it back once in a while is enough.
            self._expiry_set = now
            pipe.pexpire(key, ls.STREAM_TTL_MS)
        member = None if answer is None else ls.answer_member(sid, answer.response_id)
        if ending and member is not None:
            pipe.delete(ls.answer_key(sid))
            pipe.zrem(ls.ANSWERS_KEY, member)
        elif member is not None and now - self.renewed > broker.lease_s / 3:
            self.renewed = now
            pipe.set(ls.answer_key(sid), self._info, px=int(broker.lease_s * 1000))
            pipe.zadd(ls.ANSWERS_KEY, {member: time.time() + broker.lease_s})

    def _coalesced(self) -> list[dict[str, str]]:
        self._dirty = False
        answer = self._answer
        if answer is None or len(answer.parts) <= self._sent_seq:
            return []
        seq = len(answer.parts)
        pieces = answer.parts[self._sent_seq : seq]
        self._sent_seq = seq
        lens = ",".join(str(len(p)) for p in pieces)
        return [{"k": ls.DELTA, "rid": answer.response_id, "text": "".join(pieces), "seq": str(seq), "lens": lens}]
