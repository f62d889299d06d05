"""A small HTTP/1.1 client for one kind of request: a POST whose response body streams back, on kept-alive
connections to one origin.

Why not aiohttp's client here: on Python 3.11 it writes a request's body from a task of its own, so every request
waits a turn of the event loop before it leaves, and each read of the response wakes a task through a StreamReader.
On the streamed path that is the user's time to first token (bench/RESULTS.md, issue 19). Here a request on an idle
kept-alive connection is written at once, by the caller, with no await; the response is parsed as it arrives. The
`openai` client and aiohttp remain for everything that is not this one streamed request.

What it covers: `Content-Length`, chunked and close-delimited bodies; TLS; a pool of idle connections closed after
`keepalive_s`; a request written on a kept-alive connection that the server had closed meanwhile is sent again on a
new one (the server cannot have seen it: nothing came back). It does not follow redirects, speak HTTP/2 or use a
proxy; the service's aiohttp client did none of these either.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping

from yarl import URL

# A response head larger than this is not a provider's: the connection is dropped.
_MAX_HEAD = 64 * 1024
# Body bytes buffered and not yet read past which the socket stops being read (the consumer is slow).
_HIGH_WATER = 256 * 1024


class HTTPFailure(Exception):
    """The connection could not be made, broke, or carried something that is not HTTP/1.1."""


class Pool:
    """Kept-alive connections to one origin (scheme, host and port of `url`); requests go to `url`'s path."""

    def __init__(
        self,
        url: URL,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float,
        keepalive_s: float = 30.0,
        max_idle: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) URL: {url}")
        self._host = url.raw_host or url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._max_idle = max_idle
        # The wire form: IDNA-encoded, an IPv6 address in brackets, the port only when not the scheme's own.
        host = f"[{self._host}]" if ":" in self._host else self._host
        if not url.is_default_port():
            host = f"{host}:{self._port}"
        lines = [f"POST {url.raw_path_qs} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
        # Everything but the body's length is the same for every request: built once.
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._idle: list[_Connection] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def post(self, body: bytes) -> Exchange:
        """Start the request: written now when an idle connection is at hand, else once one is connected. The
        response's status and headers come with `Exchange.start`, and so does any failure."""
        request = b"%s%d\r\n\r\n%s" % (self._head, len(body), body)
        exchange = Exchange(self, request)
        if self._closed:
            # Never raises: the failure comes with `start`, as a connection's would.
            exchange.fail(HTTPFailure("the client is closed"))
            return exchange
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now - self._keepalive_s):
                conn.send(exchange, reused=True)
                return exchange
            conn.close()
        exchange.connecting = loop.create_task(self._connect(exchange))
        return exchange

    async def _connect(self, exchange: Exchange) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            exchange.fail(HTTPFailure(f"connecting to {self._host}:{self._port} timed out"))
            return
        except (OSError, ssl.SSLError) as e:
            exchange.fail(HTTPFailure(f"could not connect to {self._host}:{self._port}: {e}"))
            return
        finally:
            exchange.connecting = None
        if exchange.done:
            # Given up on (closed, or failed by its deadline) while connecting: the connection is kept for the next.
            self.put_back(conn)
        else:
            conn.send(exchange, reused=False)

    def retry(self, exchange: Exchange) -> None:
        """The kept-alive connection it was written on turned out closed: write it again on a new one."""
        exchange.connecting = asyncio.get_running_loop().create_task(self._connect(exchange))

    def put_back(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive_s, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for longer than `keepalive_s` (the server would close them soon anyway)."""
        self._sweeper = None
        oldest = asyncio.get_running_loop().time() - self._keepalive_s
        keep = []
        for conn in self._idle:
            if conn.usable(oldest):
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep
        if keep:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive_s / 2, self._sweep)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class Exchange:
    """One request and its response. `start` waits for the status and headers, `read` for the next body bytes
    (b"" at the end); `release` hands a fully read connection back for reuse, `close` drops it."""

    __slots__ = (
        "_body",
        "_buffered",
        "_conn",
        "_error",
        "_pool",
        "_waiter",
        "connecting",
        "eof",
        "headers",
        "request",
        "sent_at",
        "status",
    )

    def __init__(self, pool: Pool, request: bytes) -> None:
        self._pool = pool
        self.request = request
        # Loop time of the request's start, which the first-token deadline counts from.
        self.sent_at = asyncio.get_running_loop().time()
        self._conn: _Connection | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._buffered = 0
        self.eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self._error is not None

    async def start(self) -> None:
        """Wait for the response's status line and headers."""
        while not self.status:
            await self._wait()

    async def read(self) -> bytes:
        """The body bytes that arrived since the last read (waiting for some), or b"" once the body ended."""
        while not self._body:
            if self.eof:
                return b""
            await self._wait()
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        if self._buffered > _HIGH_WATER and self._conn is not None:
            self._conn.resume()
        self._buffered = 0
        return data

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def set_exception(self, error: BaseException) -> None:
        """Fail the pending and later reads with `error`; the connection is dropped (the deadline's way out)."""
        self.fail(error)
        self.close()

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(self, reuse=self.eof and self._error is None)

    def close(self) -> None:
        """Drop the connection (the provider stops generating) and stop connecting."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(self, reuse=False)
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self._error is None:
            self._error = HTTPFailure("the request was closed")

    # Called by the connection.

    def attached(self, conn: _Connection | None) -> None:
        self._conn = conn

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers
        # Kept only to send again on a kept-alive connection found closed; a response came, so that is past.
        self.request = b""
        self._wake()

    def feed(self, data: bytes) -> bool:
        """Body bytes; False once the consumer is far behind (the connection pauses reading)."""
        self._body.append(data)
        self._buffered += len(data)
        self._wake()
        return self._buffered <= _HIGH_WATER

    def end(self) -> None:
        self.eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: writes a request, parses its response into the exchange."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._exchange: Exchange | None = None
        self._reused = False
        self._got_bytes = False
        self._buf = b""
        # The body's framing: "head" (not parsed yet), "length", "chunked", "close" (until EOF) or "done".
        self._state = "head"
        self._left = 0  # length: bytes of body left; chunked: bytes of the current chunk left (+2 for its CRLF)
        self._keep_alive = True
        self._paused = False
        self.idle_since = 0.0

    def usable(self, oldest: float) -> bool:
        t = self._transport
        return t is not None and not t.is_closing() and self.idle_since >= oldest

    def send(self, exchange: Exchange, *, reused: bool) -> None:
        assert self._transport is not None
        self._exchange = exchange
        self._reused = reused
        self._got_bytes = False
        self._buf = b""
        self._state = "head"
        exchange.attached(self)
        self._transport.write(exchange.request)

    def finished(self, exchange: Exchange, *, reuse: bool) -> None:
        if self._exchange is not exchange:
            return
        self._exchange = None
        if reuse and self._keep_alive and self._state == "done" and not self._buf:
            self.resume()
            self._pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def resume(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            # Nothing was asked: a server that talks out of turn is not reused.
            self._keep_alive = False
            self.close()
            return
        self._got_bytes = True
        try:
            if self._state == "head":
                data = self._head(exchange, self._buf + data if self._buf else data)
                if self._state == "head":
                    return
            if self._state == "chunked":
                self._chunks(exchange, self._buf + data if self._buf else data)
            elif self._state == "length":
                self._length(exchange, data)
            elif self._state == "close":
                if data:
                    self._feed(exchange, data)
            elif data:
                # Bytes after the body: not a connection to reuse.
                self._keep_alive = False
        except HTTPFailure as e:
            self._keep_alive = False
            exchange.fail(e)
            self.close()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        exchange, self._exchange = self._exchange, None
        if exchange is None or self._state == "done":
            return
        if self._state == "close":
            exchange.end()
        elif self._reused and not self._got_bytes:
            # The server had closed the idle connection before our request reached it: it never saw the request.
            exchange.attached(None)
            self._pool.retry(exchange)
        else:
            exchange.fail(HTTPFailure("the connection closed before the response was complete"))

    # Parsing.

    def _head(self, exchange: Exchange, data: bytes) -> bytes:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > _MAX_HEAD:
                raise HTTPFailure("the response head is too large")
            self._buf = data
            return b""
        self._buf = b""
        lines = data[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HTTPFailure(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
        status = int(parts[1])
        if status < 200:
            # 1xx (100 Continue, 103 Early Hints): another head follows.
            return self._head(exchange, data[end + 4 :])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HTTPFailure("a malformed response header")
            headers[name.strip().lower()] = value.strip()
        if parts[0] == "HTTP/1.0" or "close" in headers.get("connection", "").lower():
            self._keep_alive = False
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state, self._left = "chunked", 0
        elif (length := headers.get("content-length")) is not None:
            if not length.isdigit():
                raise HTTPFailure("a malformed Content-Length")
            self._state, self._left = "length", int(length)
        elif status in (204, 304):
            self._state, self._left = "length", 0
        else:
            self._state, self._keep_alive = "close", False
        exchange.head(status, headers)
        if self._state == "length" and self._left == 0:
            self._state = "done"
            exchange.end()
        return data[end + 4 :]

    def _feed(self, exchange: Exchange, data: bytes) -> None:
        if not exchange.feed(data) and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _length(self, exchange: Exchange, data: bytes) -> None:
        if not data:
            return
        if len(data) >= self._left:
            if len(data) > self._left:
                self._keep_alive = False
            data = data[: self._left]
            self._left = 0
            self._state = "done"
            if data:
                self._feed(exchange, data)
            exchange.end()
        else:
            self._left -= len(data)
            self._feed(exchange, data)

    def _chunks(self, exchange: Exchange, data: bytes) -> None:
        """Chunked transfer coding: `size CRLF data CRLF`, repeated, ended by a zero size and the trailers."""
        self._buf = b""
        pos, n = 0, len(data)
        out: list[bytes] = []
        while pos < n:
            if self._left > 0:
                # Inside a chunk: its data, then its CRLF (counted in _left).
                take = min(self._left, n - pos)
                data_left = self._left - 2
                if data_left > 0:
                    out.append(data[pos : pos + min(take, data_left)])
                self._left -= take
                pos += take
                continue
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                self._buf = data[pos:]
                if len(self._buf) > _MAX_HEAD:
                    raise HTTPFailure("a malformed chunk size")
                break
            size_text = data[pos:line_end].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HTTPFailure("a malformed chunk size") from None
            if size == 0:
                # The last chunk; the trailers (usually none) end with an empty line.
                end = data.find(b"\r\n\r\n", line_end)
                if end < 0:
                    self._buf = data[pos:]
                    break
                if out:
                    self._feed(exchange, b"".join(out))
                    out = []
                if end + 4 < n:
                    self._keep_alive = False
                self._state = "done"
                exchange.end()
                return
            self._left = size + 2
            pos = line_end + 2
        if out:
            self._feed(exchange, out[0] if len(out) == 1 else b"".join(out))
