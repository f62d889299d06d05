"""The summaries part of the bench (`python -m bench`, or alone: `python -m bench.summaries`): its options, its runs
against one worker process, and the table they print. What each figure measures: bench/summary_rounds.py."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys

from .stack import Stack, fmt_ms, running_stack
from .summary_rounds import summaries
from .worker_process import start_worker, stop_worker


def add_summary_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--summary-sessions",
        default="1,50",
        help="sessions ending together, for the disconnect-to-summary runs ('' and --summary-jobs 0: no summaries)",
    )
    parser.add_argument(
        "--summary-jobs", type=int, default=200, help="sessions ending together, for the worker's jobs/s (0: none)"
    )
    parser.add_argument(
        "--summary-min-sessions",
        type=int,
        default=20,
        help="a summaries level smaller than this is run again (new sessions) until this many are measured",
    )
    parser.add_argument(
        "--summary-model-s",
        default="0",
        help="seconds the model takes for one summary (its first token after that, the rest at once); a list runs"
        " every level at each pace, e.g. 1,5",
    )
    parser.add_argument(
        "--worker-max-jobs", type=int, help="WORKER_MAX_JOBS for the worker (default: the worker's own, 200)"
    )


async def summary_runs(stack: Stack, args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.summary_sessions.split(",") if x]
    if args.summary_jobs:
        levels.append(args.summary_jobs)
    paces = [float(x) for x in args.summary_model_s.split(",") if x] or [0.0]
    if not levels:
        return
    # Summaries of 20 tokens, streamed at once: what is left is the pipeline's own time.
    await stack.pace(tokens=20, ttft_s=0, gap_s=0)
    worker = await start_worker(stack, max_jobs=args.worker_max_jobs)
    try:
        # Warm: the first job of a process pays one-time costs (the first upstream request, the first queries).
        await summaries(stack, worker, sessions=1, label="sumwarm")
        max_jobs = args.worker_max_jobs or "default"
        print(
            f"\nsummaries (one worker process, pid {worker.pid}, WORKER_MAX_JOBS {max_jobs}): from the client's close"
            " to the summary stored, minus the model's own time"
        )
        n = args.summary_min_sessions
        print(f"sessions closing together after one message each (a level under {n} runs in rounds until {n});")
        print("'enqueued', 'started': from the close to the server enqueueing the job, and to the worker starting it;")
        print("jobs/s: from the first job's start to the last one's end; CPU: the worker's per job ('-': too few);")
        print("model: the model's time per summary (the chat answers before the close take as long)")
        print(
            f"{'sessions':>9} {'stored p50':>12} {'stored p99':>12} {'enqueued p50':>13} {'started p50':>12}"
            f" {'jobs/s':>8} {'CPU/job':>10} {'model':>7}"
        )
        for pace_no, model_s in enumerate(paces):
            await stack.pace(tokens=20, ttft_s=model_s, gap_s=0)
            for run_no, level in enumerate(levels):
                r = await summaries(
                    stack,
                    worker,
                    sessions=level,
                    label=f"sum{pace_no}p{run_no}x{level}",
                    min_sessions=args.summary_min_sessions,
                )
                rate = "-" if math.isnan(r["jobs_per_s"]) else f"{r['jobs_per_s']:,.1f}"
                cpu = "-" if math.isnan(r["cpu_s_per_job"]) else fmt_ms(r["cpu_s_per_job"])
                print(
                    f"{level:>9} {fmt_ms(r['added_p50']):>12} {fmt_ms(r['added_p99']):>12}"
                    f" {fmt_ms(r['enqueued_p50']):>13} {fmt_ms(r['started_p50']):>12}"
                    f" {rate:>8} {cpu:>10} {model_s:>6g}s"
                )
    finally:
        await stop_worker(worker)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summaries", description="The summaries part of the bench.")
    add_summary_options(parser)
    args = parser.parse_args(argv)
    async with running_stack() as stack:
        await summary_runs(stack, args)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
