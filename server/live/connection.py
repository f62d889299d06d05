"""One client's WebSocket on a session: frames in, calls on the conversation; frames out through one outbox."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import WSCloseCode

from core.errors import ProtocolError
from core.flag import Flag
from core.settings import Settings
from core.store import CONNECTED, DISCONNECTED
from core.tasks import TaskSet, succeeded

from .. import protocol
from ..metrics import Metrics
from ..protocol import Cancel, Ping, UserMessage
from ..ratelimit import TokenBucket, UserRateLimiter
from ..websocket import WebSocket
from .answer import StoredNotAnswered
from .outbox import Outbox
from .session import Session

log = logging.getLogger(__name__)

# RFC 6455's codes for a close frame without a status (the socket reports it as 0) and for no close frame at all
# (None: the peer vanished).
_NO_STATUS = 1005
_ABNORMAL = 1006


class Connection:
    """Owns one socket for the life of the connection: the socket calls it with each frame (`on_text`, ...),
    and anything sends through `outbox`, which never lets one stuck peer hold up anyone else."""

    # Slots, and no set until a write waits to be acknowledged: bytes held by every idle socket.
    __slots__ = (
        "__weakref__",
        "_close_sent",
        "_closed",
        "_closing",
        "_last_frame",
        "_limiter",
        "_messages",
        "_metrics",
        "_on_closed",
        "_settings",
        "_started",
        "_tasks",
        "_unacked",
        "_user_id",
        "_user_rate",
        "_watchdog",
        "_ws",
        "outbox",
        "session",
        "watch",
    )

    def __init__(
        self,
        session: Session,
        ws: WebSocket,
        outbox: Outbox,
        *,
        settings: Settings,
        metrics: Metrics,
        user_id: str | None = None,
        user_rate: UserRateLimiter | None = None,
        watch: bool = False,
    ) -> None:
        self.session = session
        # A watcher sees everything and changes nothing: it stores no event and holds no session.
        self.watch = watch
        self.outbox = outbox
        self._ws = ws
        self._settings = settings
        self._metrics = metrics
        self._user_id = user_id
        self._user_rate = user_rate
        self._limiter = TokenBucket(settings.messages_per_minute)
        self._closed = Flag()
        self._close_sent: int | None = None
        # Set once we decide to close: frames read after it are refused by the close itself (never stored).
        self._closing = False
        self._messages = 0
        # Writes of this connection's messages not yet acknowledged: acknowledged before any close we send.
        self._unacked: set[asyncio.Future[int]] | None = None
        self._started = time.monotonic()
        self._last_frame = asyncio.get_running_loop().time()
        self._watchdog: asyncio.TimerHandle | None = None
        self._on_closed: Callable[[], None] | None = None
        self._tasks = TaskSet()

    # Life cycle.

    def start(
        self,
        ready: bytes,
        *,
        on_closed: Callable[[], None],
        history_through: int = 0,
        resume: tuple[str, int] | None = None,
    ) -> None:
        """Send `session.ready`, join the answer running now (if any), and take the socket's frames from now on;
        `on_closed` runs once the connection is wound down (see `on_closed`).

        `ready` names the running answer as it is at this instant: the catch-up and the membership in the
        audience follow with no await in between. Nothing waits for the socket: no task or coroutine frame is
        kept for its life (bench/RESULTS.md, issue 19)."""
        conversation = self.session.conversation
        self.outbox.put(ready)
        conversation.join(self.outbox, history_through=history_through, resume=resume)
        if self.watch:
            conversation.audience.add_watcher(self.outbox)
        else:
            conversation.record(CONNECTED, None)
            conversation.audience.set_writer(self.outbox)
        self._on_closed = on_closed
        if self._settings.idle_timeout_s:
            self._watchdog = asyncio.get_running_loop().call_later(self._settings.idle_timeout_s, self._check_idle)
        self._ws.serve(self)

    # What the socket calls.

    def on_text(self, text: str) -> None:
        self._last_frame = asyncio.get_running_loop().time()
        self._on_text(text)

    def on_binary(self) -> None:
        self._last_frame = asyncio.get_running_loop().time()
        self._reject(ProtocolError(protocol.UNSUPPORTED_FRAME, "binary frames are not supported"))

    def on_closed(self) -> Coroutine[Any, Any, None]:
        """The socket is gone (closed by either side, failed, or cut off): the wind-down, which the process keeps
        until done (also at shutdown). The `disconnected` event is stored, then `on_closed` runs."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        return self._wind_down()

    async def replace(self, *, stop_answer: bool) -> None:
        """A newer writing connection takes the session over: close with 4000 and return once this connection let
        go. The answer goes on for the newer one to join, unless `stop_answer` (ON_DISCONNECT=cancel, or a newer
        connection on another server): then it stops, the client still gets its `response.done`, and the partial
        answer is stored. A peer that is not reading is cut off rather than waited for."""
        if self.outbox.blocked:
            self.outbox.abort("replaced while the client was not reading")
        if stop_answer:
            # While still in the audience: this client gets the stopped answer's `response.done`.
            await self.session.conversation.stop()
        self.session.conversation.audience.remove(self.outbox)
        await self.close(protocol.CLOSE_REPLACED, "replaced by a newer connection")
        await self._closed.wait()

    def check_stalled(self, now: float) -> bool:
        return self.outbox.check_stalled(now)

    def expire(self) -> None:
        """The caller's access token ran out: end the session with 1008 (policy)."""
        self._tasks.spawn(self.close(WSCloseCode.POLICY_VIOLATION, "the access token expired"))

    async def close(self, code: int, message: str, *, ack_wait_s: float | None = None) -> None:
        """Close the socket once this connection's stored messages are acknowledged (bounded: a store that is
        away does not hold the close; the client then resends, idempotently by client_msg_id)."""
        self._closing = True
        wait_s = self._settings.send_timeout_s if ack_wait_s is None else ack_wait_s
        if self._unacked and wait_s > 0:  # (None until a write waits)
            await asyncio.wait(set(self._unacked), timeout=wait_s)
            await asyncio.sleep(0)  # The acknowledgements the commits scheduled.
        # Recorded: our reason, whatever the client answers.
        self._close_sent = self._close_sent or code
        if self.outbox.blocked:
            self.outbox.abort("closing while the client was not reading")
            return
        # The connection winds down now; the socket waits for the client's answer to the close on its own.
        self._ws.close(code, message.encode())

    async def _wind_down(self) -> None:
        # The partial answer and the `disconnected` event are submitted before the session is let go,
        # so they are stored in order, before anything a newer connection writes.
        session, conversation = self.session, self.session.conversation
        if self.outbox.blocked:
            self.outbox.abort("the socket closed while a send was waiting")
        was_writer = conversation.audience.writer is self.outbox
        conversation.audience.remove(self.outbox)
        close_code = self._close_sent or self._ws.close_code or (_NO_STATUS if self._ws.close_code == 0 else _ABNORMAL)
        if not self.watch:
            # 1.1: a closed socket does not stop the answer; ON_DISCONNECT=cancel brings back 1.0.
            if was_writer and self._settings.on_disconnect == "cancel":
                await conversation.stop()
            conversation.record(DISCONNECTED, None, {"close_code": close_code})
            session.detach(self)
        await self._tasks.cancel()
        self._closed.set()
        if self._on_closed is not None:
            self._on_closed()
        fields = {
            "session_id": session.id,
            "close_code": close_code,
            "messages": self._messages,
            "duration_s": round(time.monotonic() - self._started, 3),
        }
        log.info("disconnected", extra={"fields": fields})

    # Reading.

    def _check_idle(self) -> None:
        """No frame from the client for IDLE_TIMEOUT_S while nothing was being answered: end the session (4001)."""
        loop = asyncio.get_running_loop()
        if self.session.conversation.busy:
            # Busy answering: a silent client is reading, not idle.
            self._last_frame = max(self._last_frame, loop.time())
        due = self._last_frame + self._settings.idle_timeout_s
        if loop.time() >= due:
            self._watchdog = None
            self._tasks.spawn(self.close(protocol.CLOSE_IDLE, "idle for too long"))
        else:
            self._watchdog = loop.call_at(due, self._check_idle)

    def _on_text(self, text: str) -> None:
        if self._closing:
            # Refused by the close that follows (4000, 1001, ...): not stored, so the client resends it.
            return
        received_at = time.time()
        try:
            frame = protocol.parse_frame(text, max_message_bytes=self._settings.max_message_bytes)
            if self.watch and not isinstance(frame, Ping):
                raise ProtocolError(protocol.READ_ONLY, "this connection watches the session: it cannot change it")
            if isinstance(frame, UserMessage):
                self._on_message(frame, received_at)
            elif isinstance(frame, Cancel):
                self.session.conversation.cancel()
            elif isinstance(frame, Ping):
                self.outbox.put(protocol.PONG)
        except StoredNotAnswered as e:
            self._ack(e.stored, e.client_msg_id, frame.text if isinstance(frame, UserMessage) else "")
            self._reject(e)
        except ProtocolError as e:
            self._reject(e)

    def _on_message(self, message: UserMessage, received_at: float) -> None:
        conversation = self.session.conversation
        cmid = message.client_msg_id
        known = conversation.known(cmid)
        if known is not None:
            # An idempotent retry: acknowledged again, never stored or answered twice.
            self._ack(known, cmid, message.text)
            return
        if not self._limiter.allow():
            raise ProtocolError(protocol.RATE_LIMITED, "too many messages; slow down and try again")
        if self._user_id is not None and self._user_rate is not None and not self._user_rate.allow(self._user_id):
            raise ProtocolError(protocol.RATE_LIMITED, "too many messages from this user across connections; slow down")
        stored = conversation.submit(message.text, cmid, received_at)
        self._messages += 1
        self._ack(stored, cmid, message.text)

    def _reject(self, error: ProtocolError) -> None:
        self._metrics.frames_rejected.labels(error.code).inc()
        self.outbox.put(protocol.error(error.code, str(error)))

    def _ack(self, stored: int | asyncio.Future[int], cmid: str | None, text: str) -> None:
        """Send `message.stored` once the event is committed: it never runs ahead of the database."""
        if isinstance(stored, int):
            self.outbox.put(protocol.user_message_stored(stored, cmid, text))
            return
        if self._unacked is None:
            self._unacked = set()
        unacked = self._unacked
        unacked.add(stored)

        def done(f: asyncio.Future[int]) -> None:
            unacked.discard(f)
            if not unacked and self._unacked is unacked:
                self._unacked = None  # Nothing waits: the set goes until a write waits again.
            if succeeded(f):
                self.outbox.put(protocol.user_message_stored(f.result(), cmid, text))

        stored.add_done_callback(done)
