"""Summary jobs as the server enqueues them: one per state of a session, never swallowed by another database's."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.conftest import eventually, receive, receive_until


async def _chat_and_leave(client, session_id: str, text: str) -> None:  # type: ignore[no-untyped-def]
    ws = await client.ws_connect(f"/ws/session/{session_id}")
    await receive(ws)
    await ws.send_str(text)
    await receive_until(ws, "response.done")
    await ws.close()


async def test_a_second_database_on_the_same_redis_gets_its_own_summary(
    make_client, run_worker, db, redis, pg_url, fake_llm
):
    # A session summarised in one database: arq keeps the job's result in Redis for a while.
    first = await make_client()
    await _chat_and_leave(first, "s1", "hello from the first deployment")
    await eventually(lambda: redis.zcard("arq:queue"))
    await run_worker()
    assert await db.fetchval("select summary from sessions where session_id = 's1'")
    await first.close()

    # A fresh database (a reset, a second deployment) on the same Redis: same session id, same event ids.
    await db.execute("drop database if exists test_second")
    await db.execute("create database test_second")
    parts = urlsplit(pg_url)
    second_url = urlunsplit(parts._replace(path="/test_second"))
    try:
        second = await make_client(database_url=second_url)
        await _chat_and_leave(second, "s1", "hello from the second deployment")
        await eventually(lambda: redis.zcard("arq:queue"))
        await run_worker(database_url=second_url)
        conn = await asyncpg.connect(second_url)
        try:
            summary = await conn.fetchval("select summary from sessions where session_id = 's1'")
        finally:
            await conn.close()
        assert summary, "the second database's session was never summarised"
        await second.close()
    finally:
        await db.execute("drop database if exists test_second with (force)")
