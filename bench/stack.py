"""What every part of the bench stands on: the processes under test (server, upstream) and one conversation turn."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def family(pid: int) -> list[int]:
    """`pid` and its descendants (a gunicorn manager and its worker processes); one that has just exited is left out."""
    pids = [pid]
    for p in pids:  # grows as children are found
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
    return pids


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) of `pid` and its descendants: with WEB_CONCURRENCY > 1, the server's workers."""
    return sum(_cpu_s(p) for p in family(pid))


def proc_rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its descendants, summed."""
    return sum(_rss_kib(p) for p in family(pid))


async def wait_http(url: str, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer")
            await asyncio.sleep(0.1)


@dataclass
class Stack:
    """The processes under test, and how to reach them."""

    server: asyncio.subprocess.Process
    upstream: asyncio.subprocess.Process
    server_url: str
    upstream_url: str
    database_url: str
    redis_url: str
    http: aiohttp.ClientSession = field(
        default_factory=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    )

    async def pace(self, *, tokens: int, ttft_s: float, gap_s: float) -> None:
        await self.http.post(f"{self.upstream_url}/pace", json={"tokens": tokens, "ttft_s": ttft_s, "gap_s": gap_s})

    async def upstream_timings(self) -> dict[str, list[float]]:
        """For each request since the last `pace`, by its last message's text: arrived, first chunk, last chunk."""
        async with self.http.get(f"{self.upstream_url}/timings") as resp:
            return orjson.loads(await resp.read())  # type: ignore[no-any-return]


async def start_upstream(port: int, *, prefix: Sequence[str] = ()) -> asyncio.subprocess.Process:
    """bench/upstream.py in a process of its own, listening on `port`; returns once it answers. `prefix` goes before
    the command (e.g. `taskset -c 1`)."""
    upstream = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-m",
        "bench.upstream",
        "--port",
        str(port),
        cwd=REPO,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/timings")
    except BaseException:
        upstream.terminate()
        await upstream.wait()
        raise
    return upstream


async def start_server(
    database_url: str, redis_url: str, upstream_url: str, port: int, *, prefix: Sequence[str] = (), **extra_env: str
) -> asyncio.subprocess.Process:
    """`python -m server` on `port` against the upstream at `upstream_url`; returns once it answers /healthz."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "PORT": str(port),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": f"{upstream_url}/v1",
        "OPENAI_MODEL": "bench",
        "LOG_LEVEL": "WARNING",
        "MESSAGES_PER_MINUTE": "100000",
        "HISTORY_LIMIT": "50",
        # Summary jobs at once, as the summaries part measures (a value in .env must not defer them).
        "SUMMARY_DELAY_S": "0",
        **extra_env,
    }
    server = await asyncio.create_subprocess_exec(*prefix, sys.executable, "-m", "server", env=env, cwd=REPO)
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz")
    except BaseException:
        server.terminate()
        await server.wait()
        raise
    return server


async def start_stack(database_url: str, redis_url: str, **extra_env: str) -> Stack:
    up_port, server_port = free_port(), free_port()
    upstream = await start_upstream(up_port)
    upstream_url = f"http://127.0.0.1:{up_port}"
    try:
        server = await start_server(database_url, redis_url, upstream_url, server_port, **extra_env)
    except BaseException:
        upstream.terminate()
        await upstream.wait()
        raise
    return Stack(server, upstream, f"http://127.0.0.1:{server_port}", upstream_url, database_url, redis_url)


async def stop_stack(stack: Stack) -> None:
    await stack.http.close()
    for proc in (stack.server, stack.upstream):
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


@asynccontextmanager
async def running_stack(**extra_env: str) -> AsyncIterator[Stack]:
    """The stack on the environment's database and Redis (DATABASE_URL and REDIS_URL, else their TEST_ forms), the
    machine it runs on printed first; the open-file limit is raised for the thousands of sockets a run opens."""
    database_url = os.environ.get("DATABASE_URL") or os.environ["TEST_DATABASE_URL"]
    redis_url = os.environ.get("REDIS_URL") or os.environ["TEST_REDIS_URL"]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stack = await start_stack(database_url, redis_url, **extra_env)
    try:
        print(f"bench: {os.cpu_count()} cores, Python {sys.version.split()[0]}, server pid {stack.server.pid}")
        yield stack
    finally:
        await stop_stack(stack)


# One turn of a conversation through the server.


@dataclass
class Turn:
    sent: float = 0.0
    first_delta: float | None = None
    stored: float | None = None
    done: float | None = None
    tokens: int = 0


async def open_session(stack: Stack, session_id: str) -> aiohttp.ClientWebSocketResponse:
    ws = await stack.http.ws_connect(f"{stack.server_url}/ws/session/{session_id}", max_msg_size=0)
    ready = orjson.loads((await ws.receive()).data)
    assert ready["type"] == "session.ready", ready
    return ws


async def converse(ws: aiohttp.ClientWebSocketResponse, marker: str, turn: Turn) -> None:
    turn.sent = time.time()
    await ws.send_str(orjson.dumps({"type": "message", "text": marker, "client_msg_id": marker}).decode())
    while turn.done is None or turn.stored is None:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"socket closed: {msg}")
        event = orjson.loads(msg.data)
        kind = event["type"]
        if kind == "response.delta":
            turn.tokens += event["delta"].count(" ")
            if turn.first_delta is None:
                turn.first_delta = time.time()
        elif kind == "response.done":
            turn.done = time.time()
        elif kind == "message.stored" and event["role"] == "user":
            turn.stored = time.time()


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"
