"""Which sessions this process holds, as expiring Redis keys, so the sweeper can tell live sessions from orphans."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from contextlib import suppress
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from .jobs import held_key

log = logging.getLogger(__name__)


class Presence:
    """Keeps `rt:held:{session_id}` alive in Redis for every session this process holds.

    One refresh loop renews all keys in a single pipeline every third of the TTL. If this process
    dies, its keys expire within the TTL, and the worker's sweeper may then end its sessions.
    Redis being down only delays that: the keys come back with the next refresh.
    """

    def __init__(self, redis: ArqRedis, *, ttl_s: float) -> None:
        self._redis = redis
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._held: set[str] = set()
        self.server_id = secrets.token_hex(6)
        self._tasks: set[asyncio.Task[None]] = set()

    def hold(self, session_id: str) -> None:
        self._held.add(session_id)
        self._spawn(self._set([session_id]))

    def release(self, session_id: str) -> None:
        self._held.discard(session_id)
        self._spawn(self._delete(session_id))

    async def run(self) -> None:
        """The refresh loop; runs until cancelled."""
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            if self._held:
                await self._set(list(self._held))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _set(self, session_ids: list[str]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in session_ids:
                    pipe.set(held_key(session_id), self.server_id, px=self._ttl_ms)
                await pipe.execute()
        except (RedisError, OSError) as e:
            log.warning(
                "could not renew session holds", extra={"fields": {"sessions": len(session_ids), "error": str(e)}}
            )

    async def _delete(self, session_id: str) -> None:
        # When Redis is away the key simply expires.
        with suppress(RedisError, OSError):
            await self._redis.delete(held_key(session_id))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
