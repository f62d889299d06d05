"""Which server holds each session: an expiring Redis lease per session, and takeover between server processes."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from contextlib import suppress

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from core.jobs import CONTEXT_CHANNEL, ContextSummary, held_key
from core.livestream import CANCEL_CHANNEL, split_member
from core.tasks import TaskSet

log = logging.getLogger(__name__)

RELEASE_CHANNEL = "rt:release"
_POLL_S = 0.05
# After Redis failed a claim, claims skip it this long: an unreachable Redis would otherwise cost every new
# connection its connect or read timeout. The renew loop takes the leases once Redis answers again.
_BREAKER_S = 5.0

# Set the lease when it is free or already ours; never overwrite another server's.
_RENEW = """
local current = redis.call('get', KEYS[1])
if current == false or current == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
    return 1
end
return 0
"""
# Delete the lease only while it is ours.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Presence:
    """Leases `rt:held:{session_id}` = this server's id for every session whose state this process holds.

    One loop renews all leases every third of the TTL; if the process dies they expire, and the worker's
    sweeper may end its sessions. A server that gets a connection for a session another server holds
    publishes a release request; the holder closes its socket with 4000, stores what it had, and lets the
    lease go, so the newcomer loads a complete history. Two servers never answer one session at once.
    When Redis is unreachable nobody can be asked, and each server serves what reaches it.
    """

    def __init__(self, redis: ArqRedis, *, ttl_s: float, takeover_wait_s: float) -> None:
        self._redis = redis
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._takeover_wait_s = takeover_wait_s
        self._held: set[str] = set()
        self.server_id = secrets.token_hex(6)
        self._tasks = TaskSet()
        self._on_release_request: Callable[[str], None] = lambda session_id: None
        self._on_cancel_request: Callable[[str, str], None] = lambda session_id, response_id: None
        self._on_context_summary: Callable[[ContextSummary], None] = lambda summary: None
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._skip_redis_until = 0.0

    def on_cancel_request(self, callback: Callable[[str, str], None]) -> None:
        """Called with (session id, response id) when a connection on another server cancels an answer."""
        self._on_cancel_request = callback

    def on_context_summary(self, callback: Callable[[ContextSummary], None]) -> None:
        """Called with each context summary the worker announces (for any session: the callee picks its own)."""
        self._on_context_summary = callback

    def on_release_request(self, callback: Callable[[str], None]) -> None:
        """Called with a session id when another server asks for a session this one holds."""
        self._on_release_request = callback

    async def claim(self, session_id: str) -> None:
        """Take the session's lease, asking its holder to let go first; after `takeover_wait_s` without an answer
        (a holder that hangs), take it anyway."""
        key = held_key(session_id)
        loop = asyncio.get_running_loop()
        if loop.time() < self._skip_redis_until:
            self._held.add(session_id)
            return
        deadline = loop.time() + self._takeover_wait_s
        asked = False
        try:
            while True:
                if await self._renew(keys=[key], args=[self.server_id, self._ttl_ms]):
                    break
                if not asked:
                    await self._redis.publish(RELEASE_CHANNEL, session_id)
                    asked = True
                if loop.time() >= deadline:
                    log.warning(
                        "took over a session its holder did not release", extra={"fields": {"session_id": session_id}}
                    )
                    await self._redis.set(key, self.server_id, px=self._ttl_ms)
                    break
                await asyncio.sleep(_POLL_S)
        except (RedisError, OSError) as e:
            self._skip_redis_until = loop.time() + _BREAKER_S
            log.warning(
                "could not claim the session lease; claims skip Redis for a while",
                extra={"fields": {"session_id": session_id, "error": str(e), "skip_s": _BREAKER_S}},
            )
        self._held.add(session_id)

    @property
    def redis_suspect(self) -> bool:
        """Redis failed a moment ago: calls on the connect path skip it for a while (see `_BREAKER_S`)."""
        return asyncio.get_running_loop().time() < self._skip_redis_until

    def suspect_redis(self) -> None:
        self._skip_redis_until = asyncio.get_running_loop().time() + _BREAKER_S

    def release(self, session_id: str) -> None:
        self._held.discard(session_id)
        self._tasks.spawn(self._let_go(session_id))

    async def run(self) -> None:
        """Renew the leases and answer release requests; runs until cancelled."""
        listener = asyncio.create_task(self._listen(), name="presence-listener")
        try:
            while True:
                await asyncio.sleep(self._ttl_ms / 3000)
                await self._renew_all()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def close(self) -> None:
        await self._tasks.cancel()

    async def _renew_all(self) -> None:
        held = list(self._held)
        if not held:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in held:
                    await self._renew(keys=[held_key(session_id)], args=[self.server_id, self._ttl_ms], client=pipe)
                results = await pipe.execute()
        except (RedisError, OSError) as e:
            log.warning("could not renew session leases", extra={"fields": {"sessions": len(held), "error": str(e)}})
            return
        self._skip_redis_until = 0.0
        for session_id, renewed in zip(held, results, strict=True):
            if not renewed and session_id in self._held:
                # Another server took it (after a hang of ours): it is theirs now, close ours.
                log.warning("lost a session lease", extra={"fields": {"session_id": session_id}})
                self._on_release_request(session_id)

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(RELEASE_CHANNEL, CANCEL_CHANNEL, CONTEXT_CHANNEL)
                    while True:
                        # A short wait, well inside the client's socket timeout: a quiet channel is not an error.
                        message = await pubsub.get_message(timeout=1.0)
                        if message is None or message.get("type") != "message":
                            continue
                        data, channel = message["data"], message.get("channel")
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        if channel in (CANCEL_CHANNEL, CANCEL_CHANNEL.encode()):
                            self._on_cancel_request(*split_member(text))
                        elif channel in (CONTEXT_CHANNEL, CONTEXT_CHANNEL.encode()):
                            self._context_summary(text)
                        elif text in self._held:
                            self._on_release_request(text)
            except (RedisError, OSError) as e:
                log.warning("release channel lost, resubscribing", extra={"fields": {"error": str(e)}})
                await asyncio.sleep(1.0)

    def _context_summary(self, text: str) -> None:
        try:
            summary = ContextSummary.decode(text)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("unreadable context summary announcement", extra={"fields": {"error": str(e)}})
            return
        self._on_context_summary(summary)

    async def _let_go(self, session_id: str) -> None:
        # When Redis is away the lease simply expires.
        with suppress(RedisError, OSError):
            await self._release(keys=[held_key(session_id)], args=[self.server_id])
