"""What an idle WebSocket can cost in Python without aiohttp's per-connection state: a bare asyncio Protocol that
does the upgrade itself, answers `{"type":"ping"}` with `{"type":"pong"}` and control pings with pongs, closes on
a close frame, and pings every socket from one timer for the whole process (no task, timer or coroutine frame per
socket). A measurement of the floor past aiohttp (bench/RESULTS.md, issue 19), not a server: no fragmentation, no
compression, no limits. `python -m bench.raw_ws --port P`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import resource
import struct

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HEARTBEAT_S = 30.0
_SOCKETS: set[RawSocket] = set()


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


_READY = _frame(1, b'{"type":"session.ready"}')
_PONG_TEXT = _frame(1, b'{"type":"pong"}')
_PING = _frame(9, b"")


class RawSocket(asyncio.Protocol):
    __slots__ = ("_buf", "_open", "_transport")

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        _SOCKETS.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self._open:
            buf = self._handshake(buf)
        while buf:
            used = self._one_frame(buf)
            if not used:
                break
            buf = buf[used:]
        self._buf = buf

    def _handshake(self, buf: bytes) -> bytes:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return buf
        assert self._transport is not None
        head = buf[:end].split(b"\r\n")
        if head[0].startswith(b"GET /healthz"):
            self._transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self._transport.close()
            return b""
        key = next(line.split(b":", 1)[1].strip() for line in head if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self._transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + _READY
        )
        self._open = True
        _SOCKETS.add(self)
        return buf[end + 4 :]

    def _one_frame(self, buf: bytes) -> int:
        """Handle one complete (client-masked) frame at the start of `buf`; its length, or 0 if incomplete."""
        if len(buf) < 2:
            return 0
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return 0
            n, pos = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                return 0
            n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
        if len(buf) < pos + 4 + n:
            return 0
        mask = buf[pos : pos + 4]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buf[pos + 4 : pos + 4 + n]))
        transport = self._transport
        assert transport is not None
        if opcode == 1 and payload == b'{"type":"ping"}':
            transport.write(_PONG_TEXT)
        elif opcode == 9:
            transport.write(_frame(10, payload))
        elif opcode == 8:
            transport.write(_frame(8, payload[:2]))
            transport.close()
        return pos + 4 + n


def _heartbeat(loop: asyncio.AbstractEventLoop) -> None:
    for sock in list(_SOCKETS):
        if sock._transport is not None:
            sock._transport.write(_PING)
    loop.call_later(_HEARTBEAT_S, _heartbeat, loop)


async def main(port: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawSocket, "127.0.0.1", port, backlog=4096)
    loop.call_later(_HEARTBEAT_S, _heartbeat, loop)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.raw_ws")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
