"""The streamed request's HTTP/1.1 client against real sockets: servers that write exact bytes, cut where we say."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from yarl import URL

from core.llm.http1 import HTTPFailure, Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
    return head + await reader.readexactly(length)


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[Server, Pool]]]]:
    servers: list[asyncio.Server] = []
    pools: list[Pool] = []

    async def start(handler: Handler) -> tuple[Server, Pool]:
        s = Server(handler)
        server = await asyncio.start_server(s._serve, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(URL(f"http://127.0.0.1:{port}/v1/chat/completions"), {"X-Key": "k"}, connect_timeout_s=2)
        pools.append(pool)
        return s, pool

    yield start
    for pool in pools:
        pool.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def _body(pool: Pool, payload: bytes = b"{}") -> tuple[int, bytes, Pool]:
    exchange = pool.post(payload)
    await exchange.start()
    parts = []
    while data := await exchange.read():
        parts.append(data)
    exchange.release()
    return exchange.status, b"".join(parts), pool


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in sizes:
        piece = body[pos : pos + size]
        pos += size
        if piece:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n\r\n"


async def test_a_chunked_body_cut_into_writes_at_random_places_arrives_whole_and_the_connection_is_reused(serve):
    body = b"".join(b'data: {"n": %d}\n\n' % i for i in range(200))
    rng = random.Random(7)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _request(reader)
            except asyncio.IncompleteReadError:
                return
            wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            wire += _chunked(body, [rng.randint(1, 60) for _ in range(len(body))])
            # The response written in random slices, each its own read on our side.
            pos = 0
            while pos < len(wire):
                step = rng.randint(1, 40)
                writer.write(wire[pos : pos + step])
                await writer.drain()
                await asyncio.sleep(0)
                pos += step

    server, pool = await serve(handler)
    for _ in range(5):
        status, got, _ = await _body(pool)
        assert (status, got) == (200, body)
    assert server.connections == 1


async def test_the_request_carries_the_headers_the_length_and_the_body(serve):
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    _, pool = await serve(handler)
    status, got, _ = await _body(pool, b'{"model":"m"}')
    assert (status, got) == (200, b"ok")
    head, _, payload = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert b"X-Key: k" in lines and b"Content-Length: 13" in lines
    assert any(line.startswith(b"Host: 127.0.0.1:") for line in lines)
    assert payload == b'{"model":"m"}'


async def test_a_body_delimited_by_the_close_and_an_interim_response_are_read(serve):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Unavailable\r\nRetry-After: 3\r\n\r\n")
        writer.write(b'{"error": "busy"}')
        await writer.drain()

    server, pool = await serve(handler)
    exchange = pool.post(b"{}")
    await exchange.start()
    assert exchange.status == 503 and exchange.headers["retry-after"] == "3"
    assert await exchange.read() == b'{"error": "busy"}'
    assert await exchange.read() == b""
    exchange.release()
    # Not reusable (it ended with the close): the next request opens a new connection.
    await _body(pool)
    assert server.connections == 2


async def test_a_response_cut_midway_fails_the_read(serve):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwo")
        await writer.drain()

    _, pool = await serve(handler)
    exchange = pool.post(b"{}")
    await exchange.start()
    got = b""
    with pytest.raises(HTTPFailure):
        while data := await exchange.read():
            got += data
    assert got.startswith(b"hello")
    exchange.close()


async def test_a_kept_alive_connection_the_server_closed_is_replaced_and_the_request_sent_again(serve):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Keep-alive as far as the client knows, then closed while idle: the next request finds it dead.

    server, pool = await serve(handler)
    assert (await _body(pool))[:2] == (200, b"ok")
    await asyncio.sleep(0.05)
    assert (await _body(pool))[:2] == (200, b"ok")
    assert server.connections == 2


async def test_garbage_instead_of_http_and_a_refused_connection_are_failures(serve, unused_tcp_port):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    _, pool = await serve(handler)
    exchange = pool.post(b"{}")
    with pytest.raises(HTTPFailure, match=r"not an HTTP/1\.1 response"):
        await exchange.start()
    exchange.close()

    refused = Pool(URL(f"http://127.0.0.1:{unused_tcp_port}/x"), {}, connect_timeout_s=2)
    exchange = refused.post(b"{}")
    with pytest.raises(HTTPFailure, match="could not connect"):
        await exchange.start()
    refused.close()


async def test_a_consumer_that_does_not_read_pauses_the_socket_and_loses_nothing(serve):
    piece = b"x" * 65536

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(piece) * 64))
        for _ in range(64):
            writer.write(piece)
            await writer.drain()

    _, pool = await serve(handler)
    exchange = pool.post(b"{}")
    await exchange.start()
    await asyncio.sleep(0.3)  # the server writes meanwhile, as far as our paused socket lets it
    total = 0
    while data := await exchange.read():
        total += len(data)
    assert total == len(piece) * 64
    exchange.release()


async def test_https_is_spoken_and_the_certificate_checked(tmp_path):
    # A self-signed certificate for 127.0.0.1, made for the test; the client trusts it and nothing else.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await proc.wait() == 0
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecure\r\n0\r\n\r\n")
            await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    url = URL(f"https://127.0.0.1:{port}/v1/chat/completions")
    trusting = Pool(url, {}, connect_timeout_s=2, ssl_context=ssl.create_default_context(cafile=str(cert)))
    untrusting = Pool(url, {}, connect_timeout_s=2)
    try:
        assert (await _body(trusting))[:2] == (200, b"secure")
        exchange = untrusting.post(b"{}")
        with pytest.raises(HTTPFailure, match="certificate verify failed"):
            await exchange.start()
    finally:
        trusting.close()
        untrusting.close()
        server.close()
        await server.wait_closed()


async def test_an_ipv6_origin_is_reached_and_named_in_brackets():
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    try:
        server = await asyncio.start_server(handler, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = server.sockets[0].getsockname()[1]
    pool = Pool(URL(f"http://[::1]:{port}/v1/chat/completions"), {}, connect_timeout_s=2)
    try:
        assert (await _body(pool))[:2] == (200, b"ok")
        assert f"Host: [::1]:{port}".encode() in seen[0].split(b"\r\n")
    finally:
        pool.close()
        server.close()
        await server.wait_closed()
