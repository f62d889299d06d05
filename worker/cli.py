"""`python -m worker resummarize ...`: enqueue summary jobs for chosen sessions, optionally waiting for them."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis
from arq.constants import default_queue_name, health_check_key_suffix
from arq.jobs import Job
from redis.exceptions import RedisError
from tqdm import tqdm

from core.errors import StoreError
from core.jobs import JobQueue, summary_job_id
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
    which.add_argument(
        "--all",
        action="store_true",
        help="every ended session, summarised again even when up to date (narrow with --since/--until)",
    )
    cmd.add_argument("--since", type=_date, help="with --all: sessions started at or after this time (UTC)")
    cmd.add_argument("--until", type=_date, help="with --all: sessions started before this time (UTC)")
    cmd.add_argument("--force", action="store_true", help="summarise again even when the summary is up to date")
    cmd.add_argument("--dry-run", action="store_true", help="say what would be done for each session, enqueue nothing")
    cmd.add_argument("--wait", action="store_true", help="wait for the jobs and print each result")
    cmd.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --wait: give up (exit status 1) when the jobs have not all finished within this many seconds"
        " in all, e.g. because no worker is running (default: %(default)g)",
    )
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
        force = args.force or args.all
        plan = [(state, _action(state, force=force)) for state in targets]
        todo = [state for state, action in plan if action != "skip"]
        if args.dry_run:
            for state, action in plan:
                print(_dry_run_line(state, action))
            if plan:
                print(f"dry run: {len(todo)} of {len(plan)} session(s) would be (re-)summarised; nothing enqueued")
            else:
                print(f"dry run: {_none_selected(args)}; nothing would be enqueued")
            return 0
        if not todo:
            note = f"{len(plan)} session(s) up to date or without messages (--force to re-summarise)"
            print(f"nothing to summarise: {note if plan else _none_selected(args)}")
            return 0
        # JobQueue logs and swallows a Redis that does not answer (right for the server): ask it here first.
        await redis.ping()
        jobs, refused = await _enqueue(JobQueue(redis), todo, force=force)
        print(f"enqueued {len(jobs)} job(s)")
        if refused:
            print(f"error: Redis refused {len(refused)} job(s): {', '.join(refused[:10])}", file=sys.stderr)
            return 1
        if not args.wait:
            return 0
        return await _wait(redis, jobs, timeout_s=args.timeout)
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


def _none_selected(args: argparse.Namespace) -> str:
    """Why --missing or --all found no session, in the words of the options given."""
    if args.missing:
        return "no ended session needs a summary: each one's is up to date"
    started = [
        f"at or after {args.since.isoformat()}" if args.since else "",
        f"before {args.until.isoformat()}" if args.until else "",
    ]
    when = " and ".join(filter(None, started))
    return f"no ended session{' started ' + when if when else ''}"


def _action(state: SummaryState, *, force: bool) -> str:
    """What the job will do with the session as it is now (worker/jobs.py decides the same way)."""
    if state.last_message_id is None:
        return "skip"
    if not state.up_to_date:
        return "summarise"
    return "re-summarise" if force else "skip"


def _dry_run_line(state: SummaryState, action: str) -> str:
    sid, last = state.session_id, state.last_message_id
    if last is None:
        return f"would skip {sid} (no messages)"
    if action == "summarise":
        have = "no summary" if state.summarized_through is None else f"summary through event {state.summarized_through}"
        return f"would summarise {sid} (through event {last}; {have} yet)"
    if action == "re-summarise":
        return f"would re-summarise {sid} (through event {last}; its summary is up to date)"
    return f"would skip {sid} (summary up to date through event {last}; --force to re-summarise)"


async def _enqueue(
    queue: JobQueue, targets: list[SummaryState], *, force: bool
) -> tuple[list[tuple[str, Job]], list[str]]:
    """The jobs enqueued, and the sessions whose job Redis refused."""
    # The state's job id plus a fresh suffix per run: the state's own job (done, or given up after its last try)
    # keeps its result in arq for a while and would swallow this one. The job skips a summarised state unless forced.
    run = secrets.token_hex(4)
    jobs = []
    refused = []
    for state in _bar(targets, "enqueueing"):
        assert state.last_message_id is not None
        state_id = summary_job_id(state.session_id, start_time=state.start_time, last_message_id=state.last_message_id)
        job = await queue.summary(state.session_id, job_id=f"{state_id}:resummarize:{run}", force=force)
        if job is None:
            refused.append(state.session_id)
        else:
            jobs.append((state.session_id, job))
    return jobs, refused


async def _wait(redis: ArqRedis, jobs: list[tuple[str, Job]], *, timeout_s: float) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    failed = 0
    unfinished = []
    for session_id, job in _bar(jobs, "waiting"):
        try:
            result = await _result(job, deadline=deadline)
        except TimeoutError:
            unfinished.append(session_id)
            continue
        except Exception as e:
            failed += 1
            tqdm.write(f"{session_id}: failed: {e}")
            continue
        outcome = result.get("outcome", result) if isinstance(result, dict) else result
        tqdm.write(f"{session_id}: {outcome}")
    done = len(jobs) - failed - len(unfinished)
    print(f"{done} done, {failed} failed" + (f", {len(unfinished)} unfinished" if unfinished else ""))
    if unfinished:
        alive = await redis.exists(default_queue_name + health_check_key_suffix)
        why = "the worker has not finished them" if alive else "no worker is running (no worker heartbeat in Redis)"
        print(
            f"error: gave up waiting after {timeout_s:g} s: {len(unfinished)} job(s) not finished; {why}."
            " They stay queued; start a worker with `arq worker.WorkerSettings`, or wait longer with --timeout.",
            file=sys.stderr,
        )
    return 1 if failed or unfinished else 0


async def _result(job: Job, *, deadline: float) -> Any:
    """The job's result; TimeoutError when it has none by `deadline` (after it: whether it has one now)."""
    if asyncio.get_running_loop().time() < deadline:
        async with asyncio.timeout_at(deadline):
            return await job.result(poll_delay=0.2)
    info = await job.result_info()
    if info is None:
        raise TimeoutError
    if not info.success:
        raise info.result if isinstance(info.result, Exception) else RuntimeError(str(info.result))
    return info.result


def _bar(items: list[Any], label: str) -> Any:
    """A progress bar on stderr, for runs long enough to want one, and only on a terminal (tqdm's `disable=None`)."""
    return tqdm(items, desc=label, file=sys.stderr, disable=None if len(items) >= 10 else True, leave=False)
