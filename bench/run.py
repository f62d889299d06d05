"""Drives the real server (a `python -m server` process, its database and Redis) with many WebSocket clients.

The upstream model is bench/upstream.py in a process of its own, streaming at a chosen pace. Every figure is
printed beside the floor: a client reading the same upstream stream directly, with nothing in between.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Any

import aiohttp
import asyncpg
import orjson

from .idle import capacity, hold
from .stack import (
    REPO,
    Stack,
    Turn,
    converse,
    fmt_ms,
    free_port,
    open_session,
    pct,
    proc_cpu_s,
    running_stack,
    wait_http,
)
from .summaries import add_summary_options, summary_runs

# The floor: nothing between the client and the upstream.


async def floor(stack: Stack, *, streams: int, spread_s: float = 0.0, label: str = "floor") -> dict[str, float]:
    """`streams` clients reading the upstream directly, as the relay's sessions do (with `spread_s`, starting at
    random times over that many seconds): their time to first token beyond the upstream's own is the floor."""
    ttfts: dict[str, float] = {}
    tokens = 0
    rng = random.Random(streams)

    async def one(marker: str) -> None:
        nonlocal tokens
        await asyncio.sleep(rng.uniform(0, spread_s))
        body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": marker}]}
        sent = time.perf_counter()
        async with stack.http.post(f"{stack.upstream_url}/v1/chat/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    event = orjson.loads(line[6:])
                    if event["choices"] and event["choices"][0]["delta"].get("content"):
                        tokens += 1
                        if marker not in ttfts:
                            ttfts[marker] = time.perf_counter() - sent

    started = time.perf_counter()
    await asyncio.gather(*(one(f"{label}-{i}") for i in range(streams)))
    elapsed = time.perf_counter() - started
    timings = await stack.upstream_timings()
    overhead = [ttft - (timings[m][1] - timings[m][0]) for m, ttft in ttfts.items() if m in timings]
    return {
        "tokens_per_s": tokens / elapsed,
        "ttft_overhead_p50": pct(overhead, 50),
        "ttft_overhead_p99": pct(overhead, 99),
    }


# Through the server.


async def relay(stack: Stack, *, sessions: int, label: str, spread_s: float = 0.0) -> dict[str, Any]:
    """Each of `sessions` concurrent sessions sends one message and reads the whole answer; with `spread_s`, the
    messages arrive at random times over that many seconds (while the others stream) instead of all at once."""
    sockets = await asyncio.gather(*(open_session(stack, f"{label}-{i}") for i in range(sessions)))
    turns = [Turn() for _ in range(sessions)]
    rng = random.Random(sessions)

    async def later(ws: aiohttp.ClientWebSocketResponse, marker: str, turn: Turn) -> None:
        await asyncio.sleep(rng.uniform(0, spread_s))
        await converse(ws, marker, turn)

    cpu0 = proc_cpu_s(stack.server.pid)
    started = time.perf_counter()
    await asyncio.gather(*(later(ws, f"{label}-{i}", t) for i, (ws, t) in enumerate(zip(sockets, turns, strict=True))))
    elapsed = time.perf_counter() - started
    cpu = proc_cpu_s(stack.server.pid) - cpu0
    await asyncio.gather(*(ws.close() for ws in sockets))

    upstream = await stack.upstream_timings()
    server_side = await _server_timings(stack, label)
    client_added, server_added, lags, to_upstream, back = [], [], [], [], []
    for i, turn in enumerate(turns):
        marker = f"{label}-{i}"
        if marker not in upstream or turn.first_delta is None:
            continue
        arrived, first_chunk, _ = upstream[marker]
        own = first_chunk - arrived
        client_added.append(turn.first_delta - turn.sent - own)
        if marker in server_side:
            received_at, first_delta_at = server_side[marker]
            server_added.append(first_delta_at - received_at - own)
            # The two halves: the message to the upstream's request, and its first chunk to our first delta.
            to_upstream.append(arrived - received_at)
            back.append(first_delta_at - first_chunk)
        if turn.stored is not None:
            lags.append(turn.stored - turn.sent)
    tokens = sum(t.tokens for t in turns)
    return {
        "sessions": sessions,
        "server_added_p50": pct(server_added, 50),
        "server_added_p99": pct(server_added, 99),
        "client_added_p50": pct(client_added, 50),
        "client_added_p99": pct(client_added, 99),
        "to_upstream_p50": pct(to_upstream, 50),
        "to_upstream_p99": pct(to_upstream, 99),
        "back_p50": pct(back, 50),
        "back_p99": pct(back, 99),
        "stored_lag_p50": pct(lags, 50),
        "stored_lag_p99": pct(lags, 99),
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "cpu_us_per_token": cpu / max(tokens, 1) * 1e6,
        "events_per_s": 2 * sessions / elapsed,
    }


async def _server_timings(stack: Stack, label: str) -> dict[str, tuple[float, float]]:
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch(
            "select metadata->>'in_reply_to' as marker, (metadata->>'received_at')::float8 as received_at,"
            " (metadata->>'first_delta_at')::float8 as first_delta_at from session_events"
            " where event_type = 'ai_message' and session_id like $1",
            f"{label}-%",
        )
    finally:
        await conn.close()
    return {r["marker"]: (r["received_at"], r["first_delta_at"]) for r in rows if r["first_delta_at"]}


async def idle(stack: Stack, *, connections: int) -> dict[str, Any]:
    """`connections` idle sessions on the server, then as many on two floors: a bare aiohttp WebSocket endpoint
    (bench/bare_ws.py) and a bare asyncio protocol with no aiohttp in it (bench/raw_ws.py)."""
    count = capacity(connections)
    ours = await hold(stack.server_url, stack.server.pid, count)
    floors = {}
    for name, module in (("aiohttp", "bench.bare_ws"), ("raw", "bench.raw_ws")):
        port = free_port()
        bare = await asyncio.create_subprocess_exec(sys.executable, "-m", module, "--port", str(port), cwd=REPO)
        try:
            await wait_http(f"http://127.0.0.1:{port}/healthz")
            floors[name] = await hold(f"http://127.0.0.1:{port}", bare.pid, count)
        finally:
            bare.terminate()
            await bare.wait()
    return {
        **ours,
        "asked": connections,
        "floor_kib_per_connection": floors["aiohttp"]["kib_per_connection"],
        "raw_kib_per_connection": floors["raw"]["kib_per_connection"],
        "floors_held": all(f["held"] for f in floors.values()),
    }


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", default="1,100,1000", help="concurrency levels for the latency runs")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per answer in the latency runs")
    parser.add_argument("--gap-ms", type=float, default=20, help="upstream pace between tokens")
    parser.add_argument("--ttft-ms", type=float, default=100, help="upstream time to first token")
    parser.add_argument(
        "--spread-s", type=float, default=2.0, help="also run each level with arrivals spread over this many seconds"
    )
    parser.add_argument("--throughput-sessions", type=int, default=200)
    parser.add_argument("--throughput-tokens", type=int, default=500)
    parser.add_argument(
        "--event-loop", choices=("asyncio", "uvloop"), default="asyncio", help="the server's EVENT_LOOP"
    )
    parser.add_argument("--idle", type=int, default=50_000, help="idle connections for the memory run")
    parser.add_argument(
        "--naive-sessions", type=int, default=100, help="sessions for the naive relay's CPU comparison (0: skip it)"
    )


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    add_relay_options(parser)
    add_summary_options(parser)
    args = parser.parse_args(argv)
    # Room for the idle run's sockets (the server refuses past MAX_CONNECTIONS).
    async with running_stack(MAX_CONNECTIONS=str(max(args.idle + 100, 10_000)), EVENT_LOOP=args.event_loop) as stack:
        # First, while the worker is the only extra load: it is stopped before the relay is measured.
        await summary_runs(stack, args)

        await stack.pace(tokens=args.tokens, ttft_s=args.ttft_ms / 1000, gap_s=args.gap_ms / 1000)
        base = await floor(stack, streams=1)
        print(f"\nfloor (direct to upstream): time-to-first-token overhead p50 {fmt_ms(base['ttft_overhead_p50'])}")
        print("\nadded latency (first delta out minus the upstream's own time to first token);")
        print("'100~2s': 100 sessions whose messages arrive spread over 2 s while the others stream")
        print(
            f"{'sessions':>9} {'server p50':>12} {'server p99':>12} {'client p50':>12} {'client p99':>12}"
            f" {'stored p50':>12} {'stored p99':>12} {'to upstream':>16} {'back':>16} {'floor':>16}"
            f" {'over floor':>16}"
        )
        runs = [(int(x), 0.0) for x in args.sessions.split(",") if x]
        if args.spread_s:
            runs += [(int(x), args.spread_s) for x in args.sessions.split(",") if x and int(x) > 1]
        for run_no, (level, spread) in enumerate(runs):
            r = await relay(stack, sessions=level, label=f"lat{run_no}x{level}", spread_s=spread)
            # The same load read directly, right after: what a client pays with nothing in between.
            f = await floor(stack, streams=level, spread_s=spread, label=f"floor{run_no}x{level}")
            name = f"{level}" if not spread else f"{level}~{spread:g}s"
            print(
                f"{name:>9} {fmt_ms(r['server_added_p50']):>12} {fmt_ms(r['server_added_p99']):>12}"
                f" {fmt_ms(r['client_added_p50']):>12} {fmt_ms(r['client_added_p99']):>12}"
                f" {fmt_ms(r['stored_lag_p50']):>12} {fmt_ms(r['stored_lag_p99']):>12}"
                f" {fmt_ms(r['to_upstream_p50']) + '/' + fmt_ms(r['to_upstream_p99']):>16}"
                f" {fmt_ms(r['back_p50']) + '/' + fmt_ms(r['back_p99']):>16}"
                f" {fmt_ms(f['ttft_overhead_p50']) + '/' + fmt_ms(f['ttft_overhead_p99']):>16}"
                f" {fmt_ms(r['client_added_p50'] - f['ttft_overhead_p50']):>7}/"
                f"{fmt_ms(r['client_added_p99'] - f['ttft_overhead_p99'])}"
            )

        await stack.pace(tokens=args.throughput_tokens, ttft_s=0, gap_s=0)
        direct = await floor(stack, streams=args.throughput_sessions)
        r = await relay(stack, sessions=args.throughput_sessions, label="tput")
        print(
            f"\nrelay throughput at saturation ({args.throughput_sessions} sessions x {args.throughput_tokens} tokens)"
        )
        print(
            f"  through the server: {r['tokens_per_s']:,.0f} tokens/s,"
            f" {r['cpu_us_per_token']:.1f} µs server CPU per token"
        )
        print(
            f"  floor (direct):     {direct['tokens_per_s']:,.0f} tokens/s"
            f"  -> ratio {r['tokens_per_s'] / direct['tokens_per_s']:.2f}"
        )
        print(
            f"  store: {r['events_per_s']:,.0f} events/s, message-to-stored lag p50 {fmt_ms(r['stored_lag_p50'])},"
            f" p99 {fmt_ms(r['stored_lag_p99'])}"
        )

        if args.naive_sessions:
            # Imported here: bench.naive_cpu imports this module.
            from .naive_cpu import compare

            await compare(stack, sessions=args.naive_sessions, tokens=args.throughput_tokens, gap_ms=args.gap_ms)

        if args.idle:
            m = await idle(stack, connections=args.idle)
            limited = "" if m["asked"] == m["connections"] else f" (of {m['asked']:,} asked: the open-file limit)"
            print(
                f"\nidle connections: {m['connections']:,} open{limited}, {m['kib_per_connection']:.1f} KiB each,"
                f" {'all held' if m['held'] else 'NOT all held'} ({m['answered']:,} answered a ping);"
                f" floors: a bare aiohttp WebSocket endpoint {m['floor_kib_per_connection']:.1f} KiB each,"
                f" a bare asyncio protocol (no aiohttp) {m['raw_kib_per_connection']:.1f} KiB each"
                + ("" if m["floors_held"] else " (NOT every floor socket answered)")
            )
    return 0


def run() -> None:
    sys.exit(asyncio.run(main(sys.argv[1:])))
