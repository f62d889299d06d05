"""Who may connect: access tokens (HS256 secret or a JWKS key set), session owners, token expiry, and origins."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives.asymmetric import rsa

from core.errors import ConfigError
from core.settings import Settings
from tests.conftest import receive, receive_until

SECRET = "test-jwt-secret-that-is-long-enough-for-hs256"


def token(sub: str, *, ttl: float = 600, secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, secret, algorithm="HS256")


@pytest_asyncio.fixture
async def authed(make_client: Any) -> Any:
    return await make_client(auth_jwt_secret=SECRET)


async def refused(client: Any, path: str, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect(path, **kwargs)
    # The same request again, to read the JSON body the handshake error hides.
    resp = await client.get(
        path,
        params=kwargs.get("params"),
        headers={"Upgrade": "websocket", "Connection": "Upgrade", **kwargs.get("headers", {})},
    )
    body = await resp.json()
    assert resp.status == e.value.status
    return e.value.status, body["error"]["code"]


async def test_without_a_valid_token_the_socket_is_refused_before_the_upgrade(authed):
    assert await refused(authed, "/ws/session/s1") == (401, "unauthorized")
    bearer = {"Authorization": f"Bearer {token('alice', secret='not-the-secret-but-long-enough-anyway')}"}
    assert await refused(authed, "/ws/session/s1", headers=bearer) == (401, "unauthorized")
    expired = {"Authorization": f"Bearer {token('alice', ttl=-60)}"}
    assert await refused(authed, "/ws/session/s1", headers=expired) == (401, "unauthorized")
    no_sub = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert await refused(authed, "/ws/session/s1", headers={"Authorization": f"Bearer {no_sub}"}) == (
        401,
        "unauthorized",
    )


async def test_a_user_owns_the_sessions_they_create_and_strangers_get_403(authed, db):
    ws = await authed.ws_connect("/ws/session/s1", headers={"Authorization": f"Bearer {token('alice')}"})
    assert (await receive(ws))["type"] == "session.ready"
    assert await db.fetchval("select owner_id from sessions where session_id = 's1'") == "alice"

    # A stranger is refused, and the owner's socket is left alone.
    mallory = {"Authorization": f"Bearer {token('mallory')}"}
    assert await refused(authed, "/ws/session/s1", headers=mallory) == (403, "forbidden")
    await ws.send_str('{"type":"ping"}')
    assert await receive(ws) == {"type": "pong"}
    await ws.close()

    # The owner comes back with the token in the query, as a browser must.
    ws = await authed.ws_connect("/ws/session/s1", params={"access_token": token("alice")})
    ready = await receive(ws)
    assert ready["resumed"] is True
    await ws.close()
    assert await db.fetchval("select owner_id from sessions where session_id = 's1'") == "alice"


async def test_a_token_that_expires_during_the_session_closes_it_with_1008(authed):
    ws = await authed.ws_connect("/ws/session/s1", params={"access_token": token("alice", ttl=1.5)})
    await receive(ws)
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1008)


async def test_the_api_shows_a_user_only_their_own_sessions(authed, db):
    for user, session_id in (("alice", "a1"), ("bob", "b1")):
        ws = await authed.ws_connect(f"/ws/session/{session_id}", params={"access_token": token(user)})
        await receive(ws)
        await ws.send_str(f"hello from {user}")
        await receive_until(ws, "response.done")
        await ws.close()

    assert (await authed.get("/api/sessions")).status == 401
    alice = {"Authorization": f"Bearer {token('alice')}"}
    body = await (await authed.get("/api/sessions", headers=alice)).json()
    assert [s["session_id"] for s in body["sessions"]] == ["a1"]
    assert (await authed.get("/api/sessions/a1", headers=alice)).status == 200
    resp = await authed.get("/api/sessions/b1", headers=alice)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "session_not_found"


async def test_audience_and_issuer_are_checked_when_configured(make_client):
    client = await make_client(auth_jwt_secret=SECRET, auth_audience="authenticated", auth_issuer="https://issuer")
    good = token("alice", aud="authenticated", iss="https://issuer")
    ws = await client.ws_connect("/ws/session/s1", params={"access_token": good})
    await receive(ws)
    await ws.close()
    for bad in (token("alice", aud="other", iss="https://issuer"), token("alice", aud="authenticated")):
        assert await refused(client, "/ws/session/s2", params={"access_token": bad}) == (401, "unauthorized")


@pytest_asyncio.fixture
async def jwks_server() -> Any:
    """A real HTTP server publishing one RSA public key, as an identity provider's JWKS endpoint does."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    public_jwk.update(kid="key-1", use="sig", alg="RS256")
    fetches = []

    async def keys(request: web.Request) -> web.Response:
        fetches.append(time.time())
        return web.json_response({"keys": [public_jwk]})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield {"url": f"http://127.0.0.1:{port}/.well-known/jwks.json", "private": private, "fetches": fetches}
    finally:
        await runner.cleanup()


async def test_tokens_signed_with_a_key_from_the_jwks_url_are_accepted(make_client, jwks_server):
    client = await make_client(auth_jwks_url=jwks_server["url"])

    def rs256(sub: str, kid: str) -> str:
        claims = {"sub": sub, "exp": int(time.time()) + 600}
        return jwt.encode(claims, jwks_server["private"], algorithm="RS256", headers={"kid": kid})

    for _ in range(2):
        ws = await client.ws_connect("/ws/session/s1", params={"access_token": rs256("alice", "key-1")})
        assert (await receive(ws))["type"] == "session.ready"
        await ws.close()
    assert len(jwks_server["fetches"]) == 1  # cached

    assert await refused(client, "/ws/session/s2", params={"access_token": rs256("alice", "unknown")}) == (
        401,
        "unauthorized",
    )
    # An HS256 token cannot pass where only the key set is trusted.
    assert await refused(client, "/ws/session/s3", params={"access_token": token("alice")}) == (401, "unauthorized")


async def test_browsers_from_other_origins_are_refused(make_client):
    client = await make_client(allowed_origins=("https://app.example",))
    ws = await client.ws_connect("/ws/session/s1", headers={"Origin": "https://app.example"})
    await receive(ws)
    await ws.close()
    assert await refused(client, "/ws/session/s1", headers={"Origin": "https://evil.example"}) == (
        403,
        "origin_not_allowed",
    )
    # Scripts and apps send no Origin; tokens (when configured) protect them.
    ws = await client.ws_connect("/ws/session/s1")
    await receive(ws)
    await ws.close()


async def test_an_origin_refusal_is_logged_with_the_origin(client, caplog):
    caplog.set_level(logging.INFO, logger="server.auth")
    assert await refused(client, "/ws/session/s1", headers={"Origin": "https://evil.example"}) == (
        403,
        "origin_not_allowed",
    )
    logged = [r for r in caplog.records if r.getMessage() == "origin not allowed"]
    assert logged and all(r.levelno == logging.INFO for r in logged)
    assert logged[0].fields["origin"] == "https://evil.example"  # type: ignore[attr-defined]


async def test_by_default_only_the_servers_own_origin_may_connect(client):
    host = f"{client.host}:{client.port}"
    ws = await client.ws_connect("/ws/session/s1", headers={"Origin": f"http://{host}"})
    await receive(ws)
    await ws.close()
    assert await refused(client, "/ws/session/s1", headers={"Origin": "https://evil.example"}) == (
        403,
        "origin_not_allowed",
    )


def test_serving_beyond_loopback_without_authentication_needs_auth_disabled():
    with pytest.raises(ConfigError) as e:
        Settings.from_env({"HOST": "0.0.0.0"}, env_file=None)
    assert "AUTH_DISABLED=true" in str(e.value)
    assert Settings.from_env({"HOST": "0.0.0.0", "AUTH_DISABLED": "true"}, env_file=None).auth_disabled
    assert Settings.from_env({"HOST": "0.0.0.0", "AUTH_JWT_SECRET": SECRET}, env_file=None).auth_enabled


async def test_a_refused_session_is_not_touched(authed, db):
    ws = await authed.ws_connect("/ws/session/s1", params={"access_token": token("alice")})
    await receive(ws)
    await ws.close()

    async def ended() -> Any:
        return await db.fetchval("select end_time from sessions where session_id = 's1'")

    for _ in range(100):
        if await ended():
            break
        await asyncio.sleep(0.02)
    end_time = await ended()
    assert end_time is not None
    await refused(authed, "/ws/session/s1", params={"access_token": token("mallory")})
    # The stranger's attempt neither reopened the session nor wrote an event.
    assert await ended() == end_time
    assert await db.fetchval("select count(*) from session_events where session_id = 's1'") == 2
