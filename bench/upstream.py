"""A stand-in OpenAI-compatible upstream for benchmarks: streams a reply at a set pace and records its own timing."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

_DONE = b"data: [DONE]\n\n"


def _chunk(content: str | None, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


class Upstream:
    """Each reply is `tokens` chunks of one word, the first after `ttft_s`, then one every `gap_s`.

    For every request it notes when the request arrived, when its first chunk was written and when its last was
    (`time.time()`), keyed by the last message's text, so the bench can subtract the upstream's own time. (A
    summary request's last message is the session's transcript.)
    """

    def __init__(self, *, tokens: int, ttft_s: float, gap_s: float) -> None:
        self.tokens = tokens
        self.ttft_s = ttft_s
        self.gap_s = gap_s
        self.timings: dict[str, tuple[float, float, float]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/timings", self.get_timings)
        app.router.add_post("/pace", self.set_pace)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        body = await request.json(loads=orjson.loads)
        marker = body["messages"][-1]["content"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        await response.write(_chunk("w0 "))
        first = time.time()
        # Until the stream ends, its last chunk is its first: a stream cut short was that long.
        self.timings[marker] = (arrived, first, first)
        word = _chunk("w ")
        for _ in range(1, self.tokens):
            if self.gap_s:
                await asyncio.sleep(self.gap_s)
            await response.write(word)
        await response.write(_chunk(None, "stop") + _DONE)
        await response.write_eof()
        self.timings[marker] = (arrived, first, time.time())
        return response

    async def get_timings(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.timings), content_type="application/json")

    async def set_pace(self, request: web.Request) -> web.Response:
        pace = await request.json()
        self.tokens, self.ttft_s, self.gap_s = pace["tokens"], pace["ttft_s"], pace["gap_s"]
        self.timings.clear()
        return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(Upstream(tokens=20, ttft_s=0.02, gap_s=0.005).app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
