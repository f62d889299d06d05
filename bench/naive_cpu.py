"""`python -m bench.naive_cpu`: server CPU per relayed token, the naive relay (bench/naive.py) against the real server.

One run starts both, on the same database and the same upstream (bench/upstream.py), and drives each with the same
load, one after the other: `--sessions` sessions at once, each sending one message and reading an answer of
`--tokens` tokens. Two cases:

- paced: the upstream waits `--gap-ms` between tokens, so that each token arrives in a network read of its own
  (what users see);
- unpaced: the upstream writes every token as fast as it can.

CPU is each server process's user + system time from /proc/<pid>/stat over the load (bench/run.py's `relay`), per
token the client received; tokens/s is the client's. A warm-up turn on each server comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys

from .run import floor, relay
from .stack import REPO, Stack, free_port, running_stack, wait_http


async def start_naive(stack: Stack) -> Stack:
    """bench/naive.py in a process of its own on the stack's database and upstream; the stack, pointed at it."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.naive",
        "--port",
        str(port),
        "--database-url",
        stack.database_url,
        "--upstream-url",
        f"{stack.upstream_url}/v1",
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{url}/healthz")
    except BaseException:
        proc.terminate()
        await proc.wait()
        raise
    return dataclasses.replace(stack, server=proc, server_url=url)


async def compare(ours: Stack, *, sessions: int, tokens: int, gap_ms: float) -> None:
    """Print the naive relay's CPU per token beside ours, paced and unpaced (`python -m bench` runs this too)."""
    naive = await start_naive(ours)
    try:
        print(f"\nnaive relay (bench/naive.py) against ours: {sessions} sessions x {tokens} tokens, server CPU")
        await ours.pace(tokens=5, ttft_s=0, gap_s=0)
        for stack, name in ((naive, "naive"), (ours, "ours")):
            await relay(stack, sessions=2, label=f"warm-{name}")
        cases = [(f"paced {gap_ms:g} ms", gap_ms / 1000), ("unpaced", 0.0)]
        print(
            f"{'case':>14} {'naive µs/tok':>13} {'ours µs/tok':>12} {'ratio':>7} {'naive tok/s':>12}"
            f" {'ours tok/s':>11} {'floor tok/s':>12}"
        )
        for case_no, (case, gap_s) in enumerate(cases):
            await ours.pace(tokens=tokens, ttft_s=0, gap_s=gap_s)
            base = await floor(ours, streams=sessions, label=f"nfloor{case_no}")
            n = await relay(naive, sessions=sessions, label=f"naive{case_no}")
            o = await relay(ours, sessions=sessions, label=f"ours{case_no}")
            expected = sessions * tokens
            for who, r in (("naive", n), ("ours", o)):
                if r["tokens"] != expected:
                    print(f"  {who}: {r['tokens']} tokens received, {expected} expected")
            ratio = f"{n['cpu_us_per_token'] / o['cpu_us_per_token']:.1f}x" if o["cpu_us_per_token"] else "inf"
            print(
                f"{case:>14} {n['cpu_us_per_token']:>13.1f} {o['cpu_us_per_token']:>12.2f} {ratio:>7}"
                f" {n['tokens_per_s']:>12,.0f} {o['tokens_per_s']:>11,.0f} {base['tokens_per_s']:>12,.0f}"
            )
    finally:
        naive.server.terminate()
        await naive.server.wait()


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--gap-ms", type=float, default=20, help="upstream pace between tokens in the paced case")
    args = parser.parse_args(argv)
    async with running_stack() as ours:
        await compare(ours, sessions=args.sessions, tokens=args.tokens, gap_ms=args.gap_ms)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
