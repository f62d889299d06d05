"""The WebSocket route: checks the request, attaches it to its session (to write, or to watch), and hands the socket
to a Connection."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, hdrs, web

from core import telemetry
from core.errors import Forbidden, StoreError
from core.store import MESSAGE_TYPES

from . import protocol, websocket
from .auth import AuthError, Identity, origin_allowed, token_from
from .keys import (
    ADMISSION,
    ATTACHER,
    AUTH,
    LIFECYCLE,
    LLM_CLIENT,
    METRICS,
    REGISTRY,
    SETTINGS,
    SOCKETS,
    STORE,
    USER_RATE,
)
from .live.admission import SERVER_BUSY, Admission
from .live.connection import Connection
from .live.outbox import Outbox
from .live.session import Session
from .metrics import Metrics
from .responses import json_error
from .websocket import WebSocket

log = logging.getLogger(__name__)

_STORE_DOWN = "the database is not answering; try again shortly"
# At shutdown: how long the clients have to answer the close before their connections are closed anyway.
_CLOSE_WAIT_S = 1.0


def _cursor(request: web.Request) -> int | None:
    raw = request.query.get("after")
    if raw is None or raw == "":
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)


async def session_socket(request: web.Request) -> web.StreamResponse:
    """Refuse the request (in JSON, as `api.json_errors` answers other routes: it is not in this route's chain, see
    `app._json_errors`), or take the socket over from aiohttp and return at once: from then on the socket is
    served by its `WebSocket` and `Connection`, with no task or coroutine frame of its own."""
    try:
        return await _open(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
        return json_error(e.status, code, e.reason)


async def _open(request: web.Request) -> web.StreamResponse:
    """Check the request and open the socket: a refusal, or `websocket.TAKEN` once the socket is served."""
    session_id = request.match_info["session_id"]
    if not protocol.valid_session_id(session_id):
        return json_error(400, "invalid_session_id", "session ids are 1 to 128 characters from A-Z a-z 0-9 . _ : -")
    after = _cursor(request)
    if after is None:
        return json_error(400, "invalid_cursor", "after must be a non-negative integer event id")
    try:
        resume = protocol.parse_resume(request.query.get("resume"))
    except ValueError:
        return json_error(400, "invalid_resume", "resume must be <response_id>:<seq>, seq a non-negative integer")
    mode = request.query.get("mode") or protocol.WRITE
    if mode not in (protocol.WRITE, protocol.WATCH):
        return json_error(400, "invalid_mode", "mode must be write or watch")
    if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        return json_error(426, "upgrade_required", "this route speaks WebSocket only")

    app = request.app
    settings, auth, admission = app[SETTINGS], app[AUTH], app[ADMISSION]
    if not origin_allowed(request, settings):
        return json_error(403, "origin_not_allowed", "pages from this origin may not connect")
    identity = None
    if auth.enabled:
        try:
            identity = await auth.verify(token_from(request))
        except AuthError as e:
            return json_error(401, "unauthorized", str(e))
    user_id = None if identity is None else identity.user_id
    refusal = admission.admit(user_id)
    if refusal == SERVER_BUSY:
        return json_error(503, refusal, "this server holds as many connections as it may; try another or retry later")
    if refusal is not None:
        return json_error(429, refusal, "you have too many connections open; close one first")
    serve = _watch if mode == protocol.WATCH else _write
    return await serve(request, session_id, identity, after=after, resume=resume)


async def _write(
    request: web.Request, session_id: str, identity: Identity | None, *, after: int, resume: tuple[str, int] | None
) -> web.StreamResponse:
    app = request.app
    registry, user_id = app[REGISTRY], None if identity is None else identity.user_id
    session = registry.checkout(session_id)

    let_go = _Release(registry.checkin, session, app[ADMISSION], user_id)

    serving = False
    try:
        async with session.lock:
            try:
                opened, history = await app[ATTACHER].attach(session, user_id=user_id)
            except Forbidden as e:
                return json_error(403, "forbidden", str(e))
            except (StoreError, TimeoutError) as e:
                log.warning(
                    "store unavailable at connect", extra={"fields": {"session_id": session_id, "error": str(e)}}
                )
                return json_error(503, "store_unavailable", _STORE_DOWN)
            ws, conn = _accept(request, session, identity, watch=False)
            session.attach(conn)
        resumed = not opened.created
        app[METRICS].sessions_started.labels(str(resumed).lower()).inc()
        log.info("connected", extra={"fields": {"session_id": session_id, "resumed": resumed}})
        serving = True
        return _serve(
            request, ws, conn, history, after=after, resume=resume, resumed=resumed, identity=identity, on_closed=let_go
        )
    finally:
        if not serving:
            let_go()


async def _watch(
    request: web.Request, session_id: str, identity: Identity | None, *, after: int, resume: tuple[str, int] | None
) -> web.StreamResponse:
    """A read-only connection: the session's history, then everything it does live; it creates nothing."""
    app = request.app
    store, settings = app[STORE], app[SETTINGS]
    try:
        async with asyncio.timeout(settings.store_connect_timeout_s):
            record = await store.get_session(session_id)
            history = (
                []
                if record is None
                else await store.events(session_id, types=MESSAGE_TYPES, limit=settings.history_limit)
            )
    except (StoreError, TimeoutError):
        app[ADMISSION].leave(None if identity is None else identity.user_id)
        return json_error(503, "store_unavailable", _STORE_DOWN)
    user_id = None if identity is None else identity.user_id
    if record is None or (identity is not None and record.owner_id != user_id):
        app[ADMISSION].leave(user_id)
        # Someone else's session is answered as unknown, as on the API.
        return json_error(404, "session_not_found", f"no session {session_id!r}")
    registry = app[REGISTRY]
    session = registry.watch(session_id, limit=settings.max_watchers)
    if session is None:
        app[ADMISSION].leave(user_id)
        return json_error(429, "too_many_watchers", f"this session has {settings.max_watchers} watchers already")
    let_go = _Release(registry.unwatch, session, app[ADMISSION], user_id)

    serving = False
    try:
        # What other servers do with the session reaches this watcher through Redis.
        await app[ATTACHER].follow(session)
        ws, conn = _accept(request, session, identity, watch=True)
        serving = True
        return _serve(
            request, ws, conn, history, after=after, resume=resume, resumed=True, identity=identity, on_closed=let_go
        )
    finally:
        if not serving:
            let_go()


def _accept(
    request: web.Request, session: Session, identity: Identity | None, *, watch: bool
) -> tuple[WebSocket, Connection]:
    """Answer the upgrade, take the socket from aiohttp, and make the socket's Connection. A request that is not a
    WebSocket handshake we speak is refused here, last, as aiohttp's own upgrade did: the caller lets go of what
    it took (HTTPBadRequest, answered in JSON by `session_socket`)."""
    bad_handshake = websocket.refusal(request)
    if bad_handshake is not None:
        raise web.HTTPBadRequest(reason=bad_handshake)
    app, settings = request.app, request.app[SETTINGS]
    ws = websocket.take_over(
        request, app[SOCKETS], max_message_bytes=settings.max_frame_bytes, close_timeout_s=settings.send_timeout_s
    )
    outbox = Outbox(ws, timeout_s=settings.send_timeout_s, max_buffer_bytes=settings.max_send_buffer_bytes)
    conn = Connection(
        session,
        ws,
        outbox,
        settings=settings,
        metrics=app[METRICS],
        user_id=None if identity is None else identity.user_id,
        user_rate=app[USER_RATE],
        watch=watch,
    )
    return ws, conn


class _Release:
    """What a connection lets go of: called (`let_go`) when it is refused after the session was taken, else once
    it closed (`closed`, within its shielded wind-down, after its `disconnected` event is submitted). One slotted
    object rather than two closures and their cells: ~0.4 KiB less held by every open socket."""

    __slots__ = ("admission", "expiry", "metrics", "release", "session", "span", "user_id")

    def __init__(
        self, release: Callable[[Session], None], session: Session, admission: Admission, user_id: str | None
    ) -> None:
        self.release, self.session, self.admission, self.user_id = release, session, admission, user_id
        self.expiry: asyncio.TimerHandle | None = None
        self.metrics: Metrics | None = None
        # The connection's trace span, when tracing is on: ended with it.
        self.span: Any = None

    def __call__(self) -> None:
        self.release(self.session)
        self.admission.leave(self.user_id)

    def closed(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        if self.metrics is not None:
            self.metrics.open_sockets.dec()
        if self.span is not None:
            self.span.end()
        self()


def _serve(
    request: web.Request,
    ws: WebSocket,
    conn: Connection,
    history: list,  # type: ignore[type-arg]
    *,
    after: int,
    resume: tuple[str, int] | None,
    resumed: bool,
    identity: Identity | None,
    on_closed: _Release,
) -> web.StreamResponse:
    """Start serving the socket, with no await: from here the socket calls its connection."""
    app, metrics, conversation = request.app, request.app[METRICS], conn.session.conversation
    through = max((e.id for e in history), default=0)
    # Built with no await before `start` joins the answer it names; not kept in a local, and the history (read for
    # this connection alone) emptied: a connection open for hours should not hold either.
    ready = [
        protocol.session_ready(
            conn.session.id,
            resumed=resumed,
            model=app[LLM_CLIENT].model,
            history=[e for e in history if e.id > after],
            active_response=conversation.active_response(),
            mode=protocol.WATCH if conn.watch else protocol.WRITE,
        )
    ]
    history.clear()
    metrics.open_sockets.inc()
    on_closed.metrics = metrics
    if identity is not None and identity.expires_at is not None:
        # The token may run out while the socket is open: the session ends with it (1008).
        delay = max(0.0, identity.expires_at - time.time())
        on_closed.expiry = asyncio.get_running_loop().call_later(delay, conn.expire)
    mode = protocol.WATCH if conn.watch else protocol.WRITE
    opened = telemetry.open_span(
        "websocket session",
        kind="SERVER",
        attributes={"session.id": conn.session.id, "rt.mode": mode, "rt.resumed": resumed},
    )
    if not conn.watch:
        # The session's writes, turns and jobs from now on belong to this connection's trace (none when off).
        conn.session.writer.trace = None if opened is None else opened[1]
    if opened is not None:
        on_closed.span = opened[0]
    conn.start(ready.pop(), on_closed=on_closed.closed, history_through=max(through, after), resume=resume)
    return websocket.TAKEN()


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: tell every client the server is going away (1001) so it reconnects, and wait for each
    connection's wind-down. The drain ran before, while the sockets were still read (`server.serve`); a runner
    that did not (a test server) drains here."""
    settings = app[SETTINGS]
    await app[LIFECYCLE].wind_down(drain_s=settings.shutdown_drain_s, flush_s=settings.shutdown_flush_s)
    # Through the connections, so each records 1001 (not the client's reply) on its `disconnected` event.
    await app[LIFECYCLE].close_connections(WSCloseCode.GOING_AWAY, "server shutting down")
    # Watchers, and sockets still being set up. Their peers get a second to answer the close (none when forced).
    wait_s = 0.0 if app[LIFECYCLE].forced else _CLOSE_WAIT_S
    await app[SOCKETS].close_all(
        WSCloseCode.GOING_AWAY, b"server shutting down", wait_s=wait_s, within_s=settings.send_timeout_s
    )
