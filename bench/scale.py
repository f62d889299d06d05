"""Scale out on one machine (issue 16): several server processes, idle sockets across them, a real HAProxy in front,
and uvloop against asyncio. `python -m bench.scale`, under scripts/with-services.sh.

1. Relay throughput with WEB_CONCURRENCY=1, 2 and one per core (the upstream streams as fast as it can).
2. Idle WebSockets held by one process and by two: server memory per connection, and every one still answers.
3. Messages per second through HAProxy (deploy/haproxy.cfg, as tests/lb.py rewrites it) in front of two servers,
   against the same load direct to one.
4. EVENT_LOOP=uvloop against asyncio, one process: relay throughput, CPU per token, added time to first token.

Server CPU and memory are summed over the server's processes (gunicorn's manager and its workers). Each
configuration runs `--rounds` times, alternating, with a fresh server each time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from .idle import capacity, hold
from .run import floor, relay
from .stack import Stack, Turn, converse, family, free_port, open_session, start_server, start_upstream, wait_http

HAPROXY = "/usr/sbin/haproxy"


class Cores:
    """Where each part runs: with more than 4 cores, the load generator (this process) on core 0, the upstream on
    core 1 and the servers on the rest; otherwise everything shares every core."""

    def __init__(self) -> None:
        n = os.cpu_count() or 1
        self.pinned = n > 4
        self.upstream: list[str] = ["taskset", "-c", "1"] if self.pinned else []
        self.server: list[str] = ["taskset", "-c", f"2-{n - 1}"] if self.pinned else []
        if self.pinned:
            os.sched_setaffinity(0, {0})

    def describe(self) -> str:
        if self.pinned:
            return f"load generator on core 0, upstream on core 1, servers on cores 2-{(os.cpu_count() or 1) - 1}"
        return (
            f"{os.cpu_count()} cores: load generator, upstream, servers, PostgreSQL and Redis share them (not pinned)"
        )


class Bench:
    def __init__(self, args: argparse.Namespace, cores: Cores, upstream: asyncio.subprocess.Process, port: int) -> None:
        self.args, self.cores, self.upstream = args, cores, upstream
        self.upstream_url = f"http://127.0.0.1:{port}"
        self.database_url = os.environ.get("DATABASE_URL") or os.environ["TEST_DATABASE_URL"]
        self.redis_url = os.environ.get("REDIS_URL") or os.environ["TEST_REDIS_URL"]
        self.runs = 0

    def label(self, name: str) -> str:
        self.runs += 1
        return f"{name}{self.runs}"

    @asynccontextmanager
    async def server(self, *, processes: int = 1, event_loop: str = "asyncio", port: int = 0) -> AsyncIterator[Stack]:
        """A fresh `python -m server` (under gunicorn when `processes` > 1), every worker up, stopped afterwards."""
        port = port or free_port()
        proc = await start_server(
            self.database_url, self.redis_url, self.upstream_url, port, prefix=self.cores.server,
            WEB_CONCURRENCY=str(processes), EVENT_LOOP=event_loop, MAX_CONNECTIONS=str(self.args.idle + 1000),
        )  # fmt: skip
        # The upstream is shared by every server, and stopped at the end of the run only.
        stack = Stack(
            proc, self.upstream, f"http://127.0.0.1:{port}", self.upstream_url, self.database_url, self.redis_url
        )
        try:
            deadline = time.monotonic() + 30
            while processes > 1 and len(family(proc.pid)) < processes + 1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{processes} workers did not start")
                await asyncio.sleep(0.1)
            await asyncio.sleep(1 if processes > 1 else 0)  # each worker opens its pools before it serves
            yield stack
        finally:
            await stack.http.close()
            await stop(proc)


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, as an orchestrator stops it; SIGKILL to the whole family if it has not exited within 30 s."""
    if proc.returncode is not None:
        return
    pids = family(proc.pid)
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        for pid in pids:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()


# 1 and 4: relay throughput, CPU per token, added time to first token.


async def throughput(bench: Bench, stack: Stack) -> dict[str, Any]:
    await stack.pace(tokens=bench.args.tokens, ttft_s=0, gap_s=0)
    return await relay(stack, sessions=bench.args.sessions, label=bench.label("tput"))


async def scale_relay(bench: Bench) -> None:
    counts = sorted({1, 2, os.cpu_count() or 1})
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    floors: list[float] = []
    async with bench.server() as stack:
        await throughput(bench, stack)  # warm-up, not counted: the first run after the database starts is slower
    for _ in range(bench.args.rounds):
        for n in counts:
            async with bench.server(processes=n) as stack:
                results[n].append(await throughput(bench, stack))
                if n == 1:  # the same streams read straight from the upstream, by this same load generator
                    direct = await floor(stack, streams=bench.args.sessions, label=bench.label("floor"))
                    floors.append(direct["tokens_per_s"])
    print(f"\n1. relay throughput, {bench.args.sessions} sessions x {bench.args.tokens} tokens, upstream unpaced")
    print(f"{'processes':>9} {'round':>5} {'tokens/s':>10} {'server CPU/token':>17} {'ratio to 1':>10}")
    for n in counts:
        for i, r in enumerate(results[n]):
            ratio = r["tokens_per_s"] / results[1][i]["tokens_per_s"]
            print(f"{n:>9} {i + 1:>5} {r['tokens_per_s']:>10,.0f} {r['cpu_us_per_token']:>14.1f} µs {ratio:>10.2f}")
    for i, f in enumerate(floors):
        print(f"{'direct':>9} {i + 1:>5} {f:>10,.0f}  (no server: the load generator reading the upstream itself)")


async def event_loops(bench: Bench) -> None:
    rows: list[tuple[str, int, dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    for i in range(bench.args.rounds):
        for loop in ("asyncio", "uvloop") if i % 2 == 0 else ("uvloop", "asyncio"):
            async with bench.server(event_loop=loop) as stack:
                t = await throughput(bench, stack)
                # The added time to first token as `python -m bench` measures it: 50 tokens 20 ms apart after 100 ms.
                await stack.pace(tokens=50, ttft_s=0.1, gap_s=0.02)
                burst = await relay(stack, sessions=100, label=bench.label("burst"))
                spread = await relay(stack, sessions=100, label=bench.label("spread"), spread_s=2.0)
            rows.append((loop, i + 1, t, burst, spread))
    print("\n4. event loop, one process: throughput as in 1; added time to first token in the server, 100 sessions")
    print(
        f"{'loop':>8} {'round':>5} {'tokens/s':>10} {'CPU/token':>10} {'100 at once p50/p99':>22}"
        f" {'100 over 2 s p50/p99':>22}"
    )
    for loop, i, t, burst, spread in rows:
        print(
            f"{loop:>8} {i:>5} {t['tokens_per_s']:>10,.0f} {t['cpu_us_per_token']:>7.1f} µs"
            f" {_ms(burst['server_added_p50'], burst['server_added_p99']):>22}"
            f" {_ms(spread['server_added_p50'], spread['server_added_p99']):>22}"
        )


def _ms(a: float, b: float) -> str:
    return f"{a * 1000:.2f} / {b * 1000:.2f} ms"


# 2: idle connections.


def accepted(port: int, pids: list[int]) -> dict[int, int]:
    """For each of `pids`, its established TCP connections on local `port` (the clients it holds)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in pids:
        with suppress(OSError):
            counts[pid] = sum(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
    return counts


async def idle(bench: Bench) -> None:
    count = capacity(bench.args.idle)
    print(f"\n2. idle WebSockets: {count:,} open (asked {bench.args.idle:,}; open-file hard limit)")
    print(f"{'processes':>9} {'round':>5} {'opened':>7} {'answered':>8} {'KiB each':>8}  sockets per worker (peak)")
    for i in range(bench.args.rounds):
        for n in (1, 2):
            async with bench.server(processes=n) as stack:
                workers = family(stack.server.pid)[1:] or [stack.server.pid]
                port = int(stack.server_url.rsplit(":", 1)[1])
                peak = dict.fromkeys(workers, 0)
                held = asyncio.create_task(hold(stack.server_url, stack.server.pid, count))
                while not held.done():
                    for pid, n_held in accepted(port, workers).items():
                        peak[pid] = max(peak[pid], n_held)
                    await asyncio.wait([held], timeout=1)
                m = held.result()
            per = ", ".join(f"{peak[pid]:,}" for pid in workers)
            print(
                f"{n:>9} {i + 1:>5} {m['connections']:>7,} {m['answered']:>8,} {m['kib_per_connection']:>8.1f}  {per}"
            )


# 3: messages per second through HAProxy.


async def turns(bench: Bench, stack: Stack, label: str) -> tuple[float, Counter[str]]:
    """`--turns` clients, `--concurrency` at a time, on `stack.server_url`: each connects, sends one message, reads
    the whole answer. Completed turns per second of wall time, and the refused connections by status and type."""
    done = 0
    refused: Counter[str] = Counter()
    queue = iter(range(bench.args.turns))

    async def client() -> None:
        nonlocal done
        for i in queue:
            try:
                ws = await open_session(stack, f"{label}-{i}")
            except aiohttp.WSServerHandshakeError as e:  # HAProxy's own answers are HTML, the server's JSON
                kind = CIMultiDict(e.headers or {}).get("Content-Type", "?").split(";")[0]
                refused[f"{e.status} {kind}"] += 1
                continue
            turn = Turn()
            await converse(ws, f"{label}-{i}", turn)
            await ws.close()
            done += turn.done is not None

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(bench.args.concurrency)))
    return done / (time.perf_counter() - started), refused


@asynccontextmanager
async def haproxy(servers: dict[str, int]) -> AsyncIterator[str]:
    # tests/lb.py's rewriting of deploy/haproxy.cfg (imported here only: it stands on the test fixtures).
    from tests.lb import haproxy_config

    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "haproxy.cfg"
        text = haproxy_config(port=port, servers=servers, stats_socket=Path(directory) / "haproxy.sock")
        # deploy/haproxy.cfg's own check timing, not the tests' 200 ms: a check that takes longer under load would
        # mark a server down at its first slow answer.
        config.write_text(text.replace("inter 200ms fall 1 rise 1", "inter 2s fall 2 rise 2"))
        proc = await asyncio.create_subprocess_exec(
            HAPROXY, "-db", "-f", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            await wait_http(f"http://127.0.0.1:{port}/healthz")
            await asyncio.sleep(1)  # a server starts up in HAProxy; let its first check pass
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            await proc.wait()


async def balanced(bench: Bench) -> None:
    rows: list[tuple[str, int, tuple[float, Counter[str]]]] = []
    for i in range(bench.args.rounds):
        async with bench.server() as one:
            await one.pace(tokens=5, ttft_s=0, gap_s=0)
            rows.append(("direct to 1 server", i + 1, await turns(bench, one, bench.label("direct"))))
        ports = {f"s{k}": free_port() for k in range(1, bench.args.lb_servers + 1)}
        async with AsyncExitStack() as fleet:
            servers = [await fleet.enter_async_context(bench.server(port=p)) for p in ports.values()]
            url = await fleet.enter_async_context(haproxy(ports))
            name = f"HAProxy + {len(ports)} servers"
            rows.append((name, i + 1, await turns(bench, replace(servers[0], server_url=url), bench.label("lb"))))
    print(
        f"\n3. messages/s end to end: {bench.args.turns} clients, {bench.args.concurrency} at a time, each connects,"
        " sends one message, reads its 5-token answer"
    )
    print(f"{'path':>22} {'round':>5} {'messages/s':>10}  refused")
    for name, i, (rate, refused) in rows:
        print(f"{name:>22} {i:>5} {rate:>10,.0f}  {', '.join(f'{n} x {k}' for k, n in refused.items()) or 'none'}")


async def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--parts", default="relay,idle,lb,loop", help="which parts to run, of relay,idle,lb,loop")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration, alternating")
    parser.add_argument("--sessions", type=int, default=200, help="sessions in the throughput runs")
    parser.add_argument("--tokens", type=int, default=500, help="tokens per answer in the throughput runs")
    parser.add_argument("--idle", type=int, default=10_000, help="idle WebSockets")
    parser.add_argument("--turns", type=int, default=2000, help="clients in the messages/s runs")
    parser.add_argument("--concurrency", type=int, default=100, help="of them at a time")
    parser.add_argument("--lb-servers", type=int, default=2, help="server processes behind HAProxy")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cores = Cores()
    print(f"bench.scale: Python {sys.version.split()[0]}; {cores.describe()}")
    up_port = free_port()
    upstream = await start_upstream(up_port, prefix=cores.upstream)
    try:
        bench = Bench(args, cores, upstream, up_port)
        if "relay" in parts:
            await scale_relay(bench)
        if "idle" in parts:
            await idle(bench)
        if "lb" in parts:
            await balanced(bench)
        if "loop" in parts:
            await event_loops(bench)
    finally:
        upstream.terminate()
        await upstream.wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
