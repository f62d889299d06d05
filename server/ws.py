"""The WebSocket route: checks the request, attaches it to its session, and hands the socket to a Connection."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import WSCloseCode, hdrs, web

from core.errors import Forbidden, StoreError

from . import protocol
from .auth import AuthError, origin_allowed, token_from
from .keys import ADMISSION, ATTACHER, AUTH, LIFECYCLE, LLM_CLIENT, METRICS, REGISTRY, SETTINGS, SOCKETS, USER_RATE
from .live.admission import SERVER_BUSY
from .live.connection import Connection
from .live.outbox import Outbox
from .responses import json_error

log = logging.getLogger(__name__)


def _cursor(request: web.Request) -> int | None:
    raw = request.query.get("after")
    if raw is None or raw == "":
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)


async def session_socket(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["session_id"]
    if not protocol.valid_session_id(session_id):
        return json_error(400, "invalid_session_id", "session ids are 1 to 128 characters from A-Z a-z 0-9 . _ : -")
    after = _cursor(request)
    if after is None:
        return json_error(400, "invalid_cursor", "after must be a non-negative integer event id")
    if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        return json_error(426, "upgrade_required", "this route speaks WebSocket only")

    app = request.app
    settings, metrics, auth, admission = app[SETTINGS], app[METRICS], app[AUTH], app[ADMISSION]
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

    registry = app[REGISTRY]
    session = registry.checkout(session_id)
    attached = False
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
                return json_error(503, "store_unavailable", "the database is not answering; try again shortly")
            ws = web.WebSocketResponse(max_msg_size=settings.max_frame_bytes, heartbeat=settings.ws_heartbeat_s)
            await ws.prepare(request)
            outbox = Outbox(
                ws,
                request.transport,
                timeout_s=settings.send_timeout_s,
                max_buffer_bytes=settings.max_send_buffer_bytes,
            )
            conn = Connection(
                session,
                ws,
                outbox,
                settings=settings,
                metrics=metrics,
                user_id=user_id,
                user_rate=app[USER_RATE],
            )
            session.attach(conn)
            attached = True
    finally:
        if not attached:
            registry.checkin(session)
            admission.leave(user_id)

    resumed = not opened.created
    ready = protocol.session_ready(
        session_id, resumed=resumed, model=app[LLM_CLIENT].model, history=[e for e in history if e.id > after]
    )
    app[SOCKETS].add(ws)
    metrics.open_sockets.inc()
    metrics.sessions_started.labels(str(resumed).lower()).inc()
    log.info("connected", extra={"fields": {"session_id": session_id, "resumed": resumed, "history": len(history)}})

    expiry = None
    if identity is not None and identity.expires_at is not None:
        # The token may run out while the socket is open: the session ends with it (1008).
        delay = max(0.0, identity.expires_at - time.time())
        expiry = asyncio.get_running_loop().call_later(delay, conn.expire)

    def closed() -> None:
        if expiry is not None:
            expiry.cancel()
        metrics.open_sockets.dec()
        registry.checkin(session)
        admission.leave(user_id)

    await conn.run(ready, on_closed=closed)
    return ws


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: tell every client the server is going away (1001) so it reconnects. The drain ran before,
    while the sockets were still read (`server.serve`); a runner that did not (a test server) drains here."""
    settings = app[SETTINGS]
    await app[LIFECYCLE].wind_down(drain_s=settings.shutdown_drain_s, flush_s=settings.shutdown_flush_s)
    # Through the connections, so each records 1001 (not the client's reply) on its `disconnected` event.
    await app[LIFECYCLE].close_connections(WSCloseCode.GOING_AWAY, "server shutting down")
    sockets = [*app[SOCKETS]]
    closing = (ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down") for ws in sockets)
    await asyncio.gather(*closing, return_exceptions=True)
