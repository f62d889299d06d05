"""Which Host names the server answers: the guard against DNS rebinding.

A page on attacker.example whose name the attacker re-points at 127.0.0.1 reaches a loopback-only server
from the victim's browser, same-origin: its requests carry `Host: attacker.example` and a matching Origin, so
only the Host header tells them apart. With ALLOWED_HOSTS unset and authentication off, only the loopback
names and HOST are answered; with authentication on, any host (a rebound page has no token).

/healthz and /readyz answer any host: load balancers and orchestrators probe them by IP address, and they
reveal nothing but whether the service is up. /metrics is not exempt.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from core.settings import Settings

from .responses import json_error

log = logging.getLogger(__name__)

EXEMPT_PATHS = frozenset({"/healthz", "/readyz"})
LOOPBACK_NAMES = frozenset({"localhost"})
_MAX_LOGGED = 255  # The longest DNS name: anything longer is not a host name, and the log need not hold it.

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def host_name(header: str) -> str:
    """The host part of a Host header, lowercased: no port, no IPv6 brackets, no trailing dot."""
    value = header.strip().lower()
    if value.startswith("["):
        name, _, _ = value[1:].partition("]")
    elif value.count(":") == 1:
        name, _, _ = value.partition(":")
    else:
        name = value  # A bare name, or an unbracketed IPv6 address (which has no room for a port).
    return name.removesuffix(".")


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:
        return False


class HostPolicy:
    """Decides whether a Host header names this server (see the module docstring for the defaults)."""

    def __init__(self, settings: Settings) -> None:
        configured = settings.allowed_hosts
        if configured is None:
            self._any = settings.auth_enabled
            self._names = frozenset({host_name(settings.host)})
            self._loopback = True
        else:
            self._any = "*" in configured
            self._names = frozenset(host_name(h) for h in configured)
            self._loopback = False

    def allows(self, header: str | None) -> bool:
        if self._any:
            return True
        if not header:
            return False  # HTTP/1.1 requires Host, and every browser sends it.
        name = host_name(header)
        return name in self._names or (self._loopback and is_loopback(name))


def allowed_hosts(settings: Settings) -> Middleware:
    """Middleware refusing requests whose Host is not this server's, before any route (the WebSocket one too)."""
    policy = HostPolicy(settings)

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get(hdrs.HOST)
        if request.path in EXEMPT_PATHS or policy.allows(header):
            return await handler(request)
        log.info(
            "host not allowed",
            extra={"fields": {"host": (header or "")[:_MAX_LOGGED], "path": request.path[:_MAX_LOGGED]}},
        )
        return json_error(
            403, "host_not_allowed", "this server does not answer for that host name; add it to ALLOWED_HOSTS"
        )

    return check_host
