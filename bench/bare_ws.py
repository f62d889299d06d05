"""The floor for memory per idle socket: a bare aiohttp WebSocket endpoint that sends one frame and then only
reads (the heartbeat on, as the server has it). `python -m bench.bare_ws --port P`.

LEAN (comma-separated, unset for the plain floor) applies per-socket memory tricks, each measured in
bench/RESULTS.md: parser (drop the request handler's HTTP parser after the upgrade), messages (its empty request
deque), headers (the sent response headers), reqheaders (empty the parsed request's header dict), query (the
cached query), dropmsg (measurement only: the parsed request message, through a frame-locals write), noaccesslog
(AppRunner(access_log=None)), freeze (gc.freeze() once ready), bufsize (read_bufsize=2**12), msgsize
(max_msg_size=64 KiB)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

LEAN = set(filter(None, os.environ.get("LEAN", "").split(",")))


def lean_after_upgrade(req: web.Request, response: web.WebSocketResponse) -> None:
    # aiohttp's private attributes, as the server's `ws._shed_http_state` reaches them.
    request: Any = req
    ws: Any = response
    proto: Any = request.protocol
    if "parser" in LEAN:
        # Used again only for a declined upgrade or a keep-alive request: neither follows an accepted one.
        proto._parser = None
    if "messages" in LEAN:
        proto._messages = ()
    if "headers" in LEAN:
        ws._headers = CIMultiDict()
    if "query" in LEAN:
        request._cache.pop("query", None)
    if "dropmsg" in LEAN:
        # Measurement only (not safe to ship): the parsed request message, from the request and from the
        # request handler's `start` frame (a frame-locals write through the C API).
        import ctypes

        request._message = None
        request._headers = CIMultiDictProxy(CIMultiDict())
        frame = proto._task_handler.get_coro().cr_frame
        frame.f_locals["message"] = None
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
    if "reqheaders" in LEAN:
        for o in gc.get_referents(request.headers):
            if isinstance(o, CIMultiDict):
                o.clear()


async def handler(request: web.Request) -> web.WebSocketResponse:
    kw: dict[str, Any] = {"max_msg_size": 64 * 1024} if "msgsize" in LEAN else {}
    ws = web.WebSocketResponse(heartbeat=30, **kw)
    await ws.prepare(request)
    lean_after_upgrade(request, ws)
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
    app = web.Application(handler_args={"read_bufsize": 2**12} if "bufsize" in LEAN else None)
    app.router.add_get("/ws/session/{session_id}", handler)
    app.router.add_get("/healthz", healthz)
    runner_kw: dict[str, Any] = {"access_log": None} if "noaccesslog" in LEAN else {}
    runner = web.AppRunner(app, **runner_kw)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    if "freeze" in LEAN:
        gc.collect()
        gc.freeze()
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bare_ws")
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
