"""`python -m bench.resume`: what answers that outlive the socket cost (protocol 1.1).

- catch-up: a client joins a 2,000-token answer near its end, on the same server and on a second server process;
  timed from the join's upgrade to the catch-up delta (the whole text so far) in hand;
- Redis commands per answer: `INFO commandstats` before and after answers that nobody follows elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import orjson
from redis.asyncio import Redis

from .stack import REPO, Stack, fmt_ms, free_port, pct, running_stack, wait_http


async def _second_server(stack: Stack) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "PORT": str(port),
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": stack.redis_url,
        "OPENAI_BASE_URL": f"{stack.upstream_url}/v1",
        "OPENAI_MODEL": "bench",
        "LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "server", env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/healthz")
    return proc, url


async def _catch_up(stack: Stack, join_url: str, label: str, *, tokens: int) -> float:
    """Seconds from a joiner's upgrade to its catch-up of an answer `tokens` long, joined near its end."""
    http = stack.http
    ws = await http.ws_connect(f"{stack.server_url}/ws/session/{label}")
    await ws.receive()
    await ws.send_str(orjson.dumps({"type": "message", "text": label}).decode())
    seen = 0
    while seen < tokens * 9 // 10:
        event = orjson.loads((await ws.receive()).data)
        if event["type"] == "response.delta":
            seen = event["seq"]
    started = time.perf_counter()
    joiner = await http.ws_connect(f"{join_url}/ws/session/{label}?mode=watch")
    caught = None
    while caught is None:
        event = orjson.loads((await joiner.receive()).data)
        if event["type"] == "response.delta":
            caught = time.perf_counter() - started
    await joiner.close()
    while orjson.loads((await ws.receive()).data)["type"] != "response.done":
        pass
    await ws.close()
    return caught


async def _commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))


async def main(args: argparse.Namespace) -> None:
    async with running_stack() as stack:
        await stack.pace(tokens=args.tokens, ttft_s=0, gap_s=args.gap_ms / 1000)
        second, second_url = await _second_server(stack)
        try:
            print(f"\ncatch-up of a {args.tokens}-token answer joined at 90 %, from the upgrade to the text in hand")
            print(f"{'joiner on':>16} {'p50':>10} {'max':>10}")
            for name, url in (("the same server", stack.server_url), ("another server", second_url)):
                times = [
                    await _catch_up(stack, url, f"cu-{name.split()[1]}-{i}", tokens=args.tokens)
                    for i in range(args.runs)
                ]
                print(f"{name:>16} {fmt_ms(pct(times, 50)):>10} {fmt_ms(max(times)):>10}")

            redis = Redis.from_url(stack.redis_url)
            await stack.pace(tokens=args.tokens, ttft_s=0, gap_s=args.gap_ms / 1000)
            before = await _commands(redis)
            for i in range(args.runs):
                ws = await stack.http.ws_connect(f"{stack.server_url}/ws/session/rc-{i}")
                await ws.receive()
                await ws.send_str(orjson.dumps({"type": "message", "text": f"rc-{i}"}).decode())
                while orjson.loads((await ws.receive()).data)["type"] != "response.done":
                    pass
                await ws.close()
            await asyncio.sleep(1.0)  # The last writes of the publisher and the presence renewals.
            per_answer = (await _commands(redis) - before) / args.runs
            answer_s = args.tokens * args.gap_ms / 1000
            print(
                f"\nRedis commands per answer ({args.tokens} tokens over {answer_s:.1f} s, connect to close,"
                f" everything the server sent): {per_answer:.0f}"
            )
            await redis.aclose()
        finally:
            second.terminate()
            await second.wait()


def run() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--gap-ms", type=float, default=1.0, help="upstream pace between tokens")
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    run()
