"""Who is asking: bearer tokens (JWT, HS256 with a shared secret or asymmetric keys from a JWKS URL) and origins."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from aiohttp import hdrs, web

from core.errors import AppError
from core.settings import Settings

log = logging.getLogger(__name__)

_ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
# An unknown key id triggers a refetch at most this often, so forged kids cannot hammer the key server.
_REFETCH_MIN_S = 30.0
_MAX_LOGGED = 255


class AuthError(AppError):
    """The request carries no usable token; answered with 401."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller: `user_id` is the token's `sub`; `expires_at` is its `exp` (epoch seconds)."""

    user_id: str
    expires_at: float | None


def token_from(request: web.Request) -> str | None:
    """The bearer token of a request: the Authorization header, or `access_token` in the query (browsers cannot
    set headers on a WebSocket)."""
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("access_token") or None


class Authenticator:
    """Verifies tokens against the configured secret or key set; `enabled` is False when neither is set."""

    def __init__(self, settings: Settings) -> None:
        self._secret = settings.auth_jwt_secret
        self._jwks_url = settings.auth_jwks_url
        self._audience = settings.auth_audience
        self._issuer = settings.auth_issuer
        self._jwks_ttl_s = settings.auth_jwks_cache_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._attempted_at = 0.0
        self._lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return self._secret is not None or self._jwks_url is not None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def verify(self, token: str | None) -> Identity:
        """The identity in a valid, unexpired token; AuthError (with a message safe to show) otherwise."""
        if not token:
            raise AuthError("an access token is required")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise AuthError("the access token is malformed") from e
        algorithm = header.get("alg")
        if self._secret is not None and algorithm == "HS256":
            key: Any = self._secret
        elif self._jwks_url is not None and algorithm in _ASYMMETRIC:
            key = (await self._key(str(header.get("kid", "")))).key
        else:
            raise AuthError("the access token is signed with an algorithm this server does not accept")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError as e:
            raise AuthError("the access token has expired") from e
        except jwt.PyJWTError as e:
            raise AuthError("the access token is not valid") from e
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("the access token names no user")
        exp = claims.get("exp")
        return Identity(user_id=sub, expires_at=float(exp) if isinstance(exp, int | float) else None)

    async def _key(self, kid: str) -> jwt.PyJWK:
        if self._should_fetch(kid):
            async with self._lock:
                if self._should_fetch(kid):  # Another request may have fetched while this one waited.
                    await self._fetch()
        key = self._keys.get(kid)
        if key is None:
            raise AuthError("the access token is signed with an unknown key")
        return key

    def _should_fetch(self, kid: str) -> bool:
        now = time.monotonic()
        # Keys rotate, so an unknown kid may be a new key; but ask the key server at most every _REFETCH_MIN_S.
        if self._attempted_at and now - self._attempted_at < _REFETCH_MIN_S:
            return False
        return now - self._fetched_at >= self._jwks_ttl_s or kid not in self._keys

    async def _fetch(self) -> None:
        assert self._jwks_url is not None
        self._attempted_at = time.monotonic()
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._http.get(self._jwks_url) as response:
                response.raise_for_status()
                document = await response.json(content_type=None)
            keys = {}
            for entry in document.get("keys", []):
                try:
                    keys[str(entry.get("kid", ""))] = jwt.PyJWK(entry)
                except jwt.PyJWTError:
                    continue  # A key type we cannot use (e.g. an encryption key) is skipped, not fatal.
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as e:
            # Keep the keys we had: a key server that blinks must not lock every user out.
            log.warning("could not fetch the JWKS", extra={"fields": {"url": self._jwks_url, "error": str(e)}})
            return
        self._keys = keys
        self._fetched_at = time.monotonic()


def origin_allowed(request: web.Request, settings: Settings) -> bool:
    """Browsers send Origin on a WebSocket: refuse pages from elsewhere (cross-site WebSocket hijacking).

    With ALLOWED_ORIGINS unset, only the server's own origin is allowed; `*` allows every origin. Clients
    that send no Origin (apps, scripts) are not browsers and are let through: tokens protect them. "The
    server's own origin" trusts the Host header, which the hosts middleware (server/hosts.py) has checked.
    A refusal is logged at INFO with the origin.
    """
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return True
    allowed = settings.allowed_origins
    if allowed is None:
        ok = origin in (f"http://{request.host}", f"https://{request.host}")
    else:
        ok = "*" in allowed or origin.rstrip("/") in allowed
    if not ok:
        # Both are the client's words, so cut to a length a log line can hold.
        log.info(
            "origin not allowed",
            extra={
                "fields": {"origin": origin[:_MAX_LOGGED], "host": request.host[:_MAX_LOGGED], "path": request.path}
            },
        )
    return ok
