"""The benchmark runs end to end at a tiny size, so it cannot rot (no timing is asserted here)."""

from __future__ import annotations

import asyncio
import os
import sys

from core.settings import REPO_ROOT


async def test_the_bench_runs_and_prints_its_table(db, settings):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        "--sessions",
        "1,3",
        "--tokens",
        "5",
        "--gap-ms",
        "1",
        "--ttft-ms",
        "5",
        "--throughput-sessions",
        "3",
        "--throughput-tokens",
        "20",
        "--idle",
        "20",
        "--naive-sessions",
        "3",
        "--summary-sessions",
        "2",
        "--summary-jobs",
        "3",
        "--summary-min-sessions",
        "4",
        env={**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url},
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(120):
        out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "added latency" in text
    assert "relay throughput at saturation" in text
    assert "idle connections: 20 open" in text and "all held" in text and "bare aiohttp" in text
    assert "a bare asyncio protocol (no aiohttp)" in text
    # The naive relay ran beside ours, both relaying every token.
    assert "naive relay (bench/naive.py) against ours" in text and "unpaced" in text
    assert "tokens received" not in text
    # A real worker summarised every session the summaries part ended (it waits for each summary to be stored, and
    # checks that arq recorded each job as done).
    assert "summaries (one worker process" in text
    section = text.split("summaries (one worker process", 1)[1].split("\n\n", 1)[0].splitlines()
    header = next(i for i, line in enumerate(section) if line.split()[:3] == ["sessions", "stored", "p50"])
    assert [line.split()[0] for line in section[header + 1 :]] == ["2", "3"]
    assert "nan" not in "\n".join(section[header + 1 :])
