"""Pending writes kept on local disk while the store is away, and replayed in order once it is back.

The writers keep events in memory and retry; when the store stays down longer than memory should hold them
(`SPOOL_AFTER_S`, `SPOOL_MAX_PENDING`) or the process stops before they land, the hub moves them here. A segment
is a file of JSON lines, fsynced and renamed into place, so one that exists is whole. Segments are replayed oldest
first, before any writer may write again (the `clear` gate), so every session keeps its order; the replay is
idempotent by event key, so a segment replayed twice (a crash mid-replay) stores each event once.

SPOOL_DIR is shared by every server process of a machine (WEB_CONCURRENCY of them, or containers on one volume):
each takes a slot of its own, held with an exclusive `flock` for its lifetime: SPOOL_DIR itself (slot 0, where a
single process has always spooled), else the first free `SPOOL_DIR/proc-<n>/`. The kernel lets go of a dead
process's lock, so the process that replaces it takes its slot and replays what it left; at start a process also
adopts (moves into its own slot, then replays) the segments of every other slot no live process holds, so nothing
waits behind a slot nobody takes again (fewer processes than before).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import time
from datetime import datetime
from pathlib import Path

import orjson

from core.errors import ConfigError
from core.store import NewEvent, Store

from ..metrics import Metrics
from .writer import Committer, EventWriter, Pending

log = logging.getLogger(__name__)

_SUFFIX = ".jsonl"
_PARTIAL = ".partial"
_LOCK = ".lock"
_SLOT_PREFIX = "proc-"


class Spool:
    """One server process's slot of the machine's spool directory, locked while the process lives."""

    def __init__(self, directory: Path, store: Store, metrics: Metrics, *, retry_max_s: float) -> None:
        self._root = directory
        self._dir = directory
        self._lock: int | None = None
        self._store = store
        self._metrics = metrics
        self._retry_max_s = retry_max_s
        # Writers wait on this: set while no segment waits to be replayed.
        self.clear = asyncio.Event()
        # The futures of this process's spooled events, resolved when the replay commits them.
        self._futures: dict[tuple[str, str], asyncio.Future[int]] = {}
        self._spilling = 0
        # Segments this process wrote, whose events the gauge already counts.
        self._counted: set[str] = set()
        self._replayer: asyncio.Task[None] | None = None

    @property
    def directory(self) -> Path:
        """This process's slot (SPOOL_DIR itself, or one of its `proc-<n>` directories once `open` took one)."""
        return self._dir

    def open(self) -> None:
        """Take a free slot, adopt what dead processes left in theirs, and replay it."""
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            self._dir, self._lock = _take_slot(self._root)
            probe = self._dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            adopted = _adopt_orphans(self._root, self._dir)
        except OSError as e:
            raise ConfigError(f"SPOOL_DIR {str(self._root)!r} cannot be written: {e.strerror or e}") from e
        if adopted:
            log.warning(
                "adopted the spooled writes of a process that is gone",
                extra={"fields": {"segments": adopted, "spool_dir": str(self._dir)}},
            )
        left = self._segments()
        if left:
            log.warning("replaying spooled writes of an earlier run", extra={"fields": {"segments": len(left)}})
            self._start_replay()
        else:
            self.clear.set()

    async def spill(self, items: list[Pending], *, reason: str) -> bool:
        """Write `items` (in order) to a new segment and stop the writers until it is replayed.

        False when the disk refused: the caller keeps the events in memory."""
        if not items:
            return True
        self.clear.clear()
        self._spilling += 1
        try:
            name = await asyncio.to_thread(self._write_segment, [event for event, _ in items])
        except OSError as e:
            log.error("could not spool pending writes", extra={"fields": {"events": len(items), "error": str(e)}})
            return False
        finally:
            self._spilling -= 1
            self._start_replay()
        for event, future in items:
            self._futures[(event.session_id, event.event_key)] = future
        self._counted.add(name)
        self._metrics.spooled_events.inc(len(items))
        log.warning(
            "store not taking writes: pending writes spooled to disk",
            extra={"fields": {"events": len(items), "reason": reason, "spool_dir": str(self._dir)}},
        )
        return True

    async def close(self) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.gather(self._replayer, return_exceptions=True)
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        if self._lock is not None:
            os.close(self._lock)  # the slot is free for the next process, with whatever segments it still holds
            self._lock = None

    def _start_replay(self) -> None:
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.create_task(self._replay(), name="spool-replay")

    async def _replay(self) -> None:
        committer = Committer(self._store, self._metrics, max_backoff_s=self._retry_max_s)
        try:
            await self._replay_segments(committer.writer())
        finally:
            await committer.close()

    async def _replay_segments(self, writer: EventWriter) -> None:
        while True:
            segments = self._segments()
            if not segments:
                # A spill still writing its segment will start another replay when it is done.
                if not self._spilling:
                    self.clear.set()
                return
            for path in segments:
                try:
                    events = await asyncio.to_thread(_read_segment, path)
                except OSError as e:
                    # Kept aside for an operator, loudly: it must not hold back every write after it.
                    log.error(
                        "spool segment unreadable, set aside", extra={"fields": {"segment": path.name, "error": str(e)}}
                    )
                    await asyncio.to_thread(_set_aside, path)
                    await asyncio.sleep(1.0)  # should even that fail, no busy loop
                    continue
                if path.name not in self._counted:
                    self._metrics.spooled_events.inc(len(events))  # left by an earlier run
                self._counted.discard(path.name)
                for event in events:
                    self._settle(event, writer.submit(event))
                await writer.drain()
                await asyncio.to_thread(_remove, path)
                self._metrics.spooled_events.dec(len(events))
                log.info("spooled writes replayed", extra={"fields": {"events": len(events), "segment": path.name}})

    def _settle(self, event: NewEvent, written: asyncio.Future[int]) -> None:
        waiting = self._futures.pop((event.session_id, event.event_key), None)
        if waiting is None:
            # Spooled by an earlier process: nobody waits; mark the outcome retrieved.
            written.add_done_callback(lambda f: f.cancelled() or f.exception())
            return

        def done(f: asyncio.Future[int]) -> None:
            if waiting.done():
                return
            if f.cancelled():
                waiting.cancel()
            elif (error := f.exception()) is not None:
                waiting.set_exception(error)
                waiting.exception()
            else:
                waiting.set_result(f.result())

        written.add_done_callback(done)

    def _segments(self) -> list[Path]:
        # Names start with a nanosecond clock, so name order is spill order.
        return sorted(p for p in self._dir.iterdir() if p.suffix in (_SUFFIX, _PARTIAL))

    def _write_segment(self, events: list[NewEvent]) -> str:
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        partial = self._dir / (name + _PARTIAL)
        with open(partial, "wb") as f:
            for event in events:
                f.write(orjson.dumps(event))
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
        partial.rename(self._dir / (name + _SUFFIX))
        _fsync_dir(self._dir)
        return name + _SUFFIX


def _try_lock(directory: Path) -> int | None:
    """An exclusive lock on the slot `directory`, or None when a live process holds it."""
    fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _slot(root: Path, n: int) -> Path:
    return root if n == 0 else root / f"{_SLOT_PREFIX}{n}"


def _take_slot(root: Path) -> tuple[Path, int]:
    """The first slot no live process holds, locked."""
    n = 0
    while True:
        directory = _slot(root, n)
        directory.mkdir(exist_ok=True)
        fd = _try_lock(directory)
        if fd is not None:
            return directory, fd
        n += 1


def _adopt_orphans(root: Path, mine: Path) -> int:
    """Move into `mine` the segments of every other slot no live process holds; how many were moved.

    Names keep their spill-time prefix, so the replay still takes them oldest first."""
    moved = 0
    others = [root, *(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_SLOT_PREFIX))]
    for directory in others:
        if directory == mine or not _has_segments(directory):
            continue
        fd = _try_lock(directory)
        if fd is None:
            continue  # a live process holds it and replays it itself
        try:
            for path in directory.iterdir():
                if path.suffix in (_SUFFIX, _PARTIAL):
                    path.rename(mine / path.name)
                    moved += 1
            _fsync_dir(mine)
            _fsync_dir(directory)
        finally:
            os.close(fd)
    return moved


def _has_segments(directory: Path) -> bool:
    return any(p.suffix in (_SUFFIX, _PARTIAL) for p in directory.iterdir())


def _read_segment(path: Path) -> list[NewEvent]:
    """The events of a segment. A `.partial` one was cut by a crash mid-spill: its whole lines are kept."""
    events = []
    for line in path.read_bytes().splitlines():
        try:
            fields = orjson.loads(line)
            fields["created_at"] = datetime.fromisoformat(fields["created_at"])
            events.append(NewEvent(**fields))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("unreadable line in a spool segment skipped", extra={"fields": {"segment": path.name}})
    return events


def _set_aside(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rename(path.with_name(path.name + ".unreadable"))


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
