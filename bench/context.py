"""`python -m bench.context`: what a long, compacted history costs a live session.

100 sessions with a 300-turn history each (600 messages and a context summary covering all but the last 40, as the
worker leaves a long conversation) against 100 new sessions, in the same run, rounds alternating: the added time to
first token of one message from each (arriving over `--spread-s`, 2 s, while the others stream), measured inside
the server (the message's arrival to its first delta, minus the upstream's own time to its first chunk). Then the
server's memory per live session, with and without such a history. The worker does not run: no compaction lands
mid-measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson

from .run import relay
from .stack import Stack, fmt_ms, open_session, proc_rss_kib, running_stack

TURNS = 300
KEPT = 40  # messages after the summary's cursor


async def seed(database_url: str, prefix: str, sessions: int) -> None:
    """Sessions `{prefix}-{i}` with a 300-turn history and a context summary, written straight into the tables."""
    conn = await asyncpg.connect(database_url)
    try:
        now = datetime.now(UTC)
        await conn.executemany(
            "insert into sessions (session_id, start_time) values ($1, $2) on conflict do nothing",
            [(f"{prefix}-{i}", now) for i in range(sessions)],
        )
        rows = []
        for i in range(sessions):
            sid = f"{prefix}-{i}"
            for t in range(TURNS):
                question = f"Turn {t}: what about the weather in town number {t} on our list, and the trains there?"
                answer = f"In town {t} it is mild today; the trains run every twenty minutes until midnight."
                meta = orjson.dumps({"status": "completed", "completion_tokens": 24, "prompt_tokens": 1000}).decode()
                rows.append((sid, "user_message", question, f"{sid}-u{t}", now, "{}"))
                rows.append((sid, "ai_message", answer, f"{sid}-a{t}", now, meta))
        await conn.copy_records_to_table(
            "session_events",
            records=rows,
            columns=["session_id", "event_type", "content", "event_key", "created_at", "metadata"],
        )
        cursors = await conn.fetch(
            "select session_id, (array_agg(id order by id desc))[$2] as through from session_events"
            " where session_id like $1 group by session_id",
            f"{prefix}-%",
            KEPT + 1,
        )
        summary = "Facts so far: " + " ".join(f"town {t} mild, trains every twenty minutes;" for t in range(40))
        await conn.copy_records_to_table(
            "session_events",
            records=[
                (
                    r["session_id"],
                    "context_summary",
                    summary,
                    f"{r['session_id']}-cs",
                    now,
                    orjson.dumps({"through": r["through"], "tokens": 400}).decode(),
                )
                for r in cursors
            ],
            columns=["session_id", "event_type", "content", "event_key", "created_at", "metadata"],
        )
    finally:
        await conn.close()


async def memory(stack: Stack, prefix: str, sessions: int) -> float:
    """KiB of server RSS per live session opened (and held) under `prefix`."""
    rss0 = proc_rss_kib(stack.server.pid)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    for start in range(0, sessions, 50):
        sockets += await asyncio.gather(
            *(open_session(stack, f"{prefix}-{i}") for i in range(start, min(sessions, start + 50)))
        )
    await asyncio.sleep(1)
    per = (proc_rss_kib(stack.server.pid) - rss0) / sessions
    await asyncio.gather(*(ws.close() for ws in sockets))
    return per


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.context")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-sessions", type=int, default=300)
    parser.add_argument(
        "--spread-s", type=float, default=2.0, help="the messages arrive over this long (0: all at the same instant)"
    )
    parser.add_argument("--budget", type=int, default=4000, help="CONTEXT_MAX_TOKENS of the server under test")
    args = parser.parse_args(argv)
    env = {"HISTORY_LIMIT": "1000", "CONTEXT_MAX_TOKENS": str(args.budget), "USER_MESSAGES_PER_MINUTE": "100000"}
    async with running_stack(**env) as stack:
        print(f"context bench: {args.sessions} sessions at once, {TURNS}-turn histories, budget {args.budget} tokens")
        for r in range(args.rounds):
            await seed(stack.database_url, f"ctxh{r}", args.sessions)
        await seed(stack.database_url, "ctxm", args.memory_sessions)
        await stack.pace(tokens=20, ttft_s=0.1, gap_s=0.02)
        results: dict[str, list[dict[str, Any]]] = {"300-turn history": [], "new session": []}
        for r in range(args.rounds):
            for case, label in (("300-turn history", f"ctxh{r}"), ("new session", f"ctxn{r}")):
                results[case].append(await relay(stack, sessions=args.sessions, label=label, spread_s=args.spread_s))
        print(f"{'round':>5}  {'case':<18} {'added p50':>10} {'added p99':>10}")
        for r in range(args.rounds):
            for case, runs in results.items():
                x = runs[r]
                print(f"{r:>5}  {case:<18} {fmt_ms(x['server_added_p50']):>10} {fmt_ms(x['server_added_p99']):>10}")
        deltas = [h["server_added_p50"] - n["server_added_p50"] for h, n in zip(*results.values(), strict=True)]
        print("p50 delta (history - new), per round: " + ", ".join(fmt_ms(d) for d in deltas))
        fresh = await memory(stack, "ctxfresh", args.memory_sessions)
        with_history = await memory(stack, "ctxm", args.memory_sessions)
        print(f"server RSS per live session: {with_history:.1f} KiB with a {TURNS}-turn history, {fresh:.1f} KiB new")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
