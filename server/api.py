"""The HTTP routes: the page, the sessions API, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from core.errors import StoreError
from core.store import MESSAGE_TYPES, SessionRecord

from .auth import AuthError, token_from
from .keys import AUTH, METRICS, REDIS, SETTINGS, STORE
from .metrics import CONTENT_TYPE_LATEST
from .protocol import SESSION_ID_RE, history_item
from .responses import json_error, json_response

log = logging.getLogger(__name__)

MAX_LIST = 200
# ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "٣" (which int() reads as 3).
_LIMIT_RE = re.compile(r"[0-9]{1,9}")


def _session(record: SessionRecord) -> dict[str, Any]:
    return {
        "session_id": record.session_id,
        "start_time": record.start_time.isoformat() if record.start_time else None,
        "end_time": record.end_time.isoformat() if record.end_time else None,
        "summary": record.summary,
        "message_count": record.message_count or 0,
        # The provider's counts, or ours where it reported none (each answer's metadata says which).
        "usage": {"prompt_tokens": record.prompt_tokens or 0, "completion_tokens": record.completion_tokens or 0},
    }


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(request.app[SETTINGS].web_dir / "index.html")


class _Unauthorized(Exception):
    pass


async def _caller(request: web.Request) -> str | None:
    """The verified user id when authentication is on (the API then shows only their sessions), else None."""
    auth = request.app[AUTH]
    if not auth.enabled:
        return None
    try:
        return (await auth.verify(token_from(request))).user_id
    except AuthError as e:
        raise _Unauthorized(str(e)) from e


async def list_sessions(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "50")
    if not _LIMIT_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIST:
        return json_error(400, "invalid_limit", f"limit must be an integer from 1 to {MAX_LIST}")
    try:
        user_id = await _caller(request)
    except _Unauthorized as e:
        return json_error(401, "unauthorized", str(e))
    try:
        records = await request.app[STORE].list_sessions(limit=int(raw), owner_id=user_id)
    except StoreError:
        return json_error(503, "store_unavailable", "the database is not answering; try again shortly")
    return json_response({"sessions": [_session(r) for r in records]})


async def get_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    if not SESSION_ID_RE.fullmatch(session_id):
        return json_error(400, "invalid_session_id", "session ids are 1 to 128 characters from A-Z a-z 0-9 . _ : -")
    try:
        user_id = await _caller(request)
    except _Unauthorized as e:
        return json_error(401, "unauthorized", str(e))
    store = request.app[STORE]
    try:
        record = await store.get_session(session_id)
        # Someone else's session is answered as unknown: its existence is not the caller's business.
        if record is None or (user_id is not None and record.owner_id != user_id):
            return json_error(404, "session_not_found", f"no session {session_id!r}")
        events = await store.events(session_id, types=MESSAGE_TYPES, limit=request.app[SETTINGS].history_limit)
    except StoreError:
        return json_error(503, "store_unavailable", "the database is not answering; try again shortly")
    return json_response({**_session(record), "events": [history_item(e) for e in events]})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    checks = {"database": app[STORE].ping(), "redis": app[REDIS].ping()}
    results = await asyncio.gather(*(_within(c, 2.0) for c in checks.values()))
    failing = [name for name, ok in zip(checks, results, strict=True) if not ok]
    if failing:
        return json_response({"status": "unavailable", "failing": failing}, status=503)
    return json_response({"status": "ok"})


async def _within(check: Awaitable[Any], seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await check
    except Exception:
        return False
    return True


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer every HTTP error as JSON, `{"error": {"code", "message"}}`, as the protocol promises."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
        return json_error(e.status, code, e.reason)
    except Exception as e:
        if _name_too_long(request, e):
            return json_error(404, "not_found", "Not Found")
        if request.path.startswith("/ws/"):
            raise  # The socket may already be open: nothing can be answered in HTTP now.
        log.exception("unhandled error", extra={"fields": {"path": request.path}})
        return json_error(500, "internal_error", "something went wrong on our side")


def _name_too_long(request: web.Request, error: Exception) -> bool:
    """aiohttp's static route lets a file name too long for the file system escape as OSError: no such file."""
    return (
        isinstance(error, OSError)
        and error.errno == errno.ENAMETOOLONG
        and isinstance(request.match_info.route.resource, web.StaticResource)
    )
