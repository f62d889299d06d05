"""A deadline for a stream of reads that costs one timer per stream, not one per read.

`asyncio.timeout()` around every read schedules and cancels a timer handle per token. Here a read only stores its
due time, and the time between reads (the consumer's, at a `yield`) is not counted. The single timer, when it fires
before the due time, re-arms itself there; so it runs about once per timeout period however many reads there are.
When it expires during a read it fails that read.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol


class Expired(Exception):
    """The deadline passed while a read was pending."""


class _Reader(Protocol):
    def set_exception(self, exc: BaseException) -> None: ...


class Deadline:
    __slots__ = ("_handle", "_loop", "_reader", "due", "expired")

    def __init__(self, reader: _Reader) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self.due = math.inf
        self.expired = False
        self._handle: asyncio.TimerHandle | None = None

    def reading(self, due: float) -> None:
        """A read starts; it must complete by `due` (loop time)."""
        self.due = due
        handle = self._handle
        if handle is None:
            self._handle = self._loop.call_at(due, self._check)
        elif due < handle.when():
            # Sooner than the timer (the token gap after the first token's longer wait): move it.
            handle.cancel()
            self._handle = self._loop.call_at(due, self._check)

    def read(self) -> None:
        """The read completed: the clock stops until the next one."""
        self.due = math.inf

    def _check(self) -> None:
        due = self.due
        if due == math.inf:
            self._handle = None
        elif self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
        else:
            self._handle = None
            self.expired = True
            self._reader.set_exception(Expired())

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
