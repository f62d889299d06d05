"""Answers whose server died: stored with the text streamed so far, as `interrupted`, once.

The generating server keeps a lease on each running answer (`rt:answers`, core/livestream.py). One whose lease ran
out without a `done` in its stream lost its server: this job writes what the stream holds to the database (keyed by
the response id, so a second try, or the server itself, stores nothing twice) and tells the session's followers.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis

from core import livestream as ls
from core.store import AI_MESSAGE, NewEvent, Store

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"


async def recover_answers(ctx: dict[str, Any]) -> dict[str, int]:
    redis: ArqRedis = ctx["redis"]
    store: Store = ctx["store"]
    expired = await redis.zrangebyscore(ls.ANSWERS_KEY, 0, time.time())
    recovered = 0
    for raw in expired:
        member = raw.decode() if isinstance(raw, bytes) else str(raw)
        session_id, response_id = ls.split_member(member)
        if await redis.exists(ls.answer_key(session_id)):
            continue  # Renewed meanwhile: its server lives.
        rows = await redis.xrange(ls.events_key(session_id))
        answer = ls.read_answer((ls.text_of(fields) for _, fields in rows), response_id)
        if answer.done is None:
            await _store(redis, store, session_id, answer)
            recovered += 1
        await redis.zrem(ls.ANSWERS_KEY, member)
    if recovered:
        log.info("answers recovered", extra={"fields": {"answers": recovered}})
    return {"expired": len(expired), "recovered": recovered}


async def _store(redis: ArqRedis, store: Store, session_id: str, answer: ls.AnswerSoFar) -> None:
    text, rid = answer.text, answer.response_id
    metadata = {"status": INTERRUPTED, "response_id": rid, "in_reply_to": answer.client_msg_id, "recovered": True}
    event = NewEvent(
        session_id=session_id,
        event_type=AI_MESSAGE,
        content=text,
        event_key=rid,
        created_at=datetime.now(UTC),
        metadata=metadata,
    )
    [event_id] = await store.append_events([event])
    key = ls.events_key(session_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(
            key, {"k": ls.DONE, "rid": rid, "status": INTERRUPTED, "text": text, "error_code": "", "error_message": ""}
        )
        pipe.xadd(key, {"k": ls.STORED, "rid": rid, "id": str(event_id), "text": text, "status": INTERRUPTED})
        pipe.pexpire(key, ls.STREAM_TTL_MS)
        await pipe.execute()
    log.info(
        "answer recovered",
        extra={"fields": {"session_id": session_id, "response_id": rid, "chars": len(text), "event_id": event_id}},
    )
