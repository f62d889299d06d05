"""Post-session summaries: the server enqueues, the real arq worker summarises, the sweeper and the CLI catch up."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from core.jobs import SWEEP_JOB
from core.settings import REPO_ROOT
from tests.conftest import eventually, free_port, receive, receive_until, service_env, start_server
from tests.fakes import openai_server as fake
from worker import cli
from worker.runner import Worker
from worker.settings import worker_options


async def chat_and_leave(client: Any, session_id: str, *texts: str) -> None:
    ws = await client.ws_connect(f"/ws/session/{session_id}")
    await receive(ws)
    for text in texts:
        await ws.send_str(text)
        await receive_until(ws, "response.done")
    await ws.close()


async def summary_row(db: Any, session_id: str) -> Any:
    return await db.fetchrow(
        "select summary, summarized_through, end_time, (select max(id) from session_events e"
        " where e.session_id = s.session_id and e.event_type in ('user_message', 'ai_message')) as last_id"
        " from sessions s where session_id = $1",
        session_id,
    )


async def queued(redis: Any) -> int:
    return int(await redis.zcard("arq:queue"))


def summary_requests(fake_llm: Any) -> list[dict[str, Any]]:
    return [r for r in fake_llm.requests if "Summarise" in r["messages"][0]["content"]]


async def ended_session(settings: Any, session_id: str, text: str) -> None:
    """A session that ended with one message and no summary, as a server leaves it."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "insert into sessions (session_id, start_time, end_time) values ($1, now(), now())", session_id
        )
        await conn.execute(
            "insert into session_events (session_id, event_type, content, event_key) values"
            " ($1, 'user_message', $2, $3)",
            session_id,
            text,
            f"{session_id}-k1",
        )
    finally:
        await conn.close()


async def start_worker_process(settings: Any, log: Path, **env: str) -> asyncio.subprocess.Process:
    """A real `arq worker.WorkerSettings` process, as docker-compose runs it, logging to `log`."""
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            os.path.join(os.path.dirname(sys.executable), "arq"),
            "worker.WorkerSettings",
            env=service_env(settings, **env),
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_closed_session_gets_its_summary_from_the_worker(client, db, redis, fake_llm, run_worker):
    await chat_and_leave(client, "s1", "I want to plan a trip to Lisbon.")
    await eventually(lambda: queued(redis))
    await run_worker()

    row = await summary_row(db, "s1")
    assert row["end_time"] is not None
    assert row["summarized_through"] == row["last_id"]
    [request] = summary_requests(fake_llm)
    assert "User: I want to plan a trip to Lisbon." in request["messages"][1]["content"]
    assert row["summary"] == fake_llm.reply_for(request["messages"])


async def test_the_same_state_is_never_summarised_twice(client, db, redis, fake_llm, run_worker):
    await chat_and_leave(client, "s1", "hello")
    await eventually(lambda: queued(redis))
    await run_worker()
    assert len(summary_requests(fake_llm)) == 1

    # The sweeper and a repeated job find the summary up to date and leave it alone.
    arq = ArqRedis(connection_pool=redis.connection_pool)
    await arq.enqueue_job(SWEEP_JOB)
    await arq.enqueue_job("summarize_session", "s1", _job_id="again")
    await run_worker()
    assert len(summary_requests(fake_llm)) == 1


async def test_a_resumed_session_gets_a_new_summary_covering_its_new_messages(client, db, redis, fake_llm, run_worker):
    await chat_and_leave(client, "s1", "first visit")
    await eventually(lambda: queued(redis))
    await run_worker()
    first = await summary_row(db, "s1")

    await chat_and_leave(client, "s1", "second visit")
    await eventually(lambda: queued(redis))
    await run_worker()
    second = await summary_row(db, "s1")

    assert second["summarized_through"] == second["last_id"] > first["summarized_through"]
    assert second["end_time"] > first["end_time"]
    latest = summary_requests(fake_llm)[-1]["messages"][1]["content"]
    assert "User: first visit" in latest and "User: second visit" in latest


async def test_llm_down_retries_then_leaves_the_session_and_resummarize_fixes_it(
    client, db, redis, fake_llm, run_worker, settings, capsys
):
    await chat_and_leave(client, "s1", "please remember this")
    await eventually(lambda: queued(redis))
    fake_llm.script(*[fake.server_error(503)] * 2)
    await run_worker(summary_max_tries=2, summary_retry_base_s=0.05, llm_max_retries=0)

    assert len(summary_requests(fake_llm)) == 2
    assert (await summary_row(db, "s1"))["summary"] is None

    # The model is back: reprocess what is missing, with a worker running beside the CLI.
    options = worker_options(settings)
    options.update(cron_jobs=None, handle_signals=False, poll_delay=0.05)
    worker = Worker(**options)
    running = asyncio.create_task(worker.async_run())
    try:
        args = cli._parser().parse_args(["resummarize", "--missing", "--wait", "--timeout", "10"])
        assert await cli._resummarize(args, settings) == 0
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await worker.close()
    out = capsys.readouterr().out
    assert "s1: summarised" in out
    assert "1 done, 0 failed" in out
    assert (await summary_row(db, "s1"))["summary"]


async def test_redis_down_at_disconnect_is_caught_up_by_the_sweeper(
    client, db, redis, fake_llm, run_worker, redis_control
):
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    await ws.send_str("hello while redis is fine")
    await receive_until(ws, "response.done")
    await redis_control.stop()
    await ws.close()

    async def ended() -> Any:
        return (await summary_row(db, "s1"))["end_time"]

    await eventually(ended)

    async def failure_counted() -> bool:
        text = await (await client.get("/metrics")).text()
        return "rt_summary_enqueue_failures_total 1.0" in text

    await eventually(failure_counted, timeout=10)
    await redis_control.start()

    # The sweeper finds the ended session without a summary.
    await ArqRedis(connection_pool=redis.connection_pool).enqueue_job(SWEEP_JOB)
    await run_worker()
    row = await summary_row(db, "s1")
    assert row["summary"] and row["summarized_through"] == row["last_id"]


async def test_a_worker_killed_mid_job_leaves_the_job_for_the_next_worker(db, redis, fake_llm, run_worker, settings):
    await ended_session(settings, "s1", "summarise me")
    arq = ArqRedis(connection_pool=redis.connection_pool)
    await arq.enqueue_job("summarize_session", "s1", _job_id="summary:s1:1")

    fake_llm.script(fake.hang())
    arq_bin = os.path.join(os.path.dirname(sys.executable), "arq")
    proc = await asyncio.create_subprocess_exec(
        arq_bin,
        "worker.WorkerSettings",
        env=service_env(settings, SUMMARY_JOB_TIMEOUT_S="1", LLM_FIRST_TOKEN_TIMEOUT_S="60"),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: asyncio.sleep(0, result=summary_requests(fake_llm)), timeout=20)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    # The next worker takes the job over once the dead one's claim on it expires.
    await run_worker(summary_job_timeout_s=1)
    row = await summary_row(db, "s1")
    assert row["summary"] == "You said: User: summarise me"
    assert row["summarized_through"] == row["last_id"]


async def test_a_server_killed_mid_session_is_ended_and_summarised_by_the_sweeper(
    db, redis, fake_llm, run_worker, settings
):
    server, port = await start_server(settings, PRESENCE_TTL_S="1")
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/s1")
            await receive(ws)
            await ws.send_str("the server is about to die")
            events = await receive_until(ws, "response.done")
            # Killed only once both messages are durably stored: the sweeper must find them.
            stored = sum(e["type"] == "message.stored" for e in events)
            while stored < 2:
                stored += (await receive(ws))["type"] == "message.stored"
            server.send_signal(signal.SIGKILL)
            await server.wait()
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()

    row = await summary_row(db, "s1")
    assert row["end_time"] is None
    # The dead server's hold expires within PRESENCE_TTL_S; then the sweeper ends and summarises the session.
    await asyncio.sleep(1.5)
    arq = ArqRedis(connection_pool=redis.connection_pool)
    await arq.enqueue_job(SWEEP_JOB)
    await run_worker(session_stale_s=0.5)
    row = await summary_row(db, "s1")
    assert row["end_time"] is not None
    assert row["summary"] and row["summarized_through"] == row["last_id"]


async def test_a_live_session_is_not_ended_by_the_sweeper(client, db, redis, fake_llm, run_worker):
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    await ws.send_str("still here")
    await receive_until(ws, "response.done")
    arq = ArqRedis(connection_pool=redis.connection_pool)
    await arq.enqueue_job(SWEEP_JOB)
    await run_worker(session_stale_s=0.01)
    row = await summary_row(db, "s1")
    assert row["end_time"] is None and row["summary"] is None
    await ws.close()


def run_cli(settings: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=service_env(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_resummarize_refuses_unknown_sessions_and_bad_dates_clearly(db, settings):
    result = await asyncio.to_thread(run_cli, settings, "resummarize", "nope")
    assert result.returncode == 2
    assert "unknown session(s): nope" in result.stderr

    result = await asyncio.to_thread(run_cli, settings, "resummarize", "--all", "--since", "yesterday")
    assert result.returncode == 2
    assert "invalid date 'yesterday'" in result.stderr

    result = await asyncio.to_thread(run_cli, settings, "resummarize")
    assert result.returncode == 2


async def test_resummarize_dry_run_says_what_it_would_do_for_each_session(
    client, db, redis, fake_llm, run_worker, settings
):
    await chat_and_leave(client, "s1", "one")
    await eventually(lambda: queued(redis))
    await run_worker()
    await chat_and_leave(client, "s2", "two")

    async def both_ended() -> bool:
        return bool(await db.fetchval("select count(*) = 2 from sessions where end_time is not null"))

    await eventually(both_ended)
    before = await eventually(lambda: queued(redis))  # s2's job, from the server
    result = await asyncio.to_thread(run_cli, settings, "resummarize", "--all", "--dry-run")
    assert result.returncode == 0, result.stderr
    # --all summarises every ended session again, the up-to-date ones too.
    assert "would re-summarise s1" in result.stdout
    assert "would summarise s2" in result.stdout
    assert "2 of 2 session(s) would be (re-)summarised; nothing enqueued" in result.stdout

    # Named sessions: one already summarised is left alone unless forced.
    result = await asyncio.to_thread(run_cli, settings, "resummarize", "s1", "s2", "--dry-run")
    assert "would skip s1 (summary up to date" in result.stdout and "would summarise s2" in result.stdout
    assert await queued(redis) == before

    # A selection that finds nothing says why, not that everything is up to date.
    result = await asyncio.to_thread(run_cli, settings, "resummarize", "--all", "--until", "2020-01-01", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dry run: no ended session started before 2020-01-01T00:00:00+00:00; nothing would be enqueued" in (
        result.stdout
    )
    result = await asyncio.to_thread(run_cli, settings, "resummarize", "--all", "--until", "2020-01-01")
    assert "nothing to summarise: no ended session started before 2020-01-01" in result.stdout


async def test_resummarize_wait_gives_up_when_no_worker_takes_the_jobs(client, db, redis, settings):
    await chat_and_leave(client, "s1", "nobody will summarise this")
    await eventually(lambda: db.fetchval("select end_time from sessions where session_id = 's1'"))

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await asyncio.to_thread(run_cli, settings, "resummarize", "s1", "--wait", "--timeout", "1")
    assert loop.time() - started < 20
    assert result.returncode == 1
    assert "enqueued 1 job(s)" in result.stdout
    assert "gave up waiting after 1 s: 1 job(s) not finished; no worker is running" in result.stderr


async def test_the_worker_process_rides_out_a_redis_outage_and_a_restart(
    db, redis, fake_llm, settings, redis_control, tmp_path
):
    log = tmp_path / "worker.log"
    proc = await start_worker_process(settings, log)
    arq = ArqRedis.from_url(settings.redis_url)

    async def heartbeat() -> bool:
        with contextlib.suppress(RedisError, OSError):
            return bool(await arq.exists("arq:queue:health-check"))
        return False

    async def summarised(session_id: str) -> Any:
        return await db.fetchval("select summary from sessions where session_id = $1", session_id)

    try:
        await eventually(heartbeat, timeout=20)

        # A long outage: Redis is away for many of the worker's polls (every 50 ms).
        await redis_control.stop()
        await asyncio.sleep(3)
        assert proc.returncode is None, log.read_text()
        await redis_control.start()
        # The test Redis keeps nothing across a restart: the worker writes its heartbeat again at once.
        await eventually(heartbeat, timeout=15)
        await ended_session(settings, "s1", "after the outage")
        await eventually(lambda: arq.enqueue_job("summarize_session", "s1", _job_id="after-outage"))
        assert await eventually(lambda: summarised("s1"), timeout=15) == "You said: User: after the outage"

        # A restart, quicker than a poll or two.
        await redis_control.stop()
        await redis_control.start()
        await ended_session(settings, "s2", "after the restart")
        await eventually(lambda: arq.enqueue_job("summarize_session", "s2", _job_id="after-restart"), timeout=10)
        assert await eventually(lambda: summarised("s2"), timeout=15) == "You said: User: after the restart"
        assert proc.returncode is None

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await arq.aclose()

    text = log.read_text()
    # One warning per outage, not one per poll; and at INFO one line per job, none of arq's per-job chatter.
    assert 1 <= text.count("redis is unreachable") <= 2, text
    assert text.count("outcome=summarised") == 2, text
    assert "→" not in text and "recording health" not in text, text


async def test_the_worker_logs_in_the_servers_format_and_keeps_arqs_chatter_at_debug(
    db, redis, fake_llm, settings, tmp_path
):
    """`arq worker.WorkerSettings` as a user runs it: arq's own lines come out like ours, not as `18:41:19: ...`."""
    logs = {}
    for name, env in (("info", {}), ("debug", {"LOG_LEVEL": "DEBUG"}), ("json", {"LOG_FORMAT": "json"})):
        session_id = f"log-{name}"
        await ended_session(settings, session_id, f"a line for the {name} log")
        logs[name] = tmp_path / f"worker-{name}.log"
        proc = await start_worker_process(settings, logs[name], **env)
        try:
            arq = ArqRedis.from_url(settings.redis_url)
            try:
                await arq.enqueue_job("summarize_session", session_id, _job_id=f"logs-{name}")
            finally:
                await arq.aclose()
            await eventually(
                lambda sid=session_id: db.fetchval("select summary from sessions where session_id = $1", sid),
                timeout=15,
            )
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    line_re = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) [\w.]+ ")
    info = logs["info"].read_text().splitlines()
    assert info and all(line_re.match(line) for line in info), info
    # arq's start and stop lines are there, as ours; its per-job lines, cron runs and heartbeat are not, at INFO.
    assert any(" INFO arq.worker Starting worker for " in line for line in info), info
    assert any(" INFO arq.worker shutdown on SIGTERM" in line for line in info), info
    assert sum("summary job done" in line and "outcome=summarised" in line for line in info) == 1, info
    assert not [line for line in info if "→" in line or "←" in line or "recording health" in line], info

    # LOG_LEVEL=DEBUG shows them, in the same format.
    debug = logs["debug"].read_text().splitlines()
    assert all(line_re.match(line) for line in debug), debug
    assert any(" DEBUG arq.worker " in line and "summarize_session" in line and "→" in line for line in debug), debug

    # LOG_FORMAT=json: every line is one JSON object, with the same kind of timestamp.
    entries = [orjson.loads(line) for line in logs["json"].read_text().splitlines()]
    assert entries and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["ts"]) for e in entries)
    assert any(e["logger"] == "arq.worker" and e["event"].startswith("Starting worker") for e in entries), entries


@pytest.mark.parametrize("n_messages", [40])
async def test_a_long_history_is_summarised_in_chunks_then_combined(
    client, db, redis, fake_llm, run_worker, n_messages
):
    await chat_and_leave(client, "s1", *[f"message number {i} " + "x" * 50 for i in range(n_messages)])
    await eventually(lambda: queued(redis))
    await run_worker(summary_chunk_chars=1000)

    summaries = summary_requests(fake_llm)
    assert len(summaries) > 2
    combine = summaries[-1]
    assert combine["messages"][0]["content"].startswith("These are summaries")
    # Every chunk stays within the budget, and together they cover every message once.
    chunks = [r["messages"][1]["content"] for r in summaries[:-1]]
    assert all(len(c) <= 1000 for c in chunks)
    assert sum(c.count("User: message number") for c in chunks) == n_messages
    row = await summary_row(db, "s1")
    assert row["summary"] == fake_llm.reply_for(combine["messages"])


async def test_the_worker_reports_its_jobs_on_metrics_and_answers_arq_check(client, db, redis, fake_llm, settings):
    await chat_and_leave(client, "s1", "count me")
    await eventually(lambda: queued(redis))
    port = free_port()
    options = worker_options(settings.replace(worker_metrics_port=port))
    options.update(cron_jobs=None, handle_signals=False, poll_delay=0.05)
    worker = Worker(**options)
    running = asyncio.create_task(worker.async_run())
    try:
        async with aiohttp.ClientSession() as http:

            async def counted() -> str | None:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        text = await resp.text()
                        return text if 'rt_worker_jobs_total{outcome="summarised"} 1.0' in text else None
                return None

            text = await eventually(counted, timeout=10)
        assert "rt_summary_seconds_count 1.0" in text

        check = await asyncio.create_subprocess_exec(
            os.path.join(os.path.dirname(sys.executable), "arq"),
            "--check",
            "worker.WorkerSettings",
            env=service_env(settings),
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert await check.wait() == 0
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await worker.close()


def test_by_default_a_dead_servers_session_is_ended_within_about_a_minute():
    """The hold expires (PRESENCE_TTL_S), the session is quiet for SESSION_STALE_S, and the next sweep ends it: the
    killed-server test above runs that path with short times; these are the times a deployment gets."""
    from core.settings import Settings

    settings = Settings()
    [sweep] = [c for c in worker_options(settings)["cron_jobs"] if c.name == "sweep_sessions_cron"]
    ticks = sorted(sweep.second)
    ticks.append(ticks[0] + 60)
    gap = max(b - a for a, b in itertools.pairwise(ticks))
    assert settings.presence_ttl_s + settings.session_stale_s + gap <= 60
