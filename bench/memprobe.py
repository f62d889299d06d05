"""Memory probe (bench only): run a module as __main__ with a SIGUSR1 handler that writes a tracemalloc snapshot
(when tracing) and a by-type census of gc-tracked objects to $PROBE_DIR. `python -X tracemalloc=8 -m bench.memprobe
MODULE [ARGS...]`."""

from __future__ import annotations

import collections
import gc
import json
import os
import pickle
import runpy
import signal
import sys
import tracemalloc
from typing import Any

_n = [0]


def _snap(signum: int, frame: object) -> None:
    d = os.environ.get("PROBE_DIR", "/tmp/mem")
    n = _n[0]
    _n[0] += 1
    gc.collect()
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for o in gc.get_objects():
        t = type(o)
        name = f"{t.__module__}.{t.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(o)
    with open(f"{d}/types{n}.json", "w") as f:
        json.dump({"counts": counts, "sizes": sizes}, f)
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        with open(f"{d}/snap{n}.pkl", "wb") as f:
            pickle.dump(snap, f)
    with open(f"{d}/done{n}", "w") as f:
        f.write("ok")


signal.signal(signal.SIGUSR1, _snap)


def _deep(root: object, seen: set[int], stop: tuple[type, ...]) -> int:
    """Bytes of the objects reachable from `root` not seen yet, stopping at shared kinds of object."""
    import types

    total = 0
    todo = [root]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, (type, types.ModuleType, types.FunctionType, types.CodeType, *stop)) or o is None:
            continue
        total += sys.getsizeof(o)
        todo.extend(gc.get_referents(o))
    return total


def _attrs(o: object) -> list[tuple[str, object]]:
    out = []
    for cls in type(o).__mro__:
        for s in getattr(cls, "__slots__", ()):
            if hasattr(o, s):
                out.append((s, getattr(o, s)))
    out += list(getattr(o, "__dict__", {}).items())
    return out


def _tree(signum: int, frame: object) -> None:
    import asyncio

    from aiohttp import web, web_protocol, web_server

    d = os.environ.get("PROBE_DIR", "/tmp/mem")
    handlers = [o for o in gc.get_objects() if isinstance(o, web_protocol.RequestHandler)]
    if not handlers:
        # A server that lets go of aiohttp's handler once the socket is upgraded (ours) keeps none to walk.
        with open(f"{d}/tree.txt", "w") as f:
            f.write("no aiohttp request handler is kept\n")
        return
    h = handlers[len(handlers) // 2]
    stop = (
        asyncio.AbstractEventLoop,
        web.Application,
        web_server.Server,
        web_protocol.RequestHandler,
        logging.Logger,
        logging.LoggerAdapter,
        web.UrlDispatcher,
    )
    seen: set[int] = {id(h)}
    lines = [f"RequestHandler self {sys.getsizeof(h)}"]
    req = h._current_request
    wss = [o for o in gc.get_objects() if isinstance(o, web.WebSocketResponse) and o._req is req]
    tr = h.transport
    order: list[tuple[str, object]] = []
    if tr is not None:
        order += [("transport self", None)]
        lines.append(f"{sys.getsizeof(tr):7d}  transport self")
        seen.add(id(tr))
        order += [(f"transport.{k}", v) for k, v in _attrs(tr)]
    for ws in wss:
        lines.append(f"{sys.getsizeof(ws):7d}  ws self")
        seen.add(id(ws))
        order += [(f"ws.{k}", v) for k, v in _attrs(ws) if k != "_req"]
    if req is not None:
        lines.append(f"{sys.getsizeof(req):7d}  request self")
        seen.add(id(req))
        order += [(f"request.{k}", v) for k, v in _attrs(req)]
    order += [(f"handler.{k}", v) for k, v in _attrs(h)]
    for t in asyncio.all_tasks(asyncio.get_running_loop()):
        c: Any = t.get_coro()
        fr = getattr(c, "cr_frame", None)
        if fr is not None and any(v is h or v is req for v in fr.f_locals.values()):
            order.append((f"task {c.__qualname__}", t))
    # Frames chain of each task
    for name, obj in order:
        n = _deep(obj, seen, stop)
        if n:
            lines.append(f"{n:7d}  {name}  ({type(obj).__name__})")
    with open(f"{d}/tree.txt", "w") as f:
        f.write("\n".join(lines) + "\n")


import logging  # noqa: E402

signal.signal(signal.SIGUSR2, _tree)

if __name__ == "__main__":
    mod = sys.argv[1]
    sys.argv = [mod, *sys.argv[2:]]
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
