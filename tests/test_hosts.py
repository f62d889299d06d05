"""Which host names the server answers: a page rebound to 127.0.0.1 (DNS rebinding) reaches no route."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson
import pytest

from server.hosts import host_name
from tests.conftest import receive
from tests.test_api import raw_request
from tests.test_auth import SECRET, token

UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "x3JJHMbDL1EzLkh9GBhXDw==",
}
# Everything a browser shows or a script reads, and routes that exist on no server.
ROUTES = ["/", "/web/app.js", "/api/sessions", "/api/sessions/s1", "/metrics", "/nothing"]


def rebound(client: Any, host: str = "attacker.example") -> dict[str, str]:
    """The headers of a request from a page on `host` whose name now points at this server."""
    name = f"{host}:{client.port}"
    return {"Host": name, "Origin": f"http://{name}"}


async def test_a_rebound_page_reaches_no_route(client, caplog):
    caplog.set_level(logging.INFO, logger="server.hosts")
    for path in ROUTES:
        resp = await client.get(path, headers=rebound(client))
        assert resp.status == 403, path
        assert (await resp.json())["error"]["code"] == "host_not_allowed", path

    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect("/ws/session/s1", headers=rebound(client))
    assert e.value.status == 403
    resp = await client.get("/ws/session/s1", headers={**UPGRADE, **rebound(client)})
    assert (resp.status, (await resp.json())["error"]["code"]) == (403, "host_not_allowed")

    refusals = [r for r in caplog.records if r.getMessage() == "host not allowed"]
    assert len(refusals) == len(ROUTES) + 2
    assert all(r.levelno == logging.INFO for r in refusals)
    assert refusals[0].fields["host"] == f"attacker.example:{client.port}"  # type: ignore[attr-defined]


async def test_health_probes_answer_any_host_but_metrics_do_not(client):
    # Load balancers probe by IP address; the answers say only whether the service is up.
    for path in ("/healthz", "/readyz"):
        resp = await client.get(path, headers={"Host": "10.1.2.3:8001"})
        assert resp.status == 200, path
    assert (await client.get("/metrics", headers={"Host": "10.1.2.3:8001"})).status == 403


@pytest.mark.parametrize("host", ["localhost", "LocalHost", "localhost.", "127.0.0.1", "127.8.9.10", "[::1]"])
async def test_the_loopback_names_are_answered_on_any_port(client, host):
    assert (await client.get("/api/sessions", headers={"Host": f"{host}:{client.port}"})).status == 200
    assert (await client.get("/api/sessions", headers={"Host": host})).status == 200


async def test_a_page_served_from_localhost_opens_its_socket(client):
    headers = rebound(client, "localhost")
    assert (await client.get("/", headers=headers)).status == 200
    ws = await client.ws_connect("/ws/session/s1", headers=headers)
    assert (await receive(ws))["type"] == "session.ready"
    await ws.close()


async def test_the_configured_host_is_answered(make_client):
    client = await make_client(host="chat.lan", auth_disabled=True)
    assert (await client.get("/api/sessions", headers={"Host": "chat.lan:8001"})).status == 200
    assert (await client.get("/api/sessions", headers={"Host": "other.lan:8001"})).status == 403


async def test_with_authentication_on_any_host_is_answered(make_client):
    # A rebound page holds no token: the token, not the host name, keeps it out.
    client = await make_client(auth_jwt_secret=SECRET)
    headers = {**rebound(client), "Authorization": f"Bearer {token('alice')}"}
    assert (await client.get("/api/sessions", headers=headers)).status == 200


async def test_allowed_hosts_replaces_the_defaults(make_client):
    client = await make_client(allowed_hosts=("chat.example.com",))
    assert (await client.get("/api/sessions", headers={"Host": "Chat.Example.com"})).status == 200
    assert (await client.get("/api/sessions", headers={"Host": f"localhost:{client.port}"})).status == 403
    # An app behind authentication may still pin its names.
    pinned = await make_client(allowed_hosts=("chat.example.com",), auth_jwt_secret=SECRET)
    headers = {**rebound(pinned), "Authorization": f"Bearer {token('alice')}"}
    assert (await pinned.get("/api/sessions", headers=headers)).status == 403


async def test_a_star_answers_every_host(make_client):
    client = await make_client(allowed_hosts=("*",))
    assert (await client.get("/api/sessions", headers=rebound(client))).status == 200


async def test_a_request_without_a_host_header_is_refused(client):
    status, _, body = await raw_request(client, b"GET /api/sessions HTTP/1.0\r\n\r\n")
    assert (status, orjson.loads(body)["error"]["code"]) == (403, "host_not_allowed")


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8001", "localhost"),
        ("EXAMPLE.com", "example.com"),
        ("example.com.:443", "example.com"),
        ("[::1]:8001", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("", ""),
    ],
)
def test_the_host_name_is_the_header_without_port_or_brackets(header, name):
    assert host_name(header) == name
