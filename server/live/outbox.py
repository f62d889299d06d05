"""Frames to one socket, in order, with bounded waiting: a peer that stops reading loses its socket, and nobody
else waits on it."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ..protocol import compact
from ..websocket import WebSocket

log = logging.getLogger(__name__)

# A send that waits for the peer to read ends with ConnectionResetError when the connection goes.
_SEND_ERRORS = (ConnectionError,)


class Outbox:
    """Sends frames to one WebSocket.

    A send normally completes without suspending: the frame is written to the transport, and the send waits
    only when the peer's buffers are full. While one send waits there, every other frame queues behind it (kept
    in order, at most `max_buffer_bytes`), so acknowledgements and pongs never pile up as waiting tasks. A queue
    past that size, or a send stuck for `timeout_s` (see `check_stalled`, called by one sweep for the whole
    process), aborts the transport: the socket then closes, and the session's data is stored as at any close.
    """

    __slots__ = (
        "_max_bytes",
        "_queue",
        "_queued_bytes",
        "_seen",
        "_sending",
        "_sends",
        "_timeout_s",
        "_ws",
    )

    def __init__(self, ws: WebSocket, *, timeout_s: float, max_buffer_bytes: int) -> None:
        self._ws = ws
        self._timeout_s = timeout_s
        self._max_bytes = max_buffer_bytes
        # Made when a frame first has to wait (an empty deque costs 600 bytes, and most sockets never queue).
        self._queue: deque[bytes] | None = None
        self._queued_bytes = 0
        self._sending = False
        # Sends started so far, and (count, time) when the sweep last saw one waiting: progress shows as a new count.
        self._sends = 0
        self._seen: tuple[int, float] | None = None

    @property
    def blocked(self) -> bool:
        """A send is waiting for the peer to read (only another task can see this)."""
        return self._sending

    async def send(self, frame: bytes) -> None:
        if self._sending or self._queue:
            # Behind a send that waits, or frames `put` just queued: whoever sends the queue keeps the order.
            self._enqueue(frame)
            return
        ws = self._ws
        if ws.closed:
            return
        # The hot path, inline: one frame written, nothing queued behind it.
        self._sends += 1
        ws.send_text(frame)
        if ws.writable:
            return
        self._sending = True
        try:
            await ws.drain()
        except _SEND_ERRORS:
            self._drop_queue()
        finally:
            self._sending = False
        if self._queue:
            await self._flush()

    def put(self, frame: bytes) -> None:
        """Queue a frame without waiting (acknowledgements, errors, a catch-up); it keeps its order with the
        frames `send` gets after it."""
        ws = self._ws
        if ws.closed:
            return
        start = not self._sending and not self._queue
        if start and ws.writable:
            self._sends += 1
            ws.send_text(frame)
            return
        self._enqueue(frame)
        if start:
            task = asyncio.ensure_future(self._flush())
            task.add_done_callback(_retrieve)

    async def _flush(self) -> None:
        """Send what is queued, in order, waiting for the peer whenever its buffers are full."""
        ws = self._ws
        if ws.closed:
            self._drop_queue()
            return
        self._sending = True
        try:
            # Read each time round: the queue may be made (or dropped) while a send waits.
            while queue := self._queue:
                frame = queue.popleft()
                self._queued_bytes -= len(frame)
                self._sends += 1
                ws.send_text(frame)
                if not ws.writable:
                    await ws.drain()
            self._queue = None
        except _SEND_ERRORS:
            # The peer is gone: the read loop sees the close and winds the connection down.
            self._drop_queue()
        finally:
            self._sending = False

    def check_stalled(self, now: float) -> bool:
        """Abort the transport if one send has waited `timeout_s` without progress; True if it did."""
        if not self._sending:
            self._seen = None
            return False
        if self._seen is None or self._seen[0] != self._sends:
            self._seen = (self._sends, now)
            return False
        if now - self._seen[1] < self._timeout_s:
            return False
        self.abort("the client stopped reading")
        return True

    def abort(self, reason: str) -> None:
        """Drop the connection at once (no closing handshake: the peer is not reading it)."""
        self._drop_queue()
        if not self._ws.aborting:
            log.warning("connection aborted", extra={"fields": {"reason": reason}})
        self._ws.abort()

    def _enqueue(self, frame: bytes) -> None:
        # Kept until the peer reads: at its own size (see `protocol.compact`), so the byte limit is the memory used.
        frame = compact(frame)
        if self._queue is None:
            self._queue = deque()
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if self._queued_bytes > self._max_bytes:
            self.abort(f"more than {self._max_bytes} bytes waiting to be sent")

    def _drop_queue(self) -> None:
        self._queue = None
        self._queued_bytes = 0


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
