"""The OpenAI-compatible chat model: raw SSE streaming, our own timeouts and retries, provider errors mapped to ours.

The streamed request is built once per process and only its body changes: the URL, the authentication and the
headers come from the `openai` client (so they are what the SDK sends), and the request goes out on kept-alive
connections of our own (`http1`), written with no await when a connection is free. The client's per-request path
(options model, deep copies, header objects, the httpx2 layer over aiohttp) cost about 0.7 ms per request and 20 µs
per streamed read (bench/RESULTS.md, issue 19).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Sequence
from contextlib import aclosing, suppress
from typing import Any

import openai
import orjson
from yarl import URL

from ..backoff import backoff_delay
from ..errors import LLMError, LLMUnavailable
from ..settings import Settings
from .base import LLM, ChatMessage, PieceStream, StreamStats
from .deadline import Deadline, Expired
from .failures import status_error
from .http1 import Exchange, HTTPFailure, Pool
from .sse import SSEDecoder

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local OpenAI-compatible servers ignore the key, but the client refuses to start without one.
PLACEHOLDER_API_KEY = "no-key-needed"
_BACKOFF_FIRST_S = 0.25
# After [DONE] the end of the body is normally already buffered: reading it lets the connection be reused.
_DRAIN_S = 0.25
# An error body is read for its message; a provider that sends more is cut here.
_ERROR_BODY_MAX = 64 * 1024


class OpenAILLM(LLM):
    """Streams chat completions from OpenAI or any server that speaks its Chat Completions API."""

    def __init__(self, settings: Settings) -> None:
        self.model = settings.openai_model
        self._settings = settings
        # Read for its URL and headers only: it is kept so that `close` also closes the HTTP client it made.
        self._sdk = client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key or PLACEHOLDER_API_KEY,
            # Explicit, so the client never falls back to reading OPENAI_BASE_URL itself.
            base_url=settings.openai_base_url or DEFAULT_BASE_URL,
            max_retries=0,
        )
        self._url = URL(str(client.base_url.join("chat/completions")))
        headers = {**client.default_headers, **client.auth_headers}
        # Unset optional headers (organisation, project) are placeholders, not values.
        self._headers = {k: v for k, v in headers.items() if isinstance(v, str)}
        self._headers["Accept"] = "text/event-stream"
        # One upstream connection per answer streaming now (never queued behind others); as many are kept idle for
        # reuse as this process takes sockets. Created on first use, inside the running loop.
        self._pool_size = max(settings.max_connections, 100)
        self._http: Pool | None = None

    def _pool(self) -> Pool:
        if self._http is None:
            self._http = Pool(
                self._url,
                self._headers,
                connect_timeout_s=self._settings.llm_connect_timeout_s,
                max_idle=self._pool_size,
            )
        return self._http

    def stream(
        self, messages: Sequence[ChatMessage], stats: StreamStats, *, max_tokens: int | None = None
    ) -> PieceStream:
        """The answer in pieces, the request sent now (see `_Sent`); failures before the first piece are retried
        within the budget."""
        limit = max_tokens if max_tokens is not None else self._settings.openai_max_tokens
        first = self._post(messages, limit)
        return _Sent(self._retrying(messages, limit, stats, first), first)

    def _post(self, messages: Sequence[ChatMessage], max_tokens: int | None) -> Exchange:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return self._pool().post(orjson.dumps(body))

    async def _retrying(
        self, messages: Sequence[ChatMessage], limit: int | None, stats: StreamStats, first: Exchange
    ) -> AsyncGenerator[str, None]:
        s = self._settings
        loop = asyncio.get_running_loop()
        started = first.sent_at
        exchange: Exchange | None = first
        while True:
            produced = False
            try:
                if exchange is None:
                    exchange = self._post(messages, limit)
                async with aclosing(self._attempt(exchange, stats)) as pieces:
                    async for piece in pieces:
                        if not produced:
                            produced = True
                            stats.first_token_s = loop.time() - started
                        yield piece
                return
            except LLMError as e:
                # Once text has reached the user a retry would repeat or contradict it.
                if produced or not e.retryable or stats.retries >= s.llm_max_retries:
                    raise
                wait = self._retry_wait(e, stats.retries)
                if loop.time() - started + wait > s.llm_retry_budget_s:
                    raise
                stats.retries += 1
                exchange = None
                fields = {"model": self.model, "retry": stats.retries, "wait_s": round(wait, 3), "error": str(e)}
                log.info("llm request retried", extra={"fields": fields})
                await asyncio.sleep(wait)

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        await self._sdk.close()

    def _retry_wait(self, error: LLMError, retries: int) -> float:
        cap = self._settings.llm_retry_after_cap_s
        if error.retry_after is not None:
            return min(error.retry_after, cap)
        return backoff_delay(retries, base=_BACKOFF_FIRST_S, cap=cap)

    async def _attempt(self, exchange: Exchange, stats: StreamStats) -> AsyncGenerator[str, None]:
        """One upstream request, sent. The deadlines run only while a read is pending, never across a `yield`: the
        consumer's own time (a slow socket) is not the provider's."""
        s = self._settings
        loop = asyncio.get_running_loop()
        first_deadline = exchange.sent_at + s.llm_first_token_timeout_s
        gap_s = s.llm_token_gap_timeout_s
        decoder = SSEDecoder()
        got_text = False
        # A failed earlier attempt's finish_reason must not vouch for this one.
        stats.finish_reason = None
        deadline = Deadline(exchange)
        try:
            deadline.reading(first_deadline)
            try:
                await exchange.start()
                if exchange.status >= 400:
                    raise await self._status_error(exchange)
            except Expired as e:
                raise _first_token_timeout(s) from e
            except HTTPFailure as e:
                raise LLMUnavailable("could not reach the model provider", retryable=True) from e
            while not decoder.done:
                deadline.reading(loop.time() + gap_s if got_text else first_deadline)
                try:
                    data = await exchange.read()
                except Expired as e:
                    if got_text:
                        raise LLMUnavailable(
                            f"the model stopped answering for {gap_s:g} s (token gap timeout)", retryable=True
                        ) from e
                    raise _first_token_timeout(s) from e
                except HTTPFailure as e:
                    raise LLMUnavailable("the connection to the model provider broke", retryable=True) from e
                deadline.read()
                text = decoder.feed(data, stats) if data else decoder.end(stats)
                if text:
                    got_text = True
                    yield text
                if decoder.error is not None:
                    raise decoder.error
                if not data:
                    break
            if decoder.done:
                with suppress(TimeoutError, HTTPFailure):
                    async with asyncio.timeout(_DRAIN_S):
                        while await exchange.read():
                            pass
        finally:
            deadline.cancel()
            # Read to its end, the connection goes back to the pool; otherwise closing it stops the provider.
            if exchange.eof and not deadline.expired:
                exchange.release()
            else:
                exchange.close()
        if not decoder.done and stats.finish_reason is None:
            raise LLMUnavailable("the model's answer ended before it was complete", retryable=True)

    async def _status_error(self, exchange: Exchange) -> LLMError:
        """The provider refused the request: its status, headers and error body, as ours."""
        parts: list[bytes] = []
        size = 0
        with suppress(HTTPFailure):
            while size < _ERROR_BODY_MAX and (data := await exchange.read()):
                parts.append(data)
                size += len(data)
        raw = b"".join(parts)[:_ERROR_BODY_MAX]
        body: object
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw.decode(errors="replace")
        return status_error(exchange.status, exchange.headers, body, self._settings.openai_api_key)


class _Sent:
    """The answer's pieces with its first request already sent. Closing it closes that request even when it was
    never read (an async generator that never started runs no `finally`)."""

    __slots__ = ("_first", "_pieces")

    def __init__(self, pieces: AsyncGenerator[str, None], first: Exchange) -> None:
        self._pieces = pieces
        self._first = first

    def __aiter__(self) -> _Sent:
        return self

    def __anext__(self) -> Awaitable[str]:
        return self._pieces.__anext__()

    async def aclose(self) -> None:
        self._first.close()
        await self._pieces.aclose()


def _first_token_timeout(s: Settings) -> LLMUnavailable:
    return LLMUnavailable(
        f"the model did not start answering within {s.llm_first_token_timeout_s:g} s (first token timeout)",
        retryable=True,
    )
