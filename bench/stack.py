"""What every part of the bench stands on: the processes under test (server, upstream) and one conversation turn."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
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


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


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
    http: aiohttp.ClientSession = field(
        default_factory=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    )

    async def pace(self, *, tokens: int, ttft_s: float, gap_s: float) -> None:
        await self.http.post(f"{self.upstream_url}/pace", json={"tokens": tokens, "ttft_s": ttft_s, "gap_s": gap_s})

    async def upstream_timings(self) -> dict[str, list[float]]:
        """For each request since the last `pace`, by its last message's text: arrived, first chunk, last chunk."""
        async with self.http.get(f"{self.upstream_url}/timings") as resp:
            return orjson.loads(await resp.read())  # type: ignore[no-any-return]


async def start_stack(database_url: str, redis_url: str) -> Stack:
    python = sys.executable
    up_port, server_port = free_port(), free_port()
    upstream = await asyncio.create_subprocess_exec(
        python, "-m", "bench.upstream", "--port", str(up_port), cwd=REPO, stderr=asyncio.subprocess.DEVNULL
    )
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "PORT": str(server_port),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
        "OPENAI_MODEL": "bench",
        "LOG_LEVEL": "WARNING",
        "MESSAGES_PER_MINUTE": "100000",
        "HISTORY_LIMIT": "50",
        # Summary jobs at once, as the summaries part measures (a value in .env must not defer them).
        "SUMMARY_DELAY_S": "0",
    }
    server = await asyncio.create_subprocess_exec(python, "-m", "server", env=env, cwd=REPO)
    stack = Stack(server, upstream, f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{up_port}", database_url)
    await wait_http(f"{stack.upstream_url}/timings")
    await wait_http(f"{stack.server_url}/healthz")
    return stack


async def stop_stack(stack: Stack) -> None:
    await stack.http.close()
    for proc in (stack.server, stack.upstream):
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


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
