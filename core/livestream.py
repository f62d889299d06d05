"""A session's live events in Redis, as the server that generates an answer publishes them and the other servers
(and the worker's recovery) read them: key names, entry kinds, and reading one answer back out of the stream.

Per session, one Redis Stream `rt:{<session_id>}:events` of entries (all fields text):
    started  rid, cmid            an answer began (on the server in `server`)
    delta    rid, text, seq, lens the pieces up to `seq` since the previous delta entry, coalesced; `lens` the
                                  length of each, so a catch-up can start after any `seq`
    done     rid, status, text, error_code, error_message
    stored   rid, id, text, status    the answer is in the database
    message  id, cmid, text       a user message is in the database
and `rt:{<session_id>}:answer`, the running answer (rid, cmid, server, start entry id) with a lease the generating
server renews; `rt:answers` orders every running answer by its lease's deadline, for recovery. The braces are
Redis Cluster hash tags: a session's keys live in one slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

ANSWERS_KEY: Final = "rt:answers"
CANCEL_CHANNEL: Final = "rt:cancel"
# Entries kept per session stream (approximate trim): far more than one answer's coalesced deltas.
STREAM_MAXLEN: Final = 2000
STREAM_TTL_MS: Final = 600_000

STARTED: Final = "started"
DELTA: Final = "delta"
DONE: Final = "done"
STORED: Final = "stored"
MESSAGE: Final = "message"


def events_key(session_id: str) -> str:
    return f"rt:{{{session_id}}}:events"


def answer_key(session_id: str) -> str:
    return f"rt:{{{session_id}}}:answer"


def answer_member(session_id: str, response_id: str) -> str:
    return f"{session_id}\x00{response_id}"


def split_member(member: str) -> tuple[str, str]:
    session_id, _, response_id = member.partition("\x00")
    return session_id, response_id


def text_of(fields: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """An entry's fields as text (redis-py returns bytes)."""
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }


@dataclass(slots=True)
class AnswerSoFar:
    """One answer as its stream entries tell it."""

    response_id: str
    client_msg_id: str | None = None
    # One string per upstream piece, as on the server that generates the answer: `seq` is their count.
    parts: list[str] = field(default_factory=list)
    done: dict[str, str] | None = None
    stored: dict[str, str] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def seq(self) -> int:
        return len(self.parts)

    def add(self, entry: Mapping[str, str]) -> None:
        kind = entry.get("k")
        if kind == STARTED:
            self.client_msg_id = entry.get("cmid") or None
        elif kind == DELTA:
            text, at = entry.get("text", ""), 0
            for length in (int(n) for n in entry.get("lens", str(len(text))).split(",") if n):
                self.parts.append(text[at : at + length])
                at += length
        elif kind == DONE:
            self.done = dict(entry)
        elif kind == STORED:
            self.stored = dict(entry)


def read_answer(entries: Iterable[Mapping[str, str]], response_id: str) -> AnswerSoFar:
    """The answer `response_id` from a session's entries, oldest first."""
    answer = AnswerSoFar(response_id)
    for entry in entries:
        if entry.get("rid") == response_id:
            answer.add(entry)
    return answer
