"""The floor for memory per idle socket: a bare aiohttp WebSocket endpoint that sends one frame and then only
reads (the heartbeat on, as the server has it). `python -m bench.bare_ws --port P`."""

from __future__ import annotations

import argparse
import asyncio
import resource

from aiohttp import web


async def handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    await ws.send_str('{"type":"session.ready"}')
    async for msg in ws:
        if msg.data == '{"type":"ping"}':
            await ws.send_str('{"type":"pong"}')
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def main(port: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = web.Application()
    app.router.add_get("/ws/session/{session_id}", handler)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bare_ws")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
