"""One client's WebSocket on a session: reading frames, answering messages one at a time, storing every turn."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from core.errors import LLMError, ProtocolError
from core.llm import LLM, StreamStats
from core.settings import Settings
from core.store import AI_MESSAGE, CONNECTED, DISCONNECTED, USER_MESSAGE, NewEvent

from . import protocol
from .metrics import Metrics
from .protocol import Cancel, Ping, UserMessage
from .ratelimit import TokenBucket, UserRateLimiter
from .sessions import Session

log = logging.getLogger(__name__)

# aiohttp raises ClientConnectionResetError (a ConnectionResetError) when writing to a closing socket.
_SEND_ERRORS = (ConnectionError,)


@dataclass(slots=True)
class _Turn:
    text: str
    client_msg_id: str | None
    received_at: float  # time.time(), comparable with other processes' clocks on the machine


class _ClientGone(Exception):
    """The socket closed while an answer was streaming to it."""


class Connection:
    """Owns one socket for the life of the connection. Only `run` reads the socket; any task may send."""

    def __init__(
        self,
        session: Session,
        ws: web.WebSocketResponse,
        *,
        llm: LLM,
        settings: Settings,
        metrics: Metrics,
        user_id: str | None = None,
        user_rate: UserRateLimiter | None = None,
    ) -> None:
        self.session = session
        self._user_id = user_id
        self._user_rate = user_rate
        self._ws = ws
        self._llm = llm
        self._settings = settings
        self._metrics = metrics
        self._waiting: deque[_Turn] = deque()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._answer: asyncio.Task[None] | None = None
        self._closing = False
        # Set at shutdown: the answer streaming now may finish, waiting turns are not started.
        self._draining = False
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._limiter = TokenBucket(settings.messages_per_minute)
        self._messages = 0
        self._started = time.monotonic()
        self._last_frame = asyncio.get_running_loop().time()
        self._watchdog: asyncio.TimerHandle | None = None
        self._close_sent: int | None = None

    # Life cycle.

    async def run(self, ready: bytes, *, on_closed: Callable[[], None]) -> None:
        """Send `session.ready`, serve frames until the socket closes, then wind the connection down.

        The wind-down is shielded: even when the handler is cancelled (aiohttp may, when the peer
        vanishes) the partial answer and the `disconnected` event are stored, then `on_closed` runs.
        """
        self._record(CONNECTED, None)
        try:
            await self._send(ready)
            await self._read_frames()
        finally:
            await asyncio.shield(self._wind_down(on_closed))

    async def replace(self) -> None:
        """A newer connection takes the session over: stop the answer (the client still gets its `response.done`,
        and the partial answer is stored), close with 4000, and wait until this connection let go."""
        self._draining = True
        await self._stop_turns()
        await self.close(protocol.CLOSE_REPLACED, "replaced by a newer connection")
        await self._closed.wait()

    async def finish_answer(self) -> None:
        """Shutdown: let the answer in flight finish, start no other; messages still arriving are stored."""
        self._draining = True
        if self._answer is not None:
            await asyncio.wait((self._answer,))

    def expire(self) -> None:
        """The caller's access token ran out: end the session with 1008 (policy)."""
        self._spawn(self.close(WSCloseCode.POLICY_VIOLATION, "the access token expired"))

    async def close(self, code: int, message: str) -> None:
        # Recorded: after the handshake aiohttp reports the client's reply (usually 1000), not our reason.
        self._close_sent = code
        await self._ws.close(code=code, message=message.encode())

    async def _stop_turns(self) -> None:
        """Cancel the answer in flight (its `response.done` still goes out) and wait for the turn runner to stop;
        the caller has set `_draining` or `_closing`, so it starts no other turn."""
        if self._answer is not None:
            self._answer.cancel()
        self._wake.set()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    async def _wind_down(self, on_closed: Callable[[], None]) -> None:
        # The partial answer and the `disconnected` event are submitted before the session is let go,
        # so they are stored in order, before anything a newer connection writes.
        self._closing = True
        await self._stop_turns()
        self._waiting.clear()
        close_code = self._close_sent or self._ws.close_code
        self.session.last_event = self._record(DISCONNECTED, None, {"close_code": close_code})
        self.session.ended_at = datetime.now(UTC)
        if self.session.connection is self:
            self.session.connection = None
        for task in list(self._tasks):
            task.cancel()
        self._closed.set()
        on_closed()
        log.info(
            "disconnected",
            extra={
                "fields": {
                    "session_id": self.session.id,
                    "close_code": close_code,
                    "messages": self._messages,
                    "duration_s": round(time.monotonic() - self._started, 3),
                }
            },
        )

    # Reading.

    async def _read_frames(self) -> None:
        ws = self._ws
        loop = asyncio.get_running_loop()
        if self._settings.idle_timeout_s:
            self._watchdog = loop.call_later(self._settings.idle_timeout_s, self._check_idle)
        try:
            while True:
                msg = await ws.receive()
                self._last_frame = loop.time()
                if msg.type is WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await self._reject(ProtocolError(protocol.UNSUPPORTED_FRAME, "binary frames are not supported"))
                else:
                    # CLOSE, CLOSING, CLOSED or ERROR (a frame over the size limit closes with 1009 in aiohttp).
                    return
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()

    def _check_idle(self) -> None:
        """No frame from the client for IDLE_TIMEOUT_S while nothing was being answered: end the session (4001)."""
        loop = asyncio.get_running_loop()
        idle_s = self._settings.idle_timeout_s
        if self._answer is not None or self._waiting:
            # Busy answering: a silent client is reading, not idle.
            self._last_frame = max(self._last_frame, loop.time())
        due = self._last_frame + idle_s
        if loop.time() >= due:
            self._watchdog = None
            self._spawn(self.close(protocol.CLOSE_IDLE, "idle for too long"))
        else:
            self._watchdog = loop.call_at(due, self._check_idle)

    async def _on_text(self, text: str) -> None:
        received_at = time.time()
        try:
            frame = protocol.parse_frame(text, max_message_bytes=self._settings.max_message_bytes)
        except ProtocolError as e:
            await self._reject(e)
            return
        if isinstance(frame, UserMessage):
            await self._on_message(frame, received_at)
        elif isinstance(frame, Cancel):
            if self._answer is not None:
                self._answer.cancel()
        elif isinstance(frame, Ping):
            await self._send(protocol.PONG)

    async def _reject(self, error: ProtocolError) -> None:
        self._metrics.frames_rejected.labels(error.code).inc()
        await self._send(protocol.error(error.code, str(error)))

    async def _on_message(self, message: UserMessage, received_at: float) -> None:
        session = self.session
        cmid = message.client_msg_id
        if cmid is not None and cmid in session.client_msgs:
            # An idempotent retry: acknowledge again, never store or answer twice.
            self._ack_when_stored(session.client_msgs[cmid], lambda i: protocol.user_message_stored(i, cmid))
            return
        if session.turns >= self._settings.max_turns_per_session:
            # The protocol has no code of its own for this; `rate_limited` with a message that says which limit.
            limit = self._settings.max_turns_per_session
            await self._reject(
                ProtocolError(
                    protocol.RATE_LIMITED, f"this session has reached its limit of {limit} turns; start a new session"
                )
            )
            return
        if not self._limiter.allow():
            await self._reject(ProtocolError(protocol.RATE_LIMITED, "too many messages; slow down and try again"))
            return
        if self._user_id is not None and self._user_rate is not None and not self._user_rate.allow(self._user_id):
            await self._reject(
                ProtocolError(protocol.RATE_LIMITED, "too many messages from this user across connections; slow down")
            )
            return
        if self._runner_busy() and len(self._waiting) >= self._settings.max_pending_messages:
            await self._reject(ProtocolError(protocol.BUSY, "too many messages are waiting for an answer"))
            return

        stored = self._record(USER_MESSAGE, message.text, client_msg_id=cmid)
        if cmid is not None:
            session.client_msgs[cmid] = stored
            stored.add_done_callback(lambda f: self._settle_client_msg(cmid, f))
        self._ack_when_stored(stored, lambda i: protocol.user_message_stored(i, cmid))
        self._messages += 1
        session.turns += 1
        self._metrics.messages_accepted.inc()

        self._waiting.append(_Turn(message.text, cmid, received_at))
        if self._runner is None:
            self._runner = asyncio.create_task(self._run_turns(), name=f"turns:{session.id}")
        self._wake.set()

    def _runner_busy(self) -> bool:
        return self._answer is not None or bool(self._waiting)

    # Answering.

    async def _run_turns(self) -> None:
        while not self._closing and not self._draining:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._answer_turn(self._waiting.popleft())

    async def _answer_turn(self, turn: _Turn) -> None:
        response_id = "resp_" + secrets.token_hex(8)
        context = self.session.context
        context.add("user", turn.text)
        messages = context.messages()
        stats = StreamStats()
        parts: list[str] = []
        # Written before the answer task exists, so no delta can overtake it.
        await self._send(protocol.response_started(response_id, turn.client_msg_id))
        timing: dict[str, float] = {}
        answer = asyncio.create_task(
            self._stream(response_id, messages, stats, parts, timing), name=f"answer:{response_id}"
        )
        self._answer = answer
        if self._closing:
            answer.cancel()
        await asyncio.wait((answer,))
        self._answer = None

        error: LLMError | None = None
        exc = None if answer.cancelled() else answer.exception()
        if answer.cancelled() or isinstance(exc, _ClientGone):
            status = protocol.CANCELLED
        elif isinstance(exc, LLMError):
            status, error = protocol.FAILED, exc
        elif exc is not None:
            log.error("answer crashed", exc_info=exc, extra={"fields": {"session_id": self.session.id}})
            status, error = protocol.FAILED, LLMError("the answer failed unexpectedly")
        else:
            status = protocol.COMPLETED

        partial = "".join(parts)
        text = self._settings.fallback_text if error is not None else partial
        if error is None:
            context.add("assistant", text)
        await self._send(
            protocol.response_done(
                response_id,
                status=status,
                text=text,
                error_code=None if error is None else error.code,
                error_message="" if error is None else str(error),
            )
        )
        elapsed = time.time() - turn.received_at
        metadata: dict[str, Any] = {
            "status": status,
            "response_id": response_id,
            "model": self._llm.model,
            "latency_ms": round(elapsed * 1000, 1),
            "first_token_ms": None if stats.first_token_s is None else round(stats.first_token_s * 1000, 1),
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "retries": stats.retries,
            "in_reply_to": turn.client_msg_id,
            # Wall-clock times (epoch seconds): when the message arrived and when its first delta left.
            "received_at": round(turn.received_at, 6),
            "first_delta_at": timing.get("first_delta_at"),
        }
        if error is not None:
            metadata["error"] = {"code": error.code, "message": str(error)}
            if partial:
                metadata["partial_text"] = partial
        stored = self._record(AI_MESSAGE, text, metadata, event_key=response_id)
        self._ack_when_stored(stored, lambda i: protocol.answer_stored(i, response_id))
        self._observe(status, error, stats, len(parts), elapsed)

    async def _stream(
        self, response_id: str, messages: Any, stats: StreamStats, parts: list[str], timing: dict[str, float]
    ) -> None:
        send = self._ws.send_frame
        delta = protocol.response_delta
        text = WSMsgType.TEXT
        async with aclosing(self._llm.stream(messages, stats)) as pieces:
            try:
                # The first piece is timed (the relay's added latency is measured from it); the loop that
                # carries the rest of the answer does nothing but append and send.
                async for piece in pieces:
                    parts.append(piece)
                    await send(delta(response_id, piece), text)
                    timing["first_delta_at"] = time.time()
                    break
                async for piece in pieces:
                    parts.append(piece)
                    await send(delta(response_id, piece), text)
            except _SEND_ERRORS as e:
                raise _ClientGone from e

    def _observe(self, status: str, error: LLMError | None, stats: StreamStats, deltas: int, elapsed: float) -> None:
        m = self._metrics
        m.answers.labels(status).inc()
        m.tokens_streamed.inc(deltas)
        if stats.completion_tokens:
            m.completion_tokens.inc(stats.completion_tokens)
        if stats.retries:
            m.llm_retries.inc(stats.retries)
        if stats.first_token_s is not None:
            m.first_token.observe(stats.first_token_s)
        if error is not None:
            m.llm_errors.labels(error.code).inc()
        log.info(
            "answer done",
            extra={
                "fields": {
                    "session_id": self.session.id,
                    "status": status,
                    "error": None if error is None else error.code,
                    "first_token_ms": None if stats.first_token_s is None else round(stats.first_token_s * 1000, 1),
                    "total_ms": round(elapsed * 1000, 1),
                    "deltas": deltas,
                    "prompt_tokens": stats.prompt_tokens,
                    "completion_tokens": stats.completion_tokens,
                    "retries": stats.retries,
                }
            },
        )

    # Storing and sending.

    def _record(
        self,
        event_type: str,
        content: str | None,
        metadata: dict[str, Any] | None = None,
        *,
        client_msg_id: str | None = None,
        event_key: str | None = None,
    ) -> asyncio.Future[int]:
        event = NewEvent(
            session_id=self.session.id,
            event_type=event_type,
            content=content,
            event_key=event_key or secrets.token_hex(12),
            created_at=datetime.now(UTC),
            client_msg_id=client_msg_id,
            metadata=metadata or {},
        )
        return self.session.writer.submit(event)

    def _settle_client_msg(self, cmid: str, stored: asyncio.Future[int]) -> None:
        if stored.cancelled() or stored.exception() is not None:
            # Never stored: forget it, so the client's retry is taken as new.
            if self.session.client_msgs.get(cmid) is stored:
                del self.session.client_msgs[cmid]
        else:
            self.session.client_msgs[cmid] = stored.result()

    def _ack_when_stored(self, stored: int | asyncio.Future[int], frame: Any) -> None:
        """Send `frame(id)` once the event is committed: `message.stored` never runs ahead of the database."""
        if isinstance(stored, int):
            self._spawn(self._send(frame(stored)))
            return

        def done(f: asyncio.Future[int]) -> None:
            if not f.cancelled() and f.exception() is None and not self._closed.is_set():
                self._spawn(self._send(frame(f.result())))

        stored.add_done_callback(done)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, frame: bytes) -> None:
        if self._ws.closed:
            return
        # A peer that is gone: the read loop sees the close and winds the connection down.
        with suppress(*_SEND_ERRORS):
            await self._ws.send_frame(frame, WSMsgType.TEXT)
