"""The RFC 6455 rules of the WebSocket layer itself, pinned with a raw socket client: hand-written handshakes,
hand-masked frames, fragments, control frames, close codes (server/websocket.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from typing import Any

import orjson
import pytest

from tests.conftest import eventually

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RSV1, RSV2, RSV3 = 0b100, 0b010, 0b001
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PING = b'{"type":"ping"}'
WAIT_S = 5.0


def header(opcode: int, length: int, *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """A frame header (without the masking key), its length in the 7-, 16- or 64-bit form as RFC 6455 5.2 says."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes([first, mask_bit | length])
    if length < 1 << 16:
        return bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    return bytes([first, mask_bit | 127]) + struct.pack("!Q", length)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    head = header(opcode, len(payload), fin=fin, rsv=rsv, masked=masked)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawSocket:
    """A WebSocket client with nothing between the test and the bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def write(self, data: bytes, *, piece: int | None = None, pause_s: float = 0.003) -> None:
        """Write `data` at once, or in `piece`-byte writes with a short pause after each (separate TCP segments)."""
        if piece is None:
            self.writer.write(data)
            await self.writer.drain()
            return
        for i in range(0, len(data), piece):
            self.writer.write(data[i : i + piece])
            await self.writer.drain()
            await asyncio.sleep(pause_s)

    async def send(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        masked: bool = True,
        piece: int | None = None,
    ) -> None:
        await self.write(frame(opcode, payload, fin=fin, rsv=rsv, masked=masked), piece=piece)

    async def recv(self, *, timeout: float = WAIT_S) -> tuple[bool, int, bytes]:
        """The next frame from the server, as (fin, opcode, payload); server frames are never masked (RFC 5.1)."""

        async def read() -> tuple[bool, int, bytes]:
            first, second = await self.reader.readexactly(2)
            assert first & 0x70 == 0, f"server frame with RSV bits set: {first:#x}"
            assert not second & 0x80, "the server masked a frame"
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return bool(first & 0x80), first & 0x0F, await self.reader.readexactly(length)

        return await asyncio.wait_for(read(), timeout)

    async def recv_data(self, *, timeout: float = WAIT_S) -> tuple[int, bytes]:
        """The next data frame (or close), skipping the server's heartbeat pings."""
        while True:
            fin, opcode, payload = await self.recv(timeout=timeout)
            if opcode in (OP_PING, OP_PONG):
                continue
            assert fin, "the server fragmented a message"
            return opcode, payload

    async def event(self, *, timeout: float = WAIT_S) -> dict[str, Any]:
        opcode, payload = await self.recv_data(timeout=timeout)
        assert opcode == OP_TEXT, f"expected a text frame, got opcode {opcode:#x} {payload!r}"
        event: dict[str, Any] = orjson.loads(payload)
        return event

    async def expect_pong(self) -> None:
        """The app-level pong: the socket still serves frames."""
        assert (await self.event())["type"] == "pong"

    async def expect_close(self, code: int) -> bytes:
        """The next data frame is a close frame with `code`; returns its reason."""
        opcode, payload = await self.recv_data()
        assert opcode == OP_CLOSE, f"expected a close frame, got opcode {opcode:#x} {payload!r}"
        assert len(payload) >= 2, f"close frame without a status code: {payload!r}"
        assert struct.unpack("!H", payload[:2])[0] == code, payload
        reason = payload[2:]
        reason.decode("utf-8")  # A close reason is UTF-8 (RFC 5.5.1).
        return reason

    async def expect_eof(self, *, timeout: float = WAIT_S) -> None:
        """The server closed the TCP connection: nothing more arrives, then EOF."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return
        assert rest == b"", f"bytes after the close frame: {rest!r}"

    def close(self) -> None:
        self.writer.close()


def request_head(host: str, port: int, session_id: str, *, key: str | None, version: str | None) -> bytes:
    lines = [
        f"GET /ws/session/{session_id} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def handshake(
    client: Any,
    session_id: str,
    *,
    key: str | None = None,
    version: str | None = "13",
    pipelined: bytes = b"",
) -> tuple[int, dict[str, str], RawSocket]:
    """Send the upgrade request (and `pipelined` bytes in the same write); the status, headers and the socket."""
    host, port = client.server.host, client.server.port
    if key is None:
        key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection(host, port)
    sock = RawSocket(reader, writer)
    await sock.write(request_head(host, port, session_id, key=key or None, version=version) + pipelined)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, sock


async def connect(client: Any, session_id: str, *, pipelined: bytes = b"") -> RawSocket:
    """An open socket, its `session.ready` read."""
    status, _, sock = await handshake(client, session_id, pipelined=pipelined)
    assert status == 101
    ready = await sock.event()
    assert ready["type"] == "session.ready"
    assert ready["session_id"] == session_id
    return sock


async def expect_failed(sock: RawSocket, code: int) -> None:
    """The server failed the connection (RFC 7.1.7): a close frame with `code`, then the TCP connection closes."""
    await sock.expect_close(code)
    await sock.expect_eof()
    sock.close()


# Fragments, control frames between them, and how the bytes arrive.


async def test_a_fragmented_message_with_a_ping_between_its_fragments_is_reassembled_and_the_ping_ponged(client):
    sock = await connect(client, "frag-ping")
    await sock.send(OP_TEXT, b'{"ty', fin=False)
    await sock.send(OP_PING, b"are you there?")
    await sock.send(OP_CONT, b'pe":"pi', fin=False)
    await sock.send(OP_CONT, b'ng"}')

    fin, opcode, payload = await sock.recv()
    assert (fin, opcode, payload) == (True, OP_PONG, b"are you there?")
    await sock.expect_pong()
    sock.close()


async def test_a_frame_that_arrives_byte_by_byte_is_served(client):
    sock = await connect(client, "byte-by-byte")
    await sock.send(OP_TEXT, PING, piece=1)
    await sock.expect_pong()
    sock.close()


async def test_two_frames_in_one_write_are_both_answered_in_order(client):
    sock = await connect(client, "coalesced")
    await sock.write(frame(OP_PING, b"first") + frame(OP_TEXT, PING))
    assert await sock.recv() == (True, OP_PONG, b"first")
    await sock.expect_pong()
    await sock.write(frame(OP_TEXT, PING) + frame(OP_TEXT, b'{"type":"ping","n":2}'))
    await sock.expect_pong()
    await sock.expect_pong()
    sock.close()


async def test_a_frame_sent_right_behind_the_handshake_request_is_served(client):
    sock = await connect(client, "pipelined", pipelined=frame(OP_TEXT, PING))
    await sock.expect_pong()
    sock.close()


async def test_a_ping_gets_a_pong_with_the_same_payload_also_an_empty_and_a_125_byte_one(client):
    sock = await connect(client, "pings")
    for payload in (b"", b"x" * 125, bytes(range(125))):
        await sock.send(OP_PING, payload)
        assert await sock.recv() == (True, OP_PONG, payload)
    await sock.send(OP_PONG, b"unsolicited")  # An unsolicited pong is ignored (RFC 5.5.3).
    await sock.send(OP_TEXT, PING)
    await sock.expect_pong()
    sock.close()


# Frames that break RFC 6455: the server fails the connection with 1002.


async def test_an_unmasked_client_frame_closes_the_socket_with_1002(client):
    sock = await connect(client, "unmasked")
    await sock.send(OP_TEXT, PING, masked=False)
    await expect_failed(sock, 1002)


@pytest.mark.parametrize("rsv", [RSV1, RSV2, RSV3], ids=["rsv1", "rsv2", "rsv3"])
async def test_a_reserved_bit_without_a_negotiated_extension_closes_the_socket_with_1002(client, rsv):
    sock = await connect(client, f"rsv-{rsv}")
    await sock.send(OP_TEXT, PING, rsv=rsv)
    await expect_failed(sock, 1002)


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF])
async def test_an_unknown_opcode_closes_the_socket_with_1002(client, opcode):
    sock = await connect(client, f"opcode-{opcode}")
    await sock.send(opcode, b"?")
    await expect_failed(sock, 1002)


async def test_a_control_frame_over_125_bytes_closes_the_socket_with_1002(client):
    sock = await connect(client, "big-ping")
    await sock.send(OP_PING, b"x" * 126)
    await expect_failed(sock, 1002)


async def test_a_fragmented_control_frame_closes_the_socket_with_1002(client):
    sock = await connect(client, "fragmented-ping")
    await sock.send(OP_PING, b"half", fin=False)
    await expect_failed(sock, 1002)


async def test_a_continuation_with_no_message_started_closes_the_socket_with_1002(client):
    sock = await connect(client, "stray-continuation")
    await sock.send(OP_CONT, PING)
    await expect_failed(sock, 1002)


async def test_a_new_text_frame_while_a_fragmented_message_is_open_closes_the_socket_with_1002(client):
    sock = await connect(client, "interleaved-text")
    await sock.send(OP_TEXT, b'{"type":', fin=False)
    await sock.send(OP_TEXT, PING)
    await expect_failed(sock, 1002)


# UTF-8 (RFC 8.1): a text message is checked as a whole, across its fragments.


async def test_invalid_utf8_straddling_two_fragments_closes_the_socket_with_1007(client):
    sock = await connect(client, "bad-utf8")
    await sock.send(OP_TEXT, b"price \xe2\x82", fin=False)
    await sock.send(OP_CONT, b"\x28 five")
    await expect_failed(sock, 1007)


async def test_invalid_utf8_in_a_single_text_frame_closes_the_socket_with_1007(client):
    sock = await connect(client, "bad-utf8-single")
    await sock.send(OP_TEXT, b"\xff\xfe hello")
    await expect_failed(sock, 1007)


async def test_valid_utf8_split_in_the_middle_of_a_character_is_accepted(client):
    sock = await connect(client, "split-euro")
    euro = '{"type":"ping","note":"€"}'.encode()
    cut = euro.index(b"\xe2") + 1
    await sock.send(OP_TEXT, euro[:cut], fin=False)
    await sock.send(OP_CONT, euro[cut : cut + 1], fin=False)  # b"\x82": still mid-character
    await sock.send(OP_CONT, euro[cut + 1 :])
    await sock.expect_pong()
    sock.close()


# The hard size limit (MAX_FRAME_BYTES): 1009.


async def test_a_message_whose_fragments_add_up_to_more_than_the_limit_closes_the_socket_with_1009(make_client):
    client = await make_client(max_frame_bytes=4096, max_message_bytes=4096)
    sock = await connect(client, "too-big-fragments")
    await sock.send(OP_TEXT, b"a" * 500, fin=False)
    for _ in range(9):  # 5000 bytes in all, no single frame near the limit
        await sock.send(OP_CONT, b"a" * 500, fin=False)
    await sock.send(OP_CONT, b"a" * 500)
    await expect_failed(sock, 1009)


async def test_a_frame_announcing_more_than_the_limit_closes_the_socket_with_1009_before_its_payload(make_client):
    client = await make_client(max_frame_bytes=4096, max_message_bytes=4096)
    sock = await connect(client, "too-big-header")
    # A 64-bit length and a masking key, and not one byte of the payload.
    await sock.write(header(OP_TEXT, 1 << 32) + os.urandom(4))
    await expect_failed(sock, 1009)


async def test_a_message_under_the_limit_in_fragments_is_served(make_client):
    client = await make_client(max_frame_bytes=4096, max_message_bytes=4096)
    sock = await connect(client, "fragments-under-limit")
    padded = b'{"type":"ping","pad":"' + b"p" * 3000 + b'"}'
    for i in range(0, len(padded), 500):
        last = i + 500 >= len(padded)
        await sock.send(OP_TEXT if i == 0 else OP_CONT, padded[i : i + 500], fin=last)
    await sock.expect_pong()
    sock.close()


async def test_a_message_of_exactly_the_limit_is_served(make_client):
    client = await make_client(max_frame_bytes=4096, max_message_bytes=4096)
    sock = await connect(client, "exactly-the-limit")
    prefix, suffix = b'{"type":"ping","pad":"', b'"}'
    exact = prefix + b"p" * (4096 - len(prefix) - len(suffix)) + suffix
    assert len(exact) == 4096
    await sock.send(OP_TEXT, exact)
    await sock.expect_pong()
    sock.close()


async def test_a_frame_with_a_64_bit_length_is_served(client):
    sock = await connect(client, "long-frame")
    padded = b'{"type":"ping","pad":"' + b"p" * 70_000 + b'"}'
    await sock.send(OP_TEXT, padded)
    await sock.expect_pong()
    sock.close()


# The closing handshake (RFC 5.5.1, 7.4).


async def test_a_client_close_with_1000_and_a_reason_is_answered_with_1000_and_the_connection_closed(client):
    sock = await connect(client, "close-1000")
    await sock.send(OP_CLOSE, close_payload(1000, "bye, für jetzt".encode()))
    await sock.expect_close(1000)
    await sock.expect_eof()
    sock.close()


async def test_a_client_close_with_an_application_code_is_answered_and_the_connection_closed(client):
    sock = await connect(client, "close-4321")
    await sock.send(OP_CLOSE, close_payload(4321, b"app says bye"))
    # RFC 5.5.1: the reply echoes the code.
    opcode, payload = await sock.recv_data()
    assert opcode == OP_CLOSE
    assert struct.unpack("!H", payload[:2])[0] == 4321
    await sock.expect_eof()
    sock.close()


async def test_a_client_close_with_no_payload_is_answered_with_a_close_and_the_connection_closed(client):
    sock = await connect(client, "close-empty")
    await sock.send(OP_CLOSE, b"")
    opcode, payload = await sock.recv_data()
    assert opcode == OP_CLOSE
    # An empty reply, or 1000: both are a normal close (RFC 7.1.5: no status received).
    assert payload == b"" or struct.unpack("!H", payload[:2])[0] == 1000, payload
    await sock.expect_eof()
    sock.close()


async def test_a_close_frame_with_a_one_byte_payload_closes_the_socket_with_1002(client):
    sock = await connect(client, "close-one-byte")
    await sock.send(OP_CLOSE, b"\x03")
    await expect_failed(sock, 1002)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1016, 1100, 2000, 2999])
async def test_a_close_frame_with_a_code_no_endpoint_may_send_closes_the_socket_with_1002(client, code):
    sock = await connect(client, f"close-code-{code}")
    await sock.send(OP_CLOSE, close_payload(code))
    await expect_failed(sock, 1002)


@pytest.mark.parametrize(
    "code",
    [
        1006,
        1015,
    ],
)
async def test_a_close_frame_with_a_code_reserved_for_reporting_closes_the_socket_with_1002(client, code):
    sock = await connect(client, f"close-reserved-{code}")
    await sock.send(OP_CLOSE, close_payload(code))
    await expect_failed(sock, 1002)


async def test_a_close_frame_whose_reason_is_invalid_utf8_closes_the_socket_with_1007(client):
    sock = await connect(client, "close-bad-reason")
    await sock.send(OP_CLOSE, close_payload(1000, b"bye \xc3\x28"))
    await expect_failed(sock, 1007)


# Binary frames are no part of the app protocol, but no protocol error either.


async def test_a_binary_frame_gets_an_unsupported_frame_error_and_the_socket_stays_open(client):
    sock = await connect(client, "binary")
    await sock.send(OP_BINARY, b"\x00\x01\x02 not text")
    error = await sock.event()
    assert error["type"] == "error"
    assert error["code"] == "unsupported_frame"
    await sock.send(OP_BINARY, b"part one", fin=False)  # Fragmented binary too.
    await sock.send(OP_CONT, b" and two")
    assert (await sock.event())["code"] == "unsupported_frame"
    await sock.send(OP_TEXT, PING)
    await sock.expect_pong()
    sock.close()


# The opening handshake (RFC 4.2).


async def test_the_101_response_carries_the_sec_websocket_accept_of_the_key(client):
    key = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3's example
    status, headers, sock = await handshake(client, "accept-key", key=key)
    assert status == 101
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert headers["sec-websocket-accept"] == base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in headers["connection"].lower()
    assert "sec-websocket-extensions" not in headers  # None was asked for.
    assert (await sock.event())["type"] == "session.ready"
    sock.close()


@pytest.mark.parametrize(
    "key",
    [
        "not base64 at all",
        base64.b64encode(os.urandom(15)).decode(),
        base64.b64encode(os.urandom(17)).decode(),
        "",
    ],
    ids=["garbage", "15-bytes", "17-bytes", "empty"],
)
async def test_a_bad_sec_websocket_key_gets_400_and_no_upgrade(client, key):
    status, _, sock = await handshake(client, "bad-key", key=key)
    assert status == 400
    sock.close()


async def test_a_sec_websocket_key_with_characters_outside_base64_gets_400(client):
    status, _, sock = await handshake(client, "junk-key", key="dGhlIHNh*bXBsZSBub25jZQ==")
    assert status == 400
    sock.close()


@pytest.mark.parametrize("version", [None, "12", "14", "99", "abc"], ids=["missing", "12", "14", "99", "abc"])
async def test_a_missing_or_unknown_sec_websocket_version_is_refused(client, version):
    status, _, sock = await handshake(client, f"version-{version}", version=version)
    assert status in (400, 426), status
    sock.close()


async def test_sec_websocket_version_8_is_refused(client):
    status, _, sock = await handshake(client, "version-8", version="8")
    assert status in (400, 426), status
    sock.close()


# After a failed connection: the TCP connection goes, the session is ended and recorded.


async def test_after_a_protocol_error_the_connection_closes_and_the_session_is_recorded_as_ended(client, db):
    sock = await connect(client, "failed-session")
    await sock.send(OP_TEXT, b"abc", rsv=RSV2)
    await expect_failed(sock, 1002)

    async def kinds() -> list[str] | None:
        rows = await db.fetch(
            "select event_type from session_events where session_id = $1 order by id", "failed-session"
        )
        found = [r["event_type"] for r in rows]
        return found if found == ["connected", "disconnected"] else None

    assert await eventually(kinds, timeout=10) == ["connected", "disconnected"]


async def test_after_a_protocol_error_the_stored_close_code_is_the_one_the_server_sent(client, db):
    sock = await connect(client, "failed-code")
    await sock.send(OP_TEXT, b"abc", rsv=RSV2)
    await expect_failed(sock, 1002)

    async def close_code() -> Any:
        return await db.fetchval(
            "select metadata->>'close_code' from session_events where session_id = $1 and event_type = 'disconnected'",
            "failed-code",
        )

    assert await eventually(close_code, timeout=10) == "1002"
