"""Connection slots: how many sockets this process and each user may hold at once."""

from __future__ import annotations

from core.settings import Settings

from ..ratelimit import UserRateLimiter

SERVER_BUSY = "server_busy"
TOO_MANY_CONNECTIONS = "too_many_connections"


class Admission:
    """Counts the connections of the process and of each user; every admitted connection is paired with `leave`."""

    def __init__(self, settings: Settings, user_rate: UserRateLimiter) -> None:
        self._max = settings.max_connections
        self._max_per_user = settings.max_connections_per_user
        self._user_rate = user_rate
        self._connections = 0
        self._per_user: dict[str, int] = {}

    def admit(self, user_id: str | None) -> str | None:
        """Reserve a slot; the refusal's error code when the process or the user is at the limit."""
        if self._connections >= self._max:
            return SERVER_BUSY
        if user_id is not None:
            held = self._per_user.get(user_id, 0)
            if held >= self._max_per_user:
                return TOO_MANY_CONNECTIONS
            self._per_user[user_id] = held + 1
        self._connections += 1
        return None

    def leave(self, user_id: str | None) -> None:
        self._connections -= 1
        if user_id is not None:
            left = self._per_user[user_id] - 1
            if left:
                self._per_user[user_id] = left
            else:
                del self._per_user[user_id]
                self._user_rate.forget(user_id)
