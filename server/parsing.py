"""What aiohttp's HTTP parser refuses before any route runs: the request-line limit, and how refusals are logged.

A request line over aiohttp's default 8190 bytes is answered by the parser itself, in plain text, and logged
as an ERROR with a traceback. The limit is raised to MAX_REQUEST_LINE so that oversized ids and cursors reach
the routes, which refuse them in JSON (`invalid_session_id`, ...). Beyond it, or for other malformed requests (bad
headers, a header over 8190 bytes), the parser still answers in plain text (aiohttp offers no public hook for
that response), but the log says WARNING, without a traceback: the client's fault, not a bug here. (Bytes that
are not HTTP at all, as the first request on a connection, aiohttp itself logs at DEBUG.)
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

# Twice aiohttp's default: room for a long access_token in the query (browsers cannot set headers on a
# WebSocket), small enough that a connection cannot make the parser hold much.
MAX_REQUEST_LINE = 16 * 1024


class ParserLog(logging.LoggerAdapter[logging.Logger]):
    """The request handler's logger: parse errors become one WARNING line; everything else passes through."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            # aiohttp calls this as ("Error handling request from %s", request.remote, exc_info=...). The
            # error's own text quotes the request line, which may hold a token: only its kind is logged.
            remote = args[0] if args else None
            log.warning(
                "malformed request refused",
                extra={"fields": {"remote": remote, "status": exc_info.code, "error": type(exc_info).__name__}},
            )
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def handler_args() -> dict[str, Any]:
    """The request handler's arguments, for `web.Application(handler_args=...)`."""
    return {"max_line_size": MAX_REQUEST_LINE, "logger": ParserLog(logging.getLogger("aiohttp.server"), {})}
