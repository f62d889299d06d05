"""The answer running now for a session, as a connection that arrives sees it: generated here (`local`) or on another
server (`remote`, as its Redis stream tells it), and the last answer stored."""

from __future__ import annotations

from typing import Any

from core.livestream import AnswerSoFar

from .. import protocol
from .answer import Answer, Turn
from .audience import Sink


class Running:
    """What `session.ready` names as `active_response`, and the catch-up a joining connection gets."""

    __slots__ = ("last_stored", "local", "remote")

    def __init__(self) -> None:
        self.local: tuple[Turn, Answer] | None = None
        self.remote: AnswerSoFar | None = None
        # (event id, its `message.stored` frame) of the newest answer stored.
        self.last_stored: tuple[int, bytes] | None = None

    def now(self) -> tuple[str, str | None, list[str]] | None:
        """(response id, client_msg_id, pieces so far) of the answer running now."""
        if self.local is not None:
            turn, answer = self.local
            return answer.response_id, turn.client_msg_id, answer.parts
        remote = self.remote
        if remote is not None and remote.done is None:
            return remote.response_id, remote.client_msg_id, remote.parts
        return None

    def active_response(self) -> dict[str, Any] | None:
        now = self.now()
        return None if now is None else {"response_id": now[0], "client_msg_id": now[1], "seq": len(now[2])}

    def join(self, sink: Sink, *, history_through: int, resume: tuple[str, int] | None) -> None:
        """A connection arriving mid-answer: `response.started` (resumed), the text so far after what it holds
        (`resume`), then, once the caller puts it in the audience, the live deltas. Synchronous, so nothing falls
        between the catch-up and the live deltas. An answer stored after the connection's history was read is
        sent as its `message.stored`."""
        if self.last_stored is not None and self.last_stored[0] > history_through:
            sink.put(self.last_stored[1])
        now = self.now()
        if now is None:
            return
        rid, cmid, parts = now
        held = resume[1] if resume is not None and resume[0] == rid else 0
        sink.put(protocol.response_started(rid, cmid, resumed=True))
        if len(parts) > held:
            sink.put(protocol.response_delta(rid, "".join(parts[held:]), len(parts)))
