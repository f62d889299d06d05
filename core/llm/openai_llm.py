"""The OpenAI-compatible chat model: raw SSE streaming, our own timeouts and retries, provider errors mapped to ours.

The streamed request is built once per process and only its body changes: the URL, the authentication and the
headers come from the `openai` client (so they are what the SDK sends), and the request goes out on an aiohttp
session of our own. The client's per-request path (options model, deep copies, header objects, the httpx2 layer
over aiohttp) cost about 0.7 ms per request and 20 µs per streamed read (bench/RESULTS.md, issue 19).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing, suppress
from typing import Any

import aiohttp
import openai
import orjson
from yarl import URL

from ..backoff import backoff_delay
from ..errors import LLMError, LLMUnavailable
from ..settings import Settings
from .base import LLM, ChatMessage, StreamStats
from .deadline import Deadline, Expired
from .failures import status_error
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
        # One upstream connection per answer streaming now, up to as many as this process takes sockets: a smaller
        # pool would queue answers behind others. Created on first use, inside the running loop.
        self._pool_size = max(settings.max_connections, 100)
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, keepalive_timeout=30.0),
                # Our deadlines (first token, token gap) bound the rest; only connecting has its own.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._settings.llm_connect_timeout_s),
            )
        return self._http

    async def stream(
        self, messages: Sequence[ChatMessage], stats: StreamStats, *, max_tokens: int | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the answer in pieces; retry failures that happen before the first piece, within the budget."""
        s = self._settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        limit = max_tokens if max_tokens is not None else s.openai_max_tokens
        while True:
            produced = False
            try:
                async with aclosing(self._attempt(messages, limit, stats)) as pieces:
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
                fields = {"model": self.model, "retry": stats.retries, "wait_s": round(wait, 3), "error": str(e)}
                log.info("llm request retried", extra={"fields": fields})
                await asyncio.sleep(wait)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self._sdk.close()

    def _retry_wait(self, error: LLMError, retries: int) -> float:
        cap = self._settings.llm_retry_after_cap_s
        if error.retry_after is not None:
            return min(error.retry_after, cap)
        return backoff_delay(retries, base=_BACKOFF_FIRST_S, cap=cap)

    async def _attempt(
        self, messages: Sequence[ChatMessage], max_tokens: int | None, stats: StreamStats
    ) -> AsyncGenerator[str, None]:
        """One upstream request. The deadlines run only while a read is pending, never across a `yield`: the
        consumer's own time (a slow socket) is not the provider's."""
        s = self._settings
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + s.llm_first_token_timeout_s
        gap_s = s.llm_token_gap_timeout_s
        decoder = SSEDecoder()
        got_text = False
        # A failed earlier attempt's finish_reason must not vouch for this one.
        stats.finish_reason = None
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        try:
            async with asyncio.timeout_at(first_deadline):
                response = await self._session().post(self._url, data=orjson.dumps(body), headers=self._headers)
                if response.status >= 400:
                    raise await self._status_error(response)
        except TimeoutError as e:
            raise _first_token_timeout(s) from e
        except aiohttp.ClientError as e:
            raise LLMUnavailable("could not reach the model provider", retryable=True) from e
        content = response.content
        deadline = Deadline(content)
        try:
            while not decoder.done:
                deadline.reading(loop.time() + gap_s if got_text else first_deadline)
                try:
                    data = await content.readany()
                except Expired as e:
                    if got_text:
                        raise LLMUnavailable(
                            f"the model stopped answering for {gap_s:g} s (token gap timeout)", retryable=True
                        ) from e
                    raise _first_token_timeout(s) from e
                except aiohttp.ClientError as e:
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
                with suppress(TimeoutError, aiohttp.ClientError):
                    async with asyncio.timeout(_DRAIN_S):
                        while await content.readany():
                            pass
        finally:
            deadline.cancel()
            # Read to its end, the connection goes back to the pool; otherwise closing it stops the provider.
            if content.at_eof() and not deadline.expired:
                response.release()
            else:
                response.close()
        if not decoder.done and stats.finish_reason is None:
            raise LLMUnavailable("the model's answer ended before it was complete", retryable=True)

    async def _status_error(self, response: aiohttp.ClientResponse) -> LLMError:
        """The provider refused the request: its status, headers and error body, as ours."""
        try:
            raw = await response.content.read(_ERROR_BODY_MAX)
        except aiohttp.ClientError:
            raw = b""
        finally:
            response.close()
        body: object
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw.decode(errors="replace")
        return status_error(response.status, response.headers, body, self._settings.openai_api_key)


def _first_token_timeout(s: Settings) -> LLMUnavailable:
    return LLMUnavailable(
        f"the model did not start answering within {s.llm_first_token_timeout_s:g} s (first token timeout)",
        retryable=True,
    )
