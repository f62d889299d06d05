"""HTTP answers: JSON bodies, and the one shape every HTTP error has (`{"error": {"code", "message"}}`)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .protocol import http_error


def json_response(body: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def json_error(status: int, code: str, message: str) -> web.Response:
    """An error answer: `code` is stable for clients to branch on, `message` is for people."""
    return json_response(http_error(code, message), status=status)
