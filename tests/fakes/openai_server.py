"""A stand-in for a hosted OpenAI-compatible API, used by tests: a real local HTTP server with failure injection."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_WORD_RE = re.compile(r"\S+\s*")
_POLL_S = 0.01
# The stand-in's tokenizer, close to a byte-level BPE and unlike four characters a token (a guess from characters
# fails against it): letter runs of up to four, digits in threes, every other symbol and every non-ASCII
# character a token of its own. Each message costs three more, the reply's priming three.
_TOKEN_RE = re.compile(r" ?[A-Za-z]{1,4}|\d{1,3}|[^\x00-\x7f]| ?[^\sA-Za-z\d]|\s+")
MESSAGE_TOKENS = 3
REPLY_TOKENS = 3


def count_tokens(text: str) -> int:
    """Tokens in `text` as this stand-in counts them."""
    return len(_TOKEN_RE.findall(text))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A request's prompt tokens as this stand-in counts (and reports) them."""
    return sum(count_tokens(str(m.get("content", ""))) + MESSAGE_TOKENS for m in messages) + REPLY_TOKENS


@dataclass(frozen=True)
class Scenario:
    """What the fake does with one request. Build one with the functions below."""

    kind: str = "reply"
    text: str | None = None
    chunks: list[str] | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    n_chunks: int = 0
    delay: float | None = None
    fragment: int | None = None
    one_write: bool = False


def reply(text: str, chunks: list[str] | None = None, *, one_write: bool = False) -> Scenario:
    """Answer `text`, split into `chunks` when given (they must join to `text`); `one_write` sends the whole body at
    once, so the client reads several chunks in one network read."""
    if chunks is not None:
        assert "".join(chunks) == text, "chunks must join to the text"
    return Scenario(text=text, chunks=chunks, one_write=one_write)


def fragmented(text: str, *, every: int = 5) -> Scenario:
    """Answer `text` with a keep-alive comment and CRLF line ends, the body cut into `every`-byte writes."""
    return Scenario(text=text, fragment=every)


def slow(delay: float, *, text: str | None = None) -> Scenario:
    """`text` (default: the usual reply) with `delay` seconds between chunks."""
    return Scenario(delay=delay, text=text)


def rate_limited(retry_after: float | None = None, *, quota: bool = False) -> Scenario:
    if quota:
        error = _error_body("You exceeded your current quota.", "insufficient_quota", "insufficient_quota")
    else:
        error = _error_body("Rate limit reached for requests.", "requests", "rate_limit_exceeded")
    headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
    return Scenario(kind="error", status=429, headers=headers, error=error)


def server_error(status: int = 500) -> Scenario:
    return Scenario(kind="error", status=status, error=_error_body("The server had an error.", "server_error", None))


def rejected(status: int = 400, message: str = "Invalid request.", *, code: str | None = None) -> Scenario:
    """A 4xx the provider means: 400 bad request, 401 bad key, 404 unknown model..."""
    return Scenario(kind="error", status=status, error=_error_body(message, "invalid_request_error", code))


def error_in_stream(
    n_chunks: int, *, code: str = "server_error", message: str = "The server had an error."
) -> Scenario:
    """Stream `n_chunks` chunks, then an `{"error": ...}` event in place of the next one."""
    return Scenario(kind="error_in_stream", n_chunks=n_chunks, error=_error_body(message, code, code))


def hang() -> Scenario:
    """Accept the request and send nothing, not even headers, until the client goes away."""
    return Scenario(kind="hang")


def hang_after_headers() -> Scenario:
    """Send 200 and the SSE headers, then nothing."""
    return Scenario(kind="stall_after", n_chunks=0)


def stall_after(n_chunks: int) -> Scenario:
    """Send `n_chunks` content chunks, then go silent with the connection open."""
    return Scenario(kind="stall_after", n_chunks=n_chunks)


def cut_after(n_chunks: int) -> Scenario:
    """Send `n_chunks` content chunks, then drop the connection mid-body, without [DONE]."""
    return Scenario(kind="cut_after", n_chunks=n_chunks)


def end_early(n_chunks: int) -> Scenario:
    """Send `n_chunks` content chunks, then end the body cleanly, without a finish_reason or [DONE]."""
    return Scenario(kind="end_early", n_chunks=n_chunks)


def _error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class _ClientGone(Exception):
    pass


class FakeOpenAI:
    """Serves `POST /v1/chat/completions` like OpenAI does, following the scripted scenarios in order."""

    def __init__(self) -> None:
        self.base_url = ""
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.token_delay = 0.0
        # OpenAI sends usage on a stream only when asked; False plays a server that ignores `stream_options`.
        self.reports_usage = True
        # Answers every request that no scenario scripts, when set (a test's model, e.g. a summariser).
        self.responder: Callable[[list[dict[str, Any]]], str] | None = None
        # Requests it returns True for get a 500, as a provider's outage gives.
        self.failing: Callable[[list[dict[str, Any]]], bool] | None = None
        self.disconnects = 0
        self._scripts: deque[Scenario] = deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._disconnected = asyncio.Event()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def reset(self) -> None:
        """Forget requests, scripts and counters: a fresh fake for the next test."""
        self.requests.clear()
        self.headers.clear()
        self._scripts.clear()
        self.token_delay = 0.0
        self.reports_usage = True
        self.responder = None
        self.failing = None
        self.disconnects = 0

    def script(self, *scenarios: Scenario) -> None:
        self._scripts.extend(scenarios)

    def reply_for(self, messages: list[dict[str, Any]]) -> str:
        if self.responder is not None:
            return self.responder(messages)
        said = [m.get("content") for m in messages if m.get("role") == "user"]
        last = said[-1] if said and isinstance(said[-1], str) else "(nothing)"
        return f"You said: {last}"

    async def wait_for_disconnect(self, timeout: float = 5, *, count: int = 1) -> None:
        """Return once `count` clients have hung up since the last reset; TimeoutError when they do not."""
        async with asyncio.timeout(timeout):
            while self.disconnects < count:
                self._disconnected.clear()
                await self._disconnected.wait()

    def _note_disconnect(self) -> None:
        self.disconnects += 1
        self._disconnected.set()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json(loads=orjson.loads)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.failing is not None and self.failing(body.get("messages", [])):
            return web.json_response(_error_body("The server had an error.", "server_error", None), status=500)
        scenario = self._scripts.popleft() if self._scripts else Scenario()
        try:
            if scenario.kind == "hang":
                await _idle(request, None)
            if scenario.kind == "error":
                assert scenario.error is not None
                return web.json_response(scenario.error, status=scenario.status, headers=scenario.headers)
            if not body.get("stream"):
                return web.json_response(self._completion(body, scenario))
            return await self._stream(request, body, scenario)
        except asyncio.CancelledError:
            self._note_disconnect()
            raise
        except (_ClientGone, ConnectionResetError):
            self._note_disconnect()
            # Nobody reads this: aiohttp's write of it fails quietly on the closed connection.
            return web.Response(status=499)

    async def _stream(self, request: web.Request, body: dict[str, Any], scenario: Scenario) -> web.StreamResponse:
        text = scenario.text if scenario.text is not None else self.reply_for(body.get("messages", []))
        pieces = scenario.chunks if scenario.chunks is not None else _WORD_RE.findall(text)
        chunk_id, created, model = f"chatcmpl-fake{next(self._ids)}", int(time.time()), body.get("model", "")
        usage_wanted = self.reports_usage and bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
            event: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            # As OpenAI: when usage was asked for, every chunk has the key, null until a last chunk that has it
            # and no choices.
            if usage_wanted:
                event["usage"] = usage
            if usage is not None:
                event["choices"] = []
            return b"data: " + orjson.dumps(event) + b"\n\n"

        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if scenario.kind in ("stall_after", "cut_after", "end_early", "error_in_stream"):
            pieces = pieces[: scenario.n_chunks]
        events += [chunk({"content": piece}) for piece in pieces]
        if scenario.kind == "error_in_stream":
            events.append(b"data: " + orjson.dumps(scenario.error) + b"\n\n")
        elif scenario.kind == "reply":
            events.append(chunk({}, "stop"))
            if usage_wanted:
                counts = {"prompt_tokens": prompt_tokens(body["messages"]), "completion_tokens": count_tokens(text)}
                events.append(chunk({}, usage={**counts, "total_tokens": sum(counts.values())}))
            events.append(b"data: [DONE]\n\n")

        delay = scenario.delay if scenario.delay is not None else self.token_delay
        if scenario.one_write:
            await _write(request, response, b"".join(events))
        elif scenario.fragment:
            data = b": keep-alive\n\n" + b"".join(events).replace(b"\n", b"\r\n")
            for i in range(0, len(data), scenario.fragment):
                await _write(request, response, data[i : i + scenario.fragment])
                await asyncio.sleep(0)  # one network send per fragment
        else:
            for i, event in enumerate(events):
                if i and delay:
                    await _idle(request, delay)
                await _write(request, response, event)

        if scenario.kind == "stall_after":
            await _idle(request, None)
        if scenario.kind == "cut_after":
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response

    def _completion(self, body: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
        text = scenario.text if scenario.text is not None else self.reply_for(body.get("messages", []))
        completion_tokens = count_tokens(text)
        prompt = prompt_tokens(body["messages"])
        return {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens,
            },
        }


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _idle(request: web.Request, seconds: float | None) -> None:
    """Wait `seconds` (forever when None), noticing at once when the client hangs up."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while deadline is None or time.monotonic() < deadline:
        if _gone(request):
            raise _ClientGone
        step = _POLL_S if deadline is None else min(_POLL_S, max(deadline - time.monotonic(), 0))
        await asyncio.sleep(step)


async def _write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    if _gone(request):
        raise _ClientGone
    try:
        await response.write(data)
    except ConnectionResetError as e:
        raise _ClientGone from e
