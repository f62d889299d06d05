"""RFC 6455 after aiohttp has routed the request: the upgrade answered here, then the socket served by a protocol of
our own, with no task, coroutine frame or timer per socket.

aiohttp's WebSocket keeps its request handler, two tasks, a parser, a message queue, a reader, a writer and two
timers for the whole life of every socket (~15 KiB idle, before any code of ours: bench/RESULTS.md, issue 19).
Here aiohttp parses the HTTP request and runs the route's checks as for any route; `take_over` then answers the
upgrade, moves the transport to a `WebSocket`, and lets aiohttp's handler end. Frames are parsed in
`data_received` and handed to the socket's `Handler` as calls; one `Sockets` object per process pings the silent
sockets and closes them all at shutdown.

What it speaks: masked client frames, fragmented messages (control frames may come between the fragments), a
size limit checked on each frame's header (1009 before the payload is read), strict UTF-8 (1007), every other
rule of section 5 answered with 1002, ping and pong, and the closing handshake. What it leaves out: extensions
(permessage-deflate is not negotiated: a relayed token is a frame of tens of bytes, where deflate would cost CPU
per frame and a compressor per socket) and subprotocols (the protocol names none).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import struct
import time
from collections.abc import Coroutine, Iterator
from typing import Any, Protocol

from aiohttp import hdrs, web

from core.tasks import TaskSet

log = logging.getLogger(__name__)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Close codes (RFC 6455 section 7.4).
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
ABNORMAL = 1006  # never sent: what a socket records when it closed with no close frame
INVALID_TEXT = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011

_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# Built once: the header of every text frame under 126 bytes (most relayed tokens), and the frames we repeat.
_TEXT_HEADS = [bytes((0x80 | _TEXT, n)) for n in range(126)]
_PING_FRAME = bytes((0x80 | _PING, 0))
_EMPTY_CLOSE = bytes((0x80 | _CLOSE, 0))


class Handler(Protocol):
    """What a socket calls with what its peer sends (see `live.connection.Connection`)."""

    def on_text(self, text: str) -> None: ...

    def on_binary(self) -> None: ...

    def on_closed(self) -> Coroutine[Any, Any, None] | None:
        """The connection is gone: what the handler still has to do, awaited by `Sockets.close_all` at shutdown."""
        ...


class _Failure(Exception):
    """The peer broke a rule of RFC 6455: the connection is failed with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def refusal(request: web.Request) -> str | None:
    """Why the request is not a WebSocket handshake we accept (answered with 400), or None."""
    if "upgrade" not in request.headers.get(hdrs.CONNECTION, "").lower():
        return "the Connection header must include Upgrade"
    if request.headers.get(hdrs.SEC_WEBSOCKET_VERSION, "").strip() != "13":
        return "Sec-WebSocket-Version must be 13"
    try:
        key = base64.b64decode(request.headers.get(hdrs.SEC_WEBSOCKET_KEY, "").strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 16:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def take_over(request: web.Request, sockets: Sockets, *, max_message_bytes: int, close_timeout_s: float) -> WebSocket:
    """Answer the upgrade (checked by `refusal`) and take the connection from aiohttp: its request handler lets go
    of the transport and ends once the route returns `TAKEN`. Frames the client sent behind its request wait in
    the socket until `WebSocket.serve`."""
    key = request.headers[hdrs.SEC_WEBSOCKET_KEY].strip().encode()
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    transport, handler = request.transport, request.protocol
    assert isinstance(transport, asyncio.Transport)
    _ = request.remote  # Kept for the access log, which reads it once the transport is ours.
    ws = WebSocket(transport, sockets, max_message_bytes=max_message_bytes, close_timeout_s=close_timeout_s)
    transport.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
        + accept
        + b"\r\n\r\n"
    )
    transport.set_protocol(ws)
    # What aiohttp's handler read past the request head (3.14: `_message_tail`), and the handler let go of: a
    # forced close ends its request loop without closing the transport (which it no longer holds), and once
    # that loop ends, the handler is told the connection is lost (with no transport, it closes nothing): its
    # server forgets it, and its parser and timers go. Private attributes of the pinned aiohttp, which every
    # connection in the tests goes through.
    ws._buffer = bytes(getattr(handler, "_message_tail", b""))
    handler._message_tail = b""
    handler._force_close = True
    handler.transport = None
    request_loop = getattr(handler, "_task_handler", None)
    if request_loop is not None:
        request_loop.add_done_callback(lambda _: handler.connection_lost(None))
    else:
        handler.connection_lost(None)
    if not transport.is_reading():
        # Paused by aiohttp for a long tail: ours reads as fast as frames are handled.
        transport.resume_reading()
    sockets.add(ws)
    return ws


class _Taken(web.StreamResponse):
    """What the route returns for a socket it took over: aiohttp's handler logs it (101) and writes nothing."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


TAKEN = _Taken


class WebSocket(asyncio.Protocol):
    """One open WebSocket. Frames in go to the handler as calls; `send_text` writes a frame at once."""

    __slots__ = (
        "_buffer",
        "_close_timeout_s",
        "_drained",
        "_ended",
        "_gone",
        "_handler",
        "_max_bytes",
        "_part_op",
        "_parts",
        "_parts_len",
        "_paused",
        "_pinged_at",
        "_sockets",
        "_transport",
        "close_code",
        "closed",
        "heard",
        "slice",
    )

    def __init__(
        self, transport: asyncio.Transport, sockets: Sockets, *, max_message_bytes: int, close_timeout_s: float
    ) -> None:
        self._transport: asyncio.Transport | None = transport
        self._sockets = sockets
        self._handler: Handler | None = None
        self._max_bytes = max_message_bytes
        self._close_timeout_s = close_timeout_s
        # Bytes read and not yet a whole frame (or not yet served).
        self._buffer: bytes | bytearray = b""
        # A fragmented message being put together: its opcode, pieces and length.
        self._part_op = 0
        self._parts: list[bytes] | None = None
        self._parts_len = 0
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        # Set when our close frame went out or the peer's came in: nothing more is sent, data frames are dropped.
        self.closed = False
        # Set once the handler was told the connection is over (`_end`); `_gone` when someone waits for the TCP
        # connection to close (`gone`).
        self._ended = False
        self._gone: asyncio.Future[None] | None = None
        # The peer's close code (0: its close frame had none), or the code we failed the connection with; None
        # while no close frame came (the connection is then lost: 1006).
        self.close_code: int | None = None
        # When the peer last sent anything (time.monotonic), and when we pinged it for being silent.
        self.heard = time.monotonic()
        self._pinged_at = 0.0
        self.slice = 0

    def serve(self, handler: Handler) -> None:
        """Hand frames to `handler` from now on, the ones that came with the upgrade first."""
        self._handler = handler
        if self._buffer:
            data, self._buffer = self._buffer, b""
            self.data_received(bytes(data))

    # Frames out.

    @property
    def writable(self) -> bool:
        """False while the transport's buffer is over its high-water mark: `drain` before writing more."""
        return not self._paused

    def send_text(self, payload: bytes) -> None:
        """Write one text frame (`payload`: UTF-8) in one write. Nothing happens once the socket is closing."""
        transport = self._transport
        if transport is None or self.closed:
            return
        n = len(payload)
        if n < 126:
            transport.write(_TEXT_HEADS[n] + payload)
        elif n < 65536:
            transport.write(struct.pack("!BBH", 0x80 | _TEXT, 126, n) + payload)
        else:
            transport.write(struct.pack("!BBQ", 0x80 | _TEXT, 127, n) + payload)

    async def drain(self) -> None:
        """Wait until the peer has read enough for more to be written; ConnectionResetError if it went."""
        if self._transport is None:
            raise ConnectionResetError("the connection is closed")
        if not self._paused:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)
        if self._transport is None:
            raise ConnectionResetError("the connection is closed")

    def close(self, code: int = NORMAL, message: bytes = b"") -> None:
        """Start the closing handshake: the connection is over for the handler at once (it winds down while the
        peer answers), and the TCP connection closes on the peer's close frame, or after `close_timeout_s`."""
        transport = self._transport
        if transport is None or self.closed:
            return
        self.closed = True
        self._write_close(code, message)
        asyncio.get_running_loop().call_later(self._close_timeout_s, self._shut)
        self._end()

    async def gone(self) -> None:
        """Return once the TCP connection is closed."""
        if self._transport is None:
            return
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._gone)

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake (the peer is not reading)."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    @property
    def aborting(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def beat(self, now: float, interval_s: float) -> None:
        """Called by `Sockets` every half interval: ping a peer silent for `interval_s`; drop one that did not
        answer the last ping (close code 1006, as for any connection lost without a close frame)."""
        if self._pinged_at:
            if self.heard < self._pinged_at:
                log.info("websocket peer stopped answering pings", extra={"fields": {"silent_s": now - self.heard}})
                self.abort()
                return
            self._pinged_at = 0.0
        if now - self.heard >= interval_s and self._transport is not None and not self.closed:
            self._transport.write(_PING_FRAME)
            self._pinged_at = now

    def _write_close(self, code: int, message: bytes) -> None:
        assert self._transport is not None
        payload = struct.pack("!H", code) + message[:123]
        self._transport.write(bytes((0x80 | _CLOSE, len(payload))) + payload)

    def _shut(self) -> None:
        """Close the TCP connection once what is written has gone; a peer that does not read it is cut off."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(self._close_timeout_s, transport.abort)

    # asyncio.Protocol.

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.closed = True
        self._paused = False
        self._wake_drain()
        self._buffer, self._parts = b"", None
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        self._end()

    def _end(self) -> None:
        """The connection is over for the handler (whichever way it ended): tell it, once."""
        if self._ended:
            return
        self._ended = True
        handler, self._handler = self._handler, None
        self._sockets.closed(self, handler.on_closed() if handler is not None else None)

    def _wake_drain(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.heard = time.monotonic()
        if self._transport is None:
            return
        if self._handler is None and not self._ended:
            # Not served yet (frames sent right behind the handshake): kept for `serve`.
            self._buffer = self._buffer + data
            return
        if self._buffer:
            buffer = self._buffer
            if not isinstance(buffer, bytearray):
                buffer = bytearray(buffer)
            buffer += data
        else:
            buffer = data  # the usual case: whole frames, parsed in place
        try:
            used = self._frames(buffer)
        except _Failure as e:
            self._fail(e.code, str(e))
            return
        except Exception:
            log.exception("websocket frame handling failed")
            self._fail(INTERNAL_ERROR, "internal error")
            return
        if used == len(buffer):
            self._buffer = b""
        elif isinstance(buffer, bytearray):
            del buffer[:used]
            self._buffer = buffer
        else:
            self._buffer = buffer[used:]

    def eof_received(self) -> bool:
        return False  # The transport closes: a peer that half-closes is gone.

    # Frames in.

    def _frames(self, buf: bytes | bytearray) -> int:
        """Handle every whole frame in `buf`; returns the bytes used."""
        pos, end = 0, len(buf)
        while end - pos >= 2 and self._transport is not None:
            b0, b1 = buf[pos], buf[pos + 1]
            opcode, length, head = b0 & 0x0F, b1 & 0x7F, 2
            if b0 & 0x70:
                raise _Failure(PROTOCOL_ERROR, "reserved bits set without an extension")
            if not b1 & 0x80:
                raise _Failure(PROTOCOL_ERROR, "client frames must be masked")
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
                if length >> 63:
                    raise _Failure(PROTOCOL_ERROR, "frame length out of range")
            if opcode >= _CLOSE:
                if not b0 & 0x80 or length > 125:
                    raise _Failure(PROTOCOL_ERROR, "control frames are whole and at most 125 bytes")
                if opcode > _PONG:
                    raise _Failure(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            elif opcode > _BINARY:
                raise _Failure(PROTOCOL_ERROR, f"unknown opcode {opcode}")
            elif self._parts_len + length > self._max_bytes:
                # Refused on the header: the payload is never read.
                raise _Failure(MESSAGE_TOO_BIG, f"message over {self._max_bytes} bytes")
            start = pos + head + 4
            if end - start < length:
                break
            payload = _unmask(buf[start - 4 : start], buf[start : start + length])
            pos = start + length
            if opcode >= _CLOSE:
                self._control(opcode, payload)
            else:
                self._data(opcode, bool(b0 & 0x80), payload)
        return pos

    def _data(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode == _CONTINUATION:
            parts = self._parts
            if parts is None:
                raise _Failure(PROTOCOL_ERROR, "continuation frame with no message started")
            parts.append(payload)
            self._parts_len += len(payload)
            if not fin:
                return
            opcode, payload = self._part_op, b"".join(parts)
            self._parts, self._parts_len = None, 0
        elif self._parts is not None:
            raise _Failure(PROTOCOL_ERROR, "a new message started before the last one ended")
        elif not fin:
            self._part_op, self._parts, self._parts_len = opcode, [payload], len(payload)
            return
        if self.closed:
            return  # After a close frame, data is not read (section 5.5.1).
        handler = self._handler
        assert handler is not None
        if opcode == _TEXT:
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                raise _Failure(INVALID_TEXT, "text frame is not UTF-8") from None
            handler.on_text(text)
        else:
            handler.on_binary()

    def _control(self, opcode: int, payload: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if opcode == _PING:
            if not self.closed:
                transport.write(bytes((0x80 | _PONG, len(payload))) + payload)
            return
        if opcode == _PONG:
            return  # `heard` is all a pong is for.
        code = 0
        if payload:
            if len(payload) < 2:
                raise _Failure(PROTOCOL_ERROR, "close frame with a one-byte payload")
            code = int.from_bytes(payload[:2], "big")
            if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
                raise _Failure(PROTOCOL_ERROR, f"close code {code} may not be sent")
            try:
                payload[2:].decode()
            except UnicodeDecodeError:
                raise _Failure(INVALID_TEXT, "close reason is not UTF-8") from None
        if self.close_code is None:
            self.close_code = code
        if not self.closed:
            # The peer's close: answered with its code, then the server closes the TCP connection first.
            self.closed = True
            transport.write((bytes((0x80 | _CLOSE, 2)) + payload[:2]) if code else _EMPTY_CLOSE)
        self._shut()
        self._end()

    def _fail(self, code: int, reason: str) -> None:
        """Section 7.1.7: send a close frame with `code`, then close without waiting for the answer."""
        if self._transport is None:
            return
        if self.close_code is None:
            self.close_code = code
        if not self.closed:
            self.closed = True
            self._write_close(code, reason.encode())
        self._buffer, self._parts = b"", None
        self._shut()
        self._end()


def _unmask(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
    """XOR `data` with the 4-byte `mask` repeated, as one operation on two integers (no loop over bytes)."""
    n = len(data)
    if not n:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


_SLICES = 16


class Sockets:
    """Every WebSocket open in this process: pinged when silent, closed at shutdown, and their handlers' endings
    awaited. One timer for all of them: each tick visits one slice of the sockets, so each socket is seen every
    half heartbeat interval, and no tick walks them all at once (the loop stays free for the hot path).

    The sockets are held strongly and let go in `connection_lost`: a weak set would cost a weak reference per
    socket, and a socket must not go before its connection does."""

    def __init__(self, *, heartbeat_s: float) -> None:
        self._heartbeat_s = heartbeat_s
        self._slices: list[set[WebSocket]] = [set() for _ in range(_SLICES)]
        self._next = 0
        self._endings = TaskSet()

    def __iter__(self) -> Iterator[WebSocket]:
        return (ws for s in self._slices for ws in list(s))

    def add(self, ws: WebSocket) -> None:
        ws.slice = self._next
        self._next = (self._next + 1) % _SLICES
        self._slices[ws.slice].add(ws)

    def closed(self, ws: WebSocket, ending: Coroutine[Any, Any, None] | None) -> None:
        self._slices[ws.slice].discard(ws)
        if ending is not None:
            self._endings.spawn(ending, name="websocket-ending")

    async def heartbeat(self) -> None:
        """Runs until cancelled."""
        interval, tick = self._heartbeat_s, self._heartbeat_s / 2 / _SLICES
        turn = 0
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for ws in list(self._slices[turn]):
                ws.beat(now, interval)
            turn = (turn + 1) % _SLICES

    async def close_all(self, code: int, message: bytes, *, wait_s: float, within_s: float) -> None:
        """Close every socket still open, give the peers up to `wait_s` to answer (then close anyway), and let the
        handlers finish what they do when their socket goes (up to `within_s`)."""
        sockets = list(self)
        for ws in sockets:
            ws.close(code, message)
        if sockets and wait_s > 0:
            _, late = await asyncio.wait([asyncio.ensure_future(ws.gone()) for ws in sockets], timeout=wait_s)
            for waiting in late:
                waiting.cancel()
        for ws in sockets:
            ws._shut()
        await self._endings.wait(within_s=within_s)
