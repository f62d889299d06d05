"""Following, on this server, the answers another server generates for a session: their events reach this
server's connections (the writer and the watchers) from the session's Redis stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from core import livestream as ls

from .. import protocol
from .broker import Broker
from .session import Session

log = logging.getLogger(__name__)

_BLOCK_MS = 1000


class Follower:
    """One per followed session on this process. While an answer runs elsewhere it is the conversation's
    `remote` answer: connections here join it as they join a local one, their messages wait behind it, their
    cancel reaches the server that generates it. `reload` brings the conversation's context up to date once the
    other server has stored its answer."""

    def __init__(self, broker: Broker, session: Session, *, reload: Callable[[Session], Awaitable[None]]) -> None:
        self._broker = broker
        self._session = session
        self._reload = reload
        self._last = "0-0"
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read where the session stands (awaited before `session.ready` is built), then follow in the background."""
        conversation, sid = self._session.conversation, self._session.id
        try:
            info = await self._broker.running(sid)
            if info is not None:
                entries = await self._broker.entries(sid)
                conversation.running.remote = ls.read_answer((e for _, e in entries), info["rid"])
                if conversation.running.remote.stored is not None:
                    conversation.running.remote = None
                self._last = entries[-1][0] if entries else "0-0"
            elif self.needed():
                self._last = await self._broker.last_id(sid)
        except (RedisError, OSError) as e:
            self._broker.failed(e)
            return
        if not self.needed():
            # Nothing runs elsewhere and nobody here watches: the writer here generates what comes next.
            return
        self.task = asyncio.create_task(self._follow(), name=f"follow:{sid}")

    def needed(self) -> bool:
        session = self._session
        return session.conversation.running.remote is not None or session.watchers > 0

    async def _follow(self) -> None:
        session = self._session
        try:
            while self.needed() and (session.users > 0 or session.watchers > 0):
                try:
                    rows = await self._broker.read(session.id, self._last, block_ms=_BLOCK_MS)
                except (RedisError, OSError) as e:
                    self._broker.failed(e)
                    await asyncio.sleep(1.0)
                    continue
                for entry_id, entry in rows:
                    self._last = entry_id
                    await self._apply(entry)
        finally:
            if session.follower is self:
                session.follower = None

    async def _apply(self, entry: dict[str, str]) -> None:
        conversation, kind = self._session.conversation, entry.get("k")
        audience, mine = conversation.audience, entry.get("server") == self._broker.server_id
        remote = conversation.running.remote
        if kind == ls.STARTED and not mine and conversation.running.local is None:
            conversation.running.remote = ls.AnswerSoFar(entry["rid"], entry.get("cmid") or None)
            audience.put(protocol.response_started(entry["rid"], entry.get("cmid") or None))
        elif kind == ls.MESSAGE and not mine:
            audience.put_watchers(
                protocol.user_message_stored(int(entry["id"]), entry.get("cmid") or None, entry["text"])
            )
        elif remote is None or entry.get("rid") != remote.response_id:
            return
        elif kind == ls.DELTA:
            remote.add(entry)
            audience.put(protocol.response_delta(remote.response_id, entry["text"], remote.seq))
        elif kind == ls.DONE:
            remote.add(entry)
            audience.put(
                protocol.response_done(
                    remote.response_id,
                    status=entry["status"],
                    text=entry["text"],
                    error_code=entry.get("error_code") or None,
                    error_message=entry.get("error_message", ""),
                )
            )
        elif kind == ls.STORED:
            audience.put(
                protocol.answer_stored(int(entry["id"]), remote.response_id, text=entry["text"], status=entry["status"])
            )
            await self._reload(self._session)
            conversation.remote_finished()
