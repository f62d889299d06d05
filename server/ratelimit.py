"""Message rate limits: per connection (a token bucket) and per user, across connections and server processes."""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.tasks import TaskSet

log = logging.getLogger(__name__)

_WINDOW_S = 60


class TokenBucket:
    """`per_minute` messages a minute, in bursts of up to that many."""

    __slots__ = ("_at", "_capacity", "_rate", "_tokens")

    def __init__(self, per_minute: int) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._tokens = self._capacity
        self._at = time.monotonic()

    @property
    def full(self) -> bool:
        return self._tokens + (time.monotonic() - self._at) * self._rate >= self._capacity

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class UserRateLimiter:
    """`per_minute` messages per user, whatever connection or server process they arrive on.

    The decision never waits for Redis (the time from a message to the upstream request is a hot path): each
    process keeps a bucket per user, and counts every accepted message in a per-minute Redis counter shared by
    all processes, in the background. When that counter shows the user at the limit, the process refuses the
    user's messages until the minute is over; only messages racing the count (a process learns of the others'
    messages from its own next count) can get past it. With Redis away, the per-process buckets still hold.
    """

    def __init__(self, redis: Redis, per_minute: int) -> None:
        self._redis = redis
        self._per_minute = per_minute
        self._buckets: dict[str, TokenBucket] = {}
        # user -> monotonic time until which the shared count says no.
        self._blocked: dict[str, float] = {}
        self._counting = TaskSet()

    def allow(self, user_id: str) -> bool:
        if (until := self._blocked.get(user_id)) is not None:
            if time.monotonic() < until:
                return False
            del self._blocked[user_id]
        bucket = self._buckets.get(user_id)
        if bucket is None:
            bucket = self._buckets[user_id] = TokenBucket(self._per_minute)
        if not bucket.allow():
            return False
        self._counting.spawn(self._count(user_id))
        return True

    def forget(self, user_id: str) -> None:
        """The user's last connection here closed: drop their bucket unless it still remembers recent messages."""
        bucket = self._buckets.get(user_id)
        if bucket is not None and bucket.full:
            del self._buckets[user_id]

    async def close(self) -> None:
        await self._counting.cancel()

    async def _count(self, user_id: str) -> None:
        now = time.time()
        window = int(now // _WINDOW_S)
        key = f"rt:rate:{user_id}:{window}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, _WINDOW_S * 2)
                count, _ = await pipe.execute()
        except (RedisError, OSError) as e:
            log.debug("could not count a user's message in Redis", extra={"fields": {"error": str(e)}})
            return
        # This message used the last of the minute's allowance: the next ones wait for the next minute.
        if int(count) >= self._per_minute:
            left_s = (window + 1) * _WINDOW_S - now
            self._blocked[user_id] = time.monotonic() + left_s
