"""The OpenAI-compatible chat model: raw SSE streaming, our own timeouts and retries, provider errors mapped to ours."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import AsyncExitStack, aclosing, suppress
from typing import Any

import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ..backoff import backoff_delay
from ..errors import LLMError, LLMUnavailable
from ..settings import Settings
from .base import LLM, ChatMessage, StreamStats
from .failures import status_error
from .sse import SSEDecoder

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local OpenAI-compatible servers ignore the key, but the client refuses to start without one.
PLACEHOLDER_API_KEY = "no-key-needed"
# The client's own timeouts only catch what ours cannot (a stuck write or pool); ours fire first.
_BACKSTOP_MARGIN_S = 30.0
_BACKOFF_FIRST_S = 0.25
# After [DONE] the end of the body is normally already buffered: reading it lets the connection be reused.
_DRAIN_S = 0.25
_STREAM = openai.AsyncStream[ChatCompletionChunk]


class OpenAILLM(LLM):
    """Streams chat completions from OpenAI or any server that speaks its Chat Completions API."""

    def __init__(self, settings: Settings) -> None:
        self.model = settings.openai_model
        self._settings = settings
        backstop = max(settings.llm_first_token_timeout_s, settings.llm_token_gap_timeout_s) + _BACKSTOP_MARGIN_S
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key or PLACEHOLDER_API_KEY,
            # Explicit, so the client never falls back to reading OPENAI_BASE_URL itself.
            base_url=settings.openai_base_url or DEFAULT_BASE_URL,
            # We retry ourselves: the client's retries would multiply our waits and hide them from the budget.
            max_retries=0,
            timeout=httpx2.Timeout(
                connect=settings.llm_connect_timeout_s, read=backstop, write=backstop, pool=backstop
            ),
            # The client's aiohttp transport: reading a stream through it costs about a third of the CPU per
            # chunk of its default httpx2 one (bench/RESULTS.md). One upstream connection per answer streaming
            # now, up to as many as this process takes sockets: a smaller pool would queue answers behind others.
            http_client=openai.DefaultAioHttpClient(
                limits=httpx2.Limits(max_connections=max(settings.max_connections, 100), keepalive_expiry=30.0)
            ),
        )

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
        await self._client.close()

    def _retry_wait(self, error: LLMError, retries: int) -> float:
        cap = self._settings.llm_retry_after_cap_s
        if error.retry_after is not None:
            return min(error.retry_after, cap)
        return backoff_delay(retries, base=_BACKOFF_FIRST_S, cap=cap)

    async def _attempt(
        self, messages: Sequence[ChatMessage], max_tokens: int | None, stats: StreamStats
    ) -> AsyncGenerator[str, None]:
        """One upstream request. Timeouts wrap each awaited read and never a `yield`: one that fired while we are
        suspended at a yield would cancel the consumer instead of us."""
        s = self._settings
        first_deadline = asyncio.get_running_loop().time() + s.llm_first_token_timeout_s
        decoder = SSEDecoder()
        got_text = False
        # A failed earlier attempt's finish_reason must not vouch for this one.
        stats.finish_reason = None
        async with AsyncExitStack() as stack:
            body: dict[str, Any] = {
                "model": self.model,
                "messages": list(messages),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            # The client's own request path (URL, headers, authentication, status errors), minus the resource
            # method's per-request type transforms of the parameters: about a third of its cost, and a walk of
            # every context message (0.1 ms each) on the event loop that every other stream shares.
            request = self._client.post(
                "/chat/completions",
                cast_to=ChatCompletion,
                body=body,
                stream=True,
                stream_cls=_STREAM,
            )
            try:
                async with asyncio.timeout_at(first_deadline):
                    stream = await request
                stack.push_async_callback(stream.close)
            except TimeoutError as e:
                raise _first_token_timeout(s) from e
            except openai.APIStatusError as e:
                raise status_error(e, s.openai_api_key) from e
            except openai.APIConnectionError as e:
                raise LLMUnavailable("could not reach the model provider", retryable=True) from e
            except openai.OpenAIError as e:
                raise LLMError("the model provider could not be called") from e
            # Raw bytes, not the client's per-event pydantic objects: this loop runs once per token.
            reads = stream.response.aiter_bytes()
            await stack.enter_async_context(aclosing(reads))
            while not decoder.done:
                try:
                    if got_text:
                        async with asyncio.timeout(s.llm_token_gap_timeout_s):
                            data = await reads.__anext__()
                    else:
                        async with asyncio.timeout_at(first_deadline):
                            data = await reads.__anext__()
                except StopAsyncIteration:
                    data = None
                except TimeoutError as e:
                    if got_text:
                        raise LLMUnavailable(
                            f"the model stopped answering for {s.llm_token_gap_timeout_s:g} s (token gap timeout)",
                            retryable=True,
                        ) from e
                    raise _first_token_timeout(s) from e
                except httpx2.HTTPError as e:
                    raise LLMUnavailable("the connection to the model provider broke", retryable=True) from e
                text = decoder.feed(data, stats) if data is not None else decoder.end(stats)
                if text:
                    got_text = True
                    yield text
                if decoder.error is not None:
                    raise decoder.error
                if data is None:
                    break
            if decoder.done:
                with suppress(TimeoutError, httpx2.HTTPError):
                    async with asyncio.timeout(_DRAIN_S):
                        async for _ in reads:
                            pass
        if not decoder.done and stats.finish_reason is None:
            raise LLMUnavailable("the model's answer ended before it was complete", retryable=True)


def _first_token_timeout(s: Settings) -> LLMUnavailable:
    return LLMUnavailable(
        f"the model did not start answering within {s.llm_first_token_timeout_s:g} s (first token timeout)",
        retryable=True,
    )
