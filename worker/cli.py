"""`python -m worker resummarize ...`: enqueue summary jobs for chosen sessions, optionally waiting for them."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from arq.connections import ArqRedis
from arq.jobs import Job
from redis.exceptions import RedisError

from core.errors import StoreError
from core.jobs import SUMMARIZE_JOB
from core.settings import Settings, load_settings
from core.store import Store, SummaryState, open_store

_ALL_LIMIT = 1_000_000


def _date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}: use YYYY-MM-DD or an ISO-8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Reprocess session summaries.")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("resummarize", help="enqueue summary jobs for sessions")
    cmd.add_argument("session_ids", nargs="*", metavar="SESSION_ID", help="sessions to summarise")
    which = cmd.add_mutually_exclusive_group()
    which.add_argument("--missing", action="store_true", help="ended sessions without an up-to-date summary")
    which.add_argument("--all", action="store_true", help="every ended session (narrow with --since/--until)")
    cmd.add_argument("--since", type=_date, help="with --all: sessions started at or after this time (UTC)")
    cmd.add_argument("--until", type=_date, help="with --all: sessions started before this time (UTC)")
    cmd.add_argument("--force", action="store_true", help="summarise again even when the summary is up to date")
    cmd.add_argument("--dry-run", action="store_true", help="list what would be enqueued, enqueue nothing")
    cmd.add_argument("--wait", action="store_true", help="wait for the jobs and print each result")
    cmd.add_argument("--timeout", type=float, default=600.0, help="with --wait: seconds to wait per job")
    return parser


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.session_ids) + args.missing + args.all != 1:
        parser.error("name sessions, or use --missing or --all (one of them)")
    if (args.since or args.until) and not args.all:
        parser.error("--since and --until go with --all")
    return asyncio.run(_resummarize(args, load_settings()))


async def _resummarize(args: argparse.Namespace, settings: Settings) -> int:
    try:
        store = await open_store(settings)
    except StoreError as e:
        print(f"error: cannot open the store: {e}", file=sys.stderr)
        return 1
    redis = ArqRedis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        targets = await _select(args, store)
        if targets is None:
            return 2
        if not targets:
            print("nothing to summarise")
            return 0
        if args.dry_run:
            for state in targets:
                note = "up to date" if state.up_to_date else "needs a summary"
                print(f"would summarise {state.session_id} (through event {state.last_message_id}, {note})")
            return 0
        jobs = await _enqueue(redis, targets, force=args.force)
        print(f"enqueued {len(jobs)} job(s)")
        if not args.wait:
            return 0
        return await _wait(jobs, per_job_s=args.timeout)
    except (RedisError, OSError) as e:
        print(f"error: Redis at {settings.redis_url} is not answering: {e}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"error: the store failed: {e}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
        await store.close()


async def _select(args: argparse.Namespace, store: Store) -> list[SummaryState] | None:
    if args.missing:
        # Every session in the past whose summary is stale; only ended ones: live sessions are summarised at their end.
        states = await store.sessions_needing_summary(stale_before=datetime.min.replace(tzinfo=UTC), limit=_ALL_LIMIT)
        return [s for s in states if s.end_time is not None]
    if args.all:
        return await store.ended_sessions(started_after=args.since, started_before=args.until, limit=_ALL_LIMIT)
    found: list[SummaryState] = []
    unknown = []
    for session_id in dict.fromkeys(args.session_ids):
        state = await store.summary_state(session_id)
        if state is None:
            unknown.append(session_id)
        else:
            found.append(state)
    if unknown:
        print(f"error: unknown session(s): {', '.join(unknown)}", file=sys.stderr)
        return None
    return found


async def _enqueue(redis: ArqRedis, targets: list[SummaryState], *, force: bool) -> list[tuple[str, Job]]:
    # A fresh job id per run: an earlier job for the same state (done or given up) must not swallow this one.
    # The job itself skips a state that is already summarised, unless forced.
    run = secrets.token_hex(4)
    jobs = []
    bar = _Progress("enqueueing", len(targets))
    for state in targets:
        job = await redis.enqueue_job(
            SUMMARIZE_JOB, state.session_id, force=force, _job_id=f"resummarize:{state.session_id}:{run}"
        )
        if job is not None:
            jobs.append((state.session_id, job))
        bar.step()
    bar.close()
    return jobs


async def _wait(jobs: list[tuple[str, Job]], *, per_job_s: float) -> int:
    failed = 0
    bar = _Progress("waiting", len(jobs))
    for session_id, job in jobs:
        try:
            result = await job.result(timeout=per_job_s)
            outcome = result.get("outcome", result) if isinstance(result, dict) else result
            bar.write(f"{session_id}: {outcome}")
        except TimeoutError:
            failed += 1
            bar.write(f"{session_id}: no result within {per_job_s:g} s (is a worker running?)")
        except Exception as e:
            failed += 1
            bar.write(f"{session_id}: failed: {e}")
        bar.step()
    bar.close()
    print(f"{len(jobs) - failed} done, {failed} failed")
    return 1 if failed else 0


class _Progress:
    """A one-line progress bar on stderr, for runs long enough to want one, and only on a terminal."""

    def __init__(self, label: str, total: int, *, stream: TextIO = sys.stderr) -> None:
        self._label = label
        self._total = total
        self._done = 0
        self._stream = stream
        self._on = total >= 10 and stream.isatty()

    def step(self) -> None:
        self._done += 1
        if self._on:
            filled = int(30 * self._done / self._total)
            self._stream.write(f"\r{self._label} [{'#' * filled}{' ' * (30 - filled)}] {self._done}/{self._total}")
            self._stream.flush()

    def write(self, line: str) -> None:
        if self._on:
            self._stream.write("\r\033[K")
        print(line)

    def close(self) -> None:
        if self._on:
            self._stream.write("\n")
