"""Idle sockets: how much server memory each costs, and whether every one is still served.

The clients run in processes of their own (`python -m bench.idle --client`), a few thousand each, from several
loopback source addresses, so neither one process's open-file limit nor one address's ephemeral ports cap the
count. The server's own open-file limit does: the bench raises it to the hard limit, and says when that is below
what was asked.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys

import aiohttp
import orjson

from .stack import REPO, proc_rss_kib

PER_CLIENT = 5_000
# Sockets the server needs besides the clients' (listening, database, Redis, upstream, files).
_SPARE_FDS = 200


def capacity(requested: int) -> int:
    """How many sockets a server started from this process may hold (the open-file hard limit, less a margin)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(requested, hard - _SPARE_FDS) if hard != resource.RLIM_INFINITY else requested


async def hold(url: str, server_pid: int, connections: int) -> dict[str, float | int | bool]:
    """Open `connections` idle sessions on the server at `url` and measure; every socket answers a ping."""
    rss0 = proc_rss_kib(server_pid)
    clients = []
    opened = 0
    # One client process connecting at a time: thousands of connects at once would time out at the store.
    for start in range(0, connections, PER_CLIENT):
        count = min(PER_CLIENT, connections - start)
        source = f"127.0.0.{2 + start // PER_CLIENT % 250}"
        clients.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.idle", "--client", url, str(start), str(count), source,
                cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
        )  # fmt: skip
        assert clients[-1].stdout is not None
        opened += int((await clients[-1].stdout.readline()) or b"0")
    try:
        await asyncio.sleep(2)
        rss1 = proc_rss_kib(server_pid)
        answered = 0
        for client in clients:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"ping\n")
            await client.stdin.drain()
            answered += int((await client.stdout.readline()) or b"0")
    finally:
        for client in clients:
            if client.returncode is None:
                client.kill()
            await client.wait()
    return {
        "connections": opened,
        "kib_per_connection": (rss1 - rss0) / max(opened, 1),
        "held": answered == opened == connections,
        "answered": answered,
    }


async def client(url: str, first: int, count: int, source: str) -> None:
    """Open `count` sessions, print how many opened; on "ping" from stdin ping every one, print how many answered."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    connector = aiohttp.TCPConnector(limit=0, local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        # A reader per socket, as any real client has: it answers the server's control pings (aiohttp's client
        # does only while reading) and hands each pong to whoever pinged.
        pongs: dict[aiohttp.ClientWebSocketResponse, asyncio.Future[bool]] = {}

        async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT and orjson.loads(msg.data)["type"] == "pong":
                    waiter = pongs.pop(ws, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(True)

        async def one(i: int) -> aiohttp.ClientWebSocketResponse:
            ws = await http.ws_connect(f"{url}/ws/session/idle-{i}", heartbeat=None, autoping=True)
            await ws.receive()  # session.ready
            return ws

        sockets: list[aiohttp.ClientWebSocketResponse] = []
        readers = []
        for start in range(first, first + count, 200):
            batch = await asyncio.gather(
                *(one(i) for i in range(start, min(first + count, start + 200))), return_exceptions=True
            )
            opened = [ws for ws in batch if isinstance(ws, aiohttp.ClientWebSocketResponse)]
            sockets += opened
            readers += [asyncio.create_task(read(ws)) for ws in opened]
        # Those that failed to open are counted out: the figure says how many the server took.
        print(len(sockets), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def ping(ws: aiohttp.ClientWebSocketResponse) -> bool:
            waiter = pongs[ws] = asyncio.get_running_loop().create_future()
            try:
                await ws.send_str('{"type":"ping"}')
                return await asyncio.wait_for(waiter, timeout=30)
            except (TimeoutError, aiohttp.ClientError):
                return False

        answered = 0
        for start in range(0, len(sockets), 500):
            answered += sum(await asyncio.gather(*(ping(ws) for ws in sockets[start : start + 500])))
        print(answered, flush=True)
        for reader in readers:
            reader.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.idle")
    parser.add_argument("--client", nargs=4, metavar=("URL", "FIRST", "COUNT", "SOURCE"), required=True)
    url, first, count, source = parser.parse_args().client
    asyncio.run(client(url, int(first), int(count), source))
