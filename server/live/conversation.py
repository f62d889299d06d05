"""A session's conversation: the messages waiting for an answer, the answer being generated, and the context the
model sees. It speaks to a sink of frames and knows nothing of sockets."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from core.errors import LLMError, ProtocolError
from core.llm import LLM
from core.settings import Settings
from core.store import AI_MESSAGE, USER_MESSAGE, NewEvent, StoredEvent

from .. import protocol
from ..eventlog import EventWriter
from ..metrics import Metrics
from . import answer as answers
from .answer import Answer, Turn
from .context import Context

log = logging.getLogger(__name__)

SHUTTING_DOWN = "shutting_down"


class Sink(Protocol):
    """Where the conversation's frames go (the writing connection's outbox)."""

    async def send(self, frame: bytes) -> None: ...

    def put(self, frame: bytes) -> None: ...


async def _nowhere(frame: bytes) -> None:
    pass


class Conversation:
    """Answers one message at a time, in the order received; every message and answer goes to the event log.

    `submit` never waits. A `cancel` stops only the answer streaming now (its partial text is stored); `stop`
    ends everything (the socket is gone); `drain` lets the answer in flight finish and answers nothing more.
    """

    def __init__(self, session_id: str, *, writer: EventWriter, llm: LLM, settings: Settings, metrics: Metrics) -> None:
        self.session_id = session_id
        self._writer = writer
        self._llm = llm
        self._settings = settings
        self._metrics = metrics
        self.context = Context(settings.system_prompt, max_chars=settings.context_max_chars)
        self.sink: Sink | None = None
        # client_msg_id -> its stored id, or the future of it while the write is pending.
        self._client_msgs: dict[str, int | asyncio.Future[int]] = {}
        self._waiting: deque[Turn] = deque()
        self._answer: asyncio.Task[None] | None = None
        self._streaming = False
        self._cancel_asked = False
        self._draining = False
        # While the socket that asked goes away: messages are still stored, but not answered.
        self._stopping = False
        # User messages accepted over the session's life (MAX_TURNS_PER_SESSION), and the newest one's write.
        self.turns = 0
        self.last_message: asyncio.Future[int] | None = None

    def load(self, history: list[StoredEvent], *, turns: int) -> None:
        self.context.load(history)
        for event in history:
            if event.event_type == USER_MESSAGE and event.client_msg_id is not None:
                self._client_msgs[event.client_msg_id] = event.id
        self.turns = turns

    @property
    def busy(self) -> bool:
        return self._answer is not None or bool(self._waiting)

    def known(self, client_msg_id: str | None) -> int | asyncio.Future[int] | None:
        """The stored id (or its pending write) of a message already accepted under this client_msg_id."""
        return None if client_msg_id is None else self._client_msgs.get(client_msg_id)

    def submit(self, text: str, client_msg_id: str | None, received_at: float) -> asyncio.Future[int]:
        """Accept a user message: stored, and answered in turn. Raises ProtocolError when it is not accepted;
        while draining it is stored and then refused for answering (`shutting_down`)."""
        settings = self._settings
        if self.turns >= settings.max_turns_per_session:
            # The protocol has no code of its own for this; `rate_limited` with a message that says which limit.
            limit = settings.max_turns_per_session
            raise ProtocolError(
                protocol.RATE_LIMITED, f"this session has reached its limit of {limit} turns; start a new session"
            )
        if self.busy and len(self._waiting) >= settings.max_pending_messages:
            raise ProtocolError(protocol.BUSY, "too many messages are waiting for an answer")
        stored = self.last_message = self.record(USER_MESSAGE, text, client_msg_id=client_msg_id)
        if client_msg_id is not None:
            self._client_msgs[client_msg_id] = stored
            stored.add_done_callback(lambda f: self._settle(client_msg_id, f))
        self.turns += 1
        self._metrics.messages_accepted.inc()
        if self._draining:
            raise StoredNotAnswered(stored)
        if self._stopping:
            return stored
        turn = Turn(text, client_msg_id, received_at)
        if self._answer is None:
            self._start(turn)
        else:
            self._waiting.append(turn)
        return stored

    def cancel(self) -> None:
        """Stop the answer streaming now, if any; its `response.done` says `cancelled`."""
        if self._answer is None:
            return
        if self._streaming:
            self._answer.cancel()
        else:
            self._cancel_asked = True

    async def stop(self) -> None:
        """The socket that asked is gone: cancel the answer, forget what waits, and return once the answer's end
        is recorded. The conversation then takes messages again (from the next connection)."""
        self._stopping = True
        try:
            self._waiting.clear()
            answer = self._answer
            if answer is not None:
                self.cancel()
                await asyncio.wait((answer,))
        finally:
            self._stopping = False

    async def drain(self) -> None:
        """Shutdown: let the answer in flight finish; start no other."""
        self._draining = True
        self._waiting.clear()
        answer = self._answer
        if answer is not None:
            await asyncio.wait((answer,))

    def record(
        self,
        event_type: str,
        content: str | None,
        metadata: dict[str, Any] | None = None,
        *,
        client_msg_id: str | None = None,
        event_key: str | None = None,
    ) -> asyncio.Future[int]:
        """Append an event of this session to the event log; the future resolves with its id once committed."""
        event = NewEvent(
            session_id=self.session_id,
            event_type=event_type,
            content=content,
            event_key=event_key or secrets.token_hex(12),
            created_at=datetime.now(UTC),
            client_msg_id=client_msg_id,
            metadata=metadata or {},
        )
        return self._writer.submit(event)

    # Answering.

    def _start(self, turn: Turn) -> None:
        self._answer = asyncio.create_task(self._turn(turn), name=f"answer:{self.session_id}")

    async def _turn(self, turn: Turn) -> None:
        sink = self.sink
        send: Callable[[bytes], Awaitable[None]] = _nowhere if sink is None else sink.send
        answer = Answer("resp_" + secrets.token_hex(8))
        context = self.context
        context.add("user", turn.text)
        await send(protocol.response_started(answer.response_id, turn.client_msg_id))
        status, error = await self._stream(answer, send, context)
        text = self._settings.fallback_text if error is not None else answer.text
        if error is None:
            context.add("assistant", text)
        await send(
            protocol.response_done(
                answer.response_id,
                status=status,
                text=text,
                error_code=None if error is None else error.code,
                error_message="" if error is None else str(error),
            )
        )
        meta = answers.metadata(answer, turn, status=status, model=self._llm.model, error=error)
        self.last_message = stored = self.record(AI_MESSAGE, text, meta, event_key=answer.response_id)
        if sink is not None:
            rid = answer.response_id
            stored.add_done_callback(lambda f: _ack(sink, f, lambda i: protocol.answer_stored(i, rid)))
        answers.observe(self._metrics, self.session_id, answer, status=status, error=error)
        self._next()

    async def _stream(self, answer: Answer, send: Callable[[bytes], Awaitable[None]], context: Context) -> Any:
        if self._cancel_asked:
            return protocol.CANCELLED, None
        self._streaming = True
        try:
            await answers.stream(self._llm, context.messages(), answer, send, max_chars=self._settings.max_answer_chars)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return protocol.CANCELLED, None
        except LLMError as e:
            return protocol.FAILED, e
        except Exception as e:
            log.error("answer crashed", exc_info=e, extra={"fields": {"session_id": self.session_id}})
            return protocol.FAILED, LLMError("the answer failed unexpectedly")
        finally:
            self._streaming = False
        return protocol.COMPLETED, None

    def _next(self) -> None:
        self._cancel_asked = False
        if self._waiting and not (self._draining or self._stopping):
            self._start(self._waiting.popleft())
        else:
            self._answer = None

    def _settle(self, client_msg_id: str, stored: asyncio.Future[int]) -> None:
        if stored.cancelled() or stored.exception() is not None:
            # Never stored: forget it, so the client's retry is taken as new.
            if self._client_msgs.get(client_msg_id) is stored:
                del self._client_msgs[client_msg_id]
        else:
            self._client_msgs[client_msg_id] = stored.result()


class StoredNotAnswered(ProtocolError):
    """The message was stored but will not be answered here (the server is shutting down)."""

    def __init__(self, stored: asyncio.Future[int]) -> None:
        super().__init__(SHUTTING_DOWN, "the server is restarting: your message is stored but not answered here")
        self.stored = stored
        self.client_msg_id: str | None = None


def _ack(sink: Sink, stored: asyncio.Future[int], frame: Callable[[int], bytes]) -> None:
    if not stored.cancelled() and stored.exception() is None:
        sink.put(frame(stored.result()))
