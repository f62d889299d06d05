"""A real HAProxy in front of real server processes, for tests: deploy/haproxy.cfg, its servers replaced by the test's.

HAProxy comes from Debian (scripts/ensure-packages.sh installs it as root, as `make test` does); where it cannot be
installed the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.settings import REPO_ROOT, Settings
from tests.conftest import eventually, free_port, start_server

HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy.cfg"
_TEMPLATE = "    server-template server 10 server:8001 check resolvers docker init-addr none\n"
_BIND = "    bind :8001\n"
_CHECKS = "    default-server inter 2s fall 2 rise 2\n"
_MAXCONN = "    maxconn 50000\n"


def haproxy_binary() -> str:
    """The haproxy binary, installed first when it is missing and that is possible; else the test is skipped."""
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if found:
        return found
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "ensure-packages.sh"), "haproxy", "--", "haproxy"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if not found:
        pytest.skip(f"HAProxy is not installed and could not be installed here: {result.stderr.strip()[-300:]}")
    return found


def haproxy_config(*, port: int, servers: dict[str, int], stats_socket: Path) -> str:
    """deploy/haproxy.cfg as the test runs it: on `port`, with `servers` (name: port on 127.0.0.1), no Docker DNS,
    checks every 200 ms, fewer connections, a header naming the server that took each connection, an admin socket."""
    text = HAPROXY_CFG.read_text()
    for line in (_TEMPLATE, _BIND, _CHECKS, _MAXCONN, "resolvers docker\n", "global\n"):
        assert line in text, f"deploy/haproxy.cfg has no {line.strip()!r} line: tests/lb.py must follow it"
    start = text.index("resolvers docker\n")
    text = text[:start] + text[text.index("\n\n", start) + 2 :]
    lines = ["    http-response set-header X-Served-By %[srv_name]\n"]
    lines += [f"    server {name} 127.0.0.1:{p} check\n" for name, p in servers.items()]
    text = text.replace(_TEMPLATE, "".join(lines))
    text = text.replace(_BIND, f"    bind 127.0.0.1:{port}\n")
    text = text.replace(_CHECKS, "    default-server inter 200ms fall 1 rise 1\n")
    # Within the open-file limit of a test machine (HAProxy needs two descriptors per connection).
    text = text.replace(_MAXCONN, "    maxconn 2000\n")
    return text.replace("global\n", f"global\n    stats socket {stats_socket} level admin\n", 1)


@dataclass
class Fleet:
    """Server processes behind one HAProxy; each server keeps its port across restarts."""

    settings: Settings
    env: dict[str, str]
    directory: Path
    ports: dict[str, int]
    lb_port: int = 0
    servers: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    haproxy: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    async def start(self, name: str) -> None:
        proc, _ = await start_server(self.settings, port=self.ports[name], **self.env)
        self.servers[name] = proc
        await self.wait_state(name, "UP")

    async def kill(self, name: str) -> None:
        proc = self.servers.pop(name)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def stop(self, name: str) -> int:
        """SIGTERM, as an orchestrator stops a server: it drains, then exits."""
        proc = self.servers.pop(name)
        proc.terminate()
        return await proc.wait()

    async def start_lb(self, binary: str) -> None:
        self.lb_port = free_port()
        socket_path = self.directory / "haproxy.sock"
        config = self.directory / "haproxy.cfg"
        config.write_text(haproxy_config(port=self.lb_port, servers=self.ports, stats_socket=socket_path))
        self.haproxy = await asyncio.create_subprocess_exec(
            binary, "-db", "-f", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        for name in self.ports:
            await self.wait_state(name, "UP")

    async def states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it (UP, DOWN, ...), from its admin socket."""
        socket_path = self.directory / "haproxy.sock"
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            writer.write(b"show stat\n")
            await writer.drain()
            raw = await reader.read()
            writer.close()
            rows = csv.DictReader(io.StringIO(raw.decode().lstrip("# ")))
            return {r["svname"]: r["status"] for r in rows if r["pxname"] == "servers" and r["svname"] in self.ports}
        return {}

    async def wait_state(self, name: str, state: str, *, timeout: float = 20) -> None:
        async def reached() -> bool:
            if self.haproxy is None:
                return True  # not started yet: start_lb waits for every server
            return (await self.states()).get(name, "").startswith(state)

        await eventually(reached, timeout=timeout)

    async def close(self) -> None:
        for proc in [*self.servers.values(), *([self.haproxy] if self.haproxy else [])]:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        self.servers.clear()


def served_by(ws: aiohttp.ClientWebSocketResponse) -> str:
    """The server HAProxy handed this WebSocket to (the test configuration's X-Served-By header)."""
    response: Any = ws._response  # aiohttp keeps the upgrade response there
    return str(response.headers.get("X-Served-By", ""))
