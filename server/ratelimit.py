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
        key = _rate_key(user_id, window)
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


class DailyTokenBudget:
    """`limit` tokens (prompt and completion, as each answer's metadata counts them) per user per UTC day, across
    connections and server processes.

    As `UserRateLimiter`, the decision never waits for Redis: each answer's tokens are added to the user's
    counter for the day in the background, and a process refuses the user's messages once the total Redis last
    gave it is at the limit. A connection reads the total once when it opens, so a user who spent the budget on
    another server is refused here from the first message. Answers running when the limit is reached finish.
    """

    def __init__(self, redis: Redis, limit: int) -> None:
        self._redis = redis
        self._limit = limit
        # user -> (UTC day, tokens spent that day as last seen).
        self._seen: dict[str, tuple[str, int]] = {}
        self._counting = TaskSet()

    def allows(self, user_id: str) -> bool:
        seen = self._seen.get(user_id)
        return seen is None or seen[0] != _today() or seen[1] < self._limit

    def spend(self, user_id: str, tokens: int) -> None:
        if tokens > 0:
            self._counting.spawn(self._add(user_id, tokens))

    async def refresh(self, user_id: str) -> None:
        """Read the user's total for today (a connection opening); Redis away: what this process saw stands."""
        day = _today()
        try:
            total = await self._redis.get(_budget_key(user_id, day))
        except (RedisError, OSError) as e:
            log.warning("could not read a user's token budget", extra={"fields": {"error": str(e)}})
            return
        self._seen[user_id] = (day, int(total or 0))

    async def close(self) -> None:
        await self._counting.wait(within_s=1.0)

    async def _add(self, user_id: str, tokens: int) -> None:
        day = _today()
        key = _budget_key(user_id, day)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(key, tokens)
                pipe.expire(key, 2 * 86_400)
                total, _ = await pipe.execute()
        except (RedisError, OSError) as e:
            # Counted here at least: this process refuses past the limit on its own.
            log.warning("could not count a user's tokens", extra={"fields": {"error": str(e)}})
            seen = self._seen.get(user_id)
            total = tokens + (seen[1] if seen is not None and seen[0] == day else 0)
        self._seen[user_id] = (day, int(total))


def _today() -> str:
    return time.strftime("%Y%m%d", time.gmtime())


def _rate_key(user_id: str, window: int) -> str:
    # Hash-tagged on the user, as the budget's key: `rt:rate:{<user>}:<window>`.
    return f"rt:rate:{{{user_id}}}:{window}"


def _budget_key(user_id: str, day: str) -> str:
    # Hash-tagged on the user: one slot per user in a Redis Cluster.
    return f"rt:tokens:{{{user_id}}}:{day}"
