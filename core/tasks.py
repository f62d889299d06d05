"""Background tasks that nobody awaits: kept referenced until done, and cancelled together at the end."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    """A set of fire-and-forget tasks (asyncio keeps only weak references to running tasks)."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        # Made at the first spawn: every connection and session has one, and most never spawn.
        self._tasks: set[asyncio.Task[Any]] | None = None

    def __len__(self) -> int:
        return len(self._tasks) if self._tasks else 0

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def wait(self, *, within_s: float | None = None) -> None:
        """Let the tasks finish for up to `within_s`; cancel the late ones and wait for them to go."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=within_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def cancel(self) -> None:
        await self.wait(within_s=0)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # Retrieved: a failure is logged where it happens, never as "never retrieved".


def succeeded(future: asyncio.Future[Any]) -> bool:
    """The future is done with a result (not cancelled, not failed): e.g. an event write that landed."""
    return future.done() and not future.cancelled() and future.exception() is None
