"""`python -m bench.request_cost`: event-loop CPU spent per upstream request, by the length of the context sent,
and per streamed token. `--sdk` measures the same requests through the `openai` client's own streaming call (on
its aiohttp transport) instead of the server's request path, for comparison.

CPU is `time.process_time()` of this process (the upstream runs in another), so other work on the machine shifts
the figures less than wall time would; each figure is the best of `--repeat` runs, the least disturbed one."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import openai

from core.llm import ChatMessage, OpenAILLM, StreamStats
from core.settings import Settings

from .stack import free_port, start_upstream


class SDKStream:
    """The comparison: `chat.completions.create(stream=True)` and its parsed chunks, as the SDK's docs show it."""

    def __init__(self, settings: Settings) -> None:
        self._client = openai.AsyncOpenAI(
            api_key="bench", base_url=settings.openai_base_url, max_retries=0, http_client=openai.DefaultAioHttpClient()
        )

    async def stream(self, messages: list[ChatMessage], stats: StreamStats) -> AsyncIterator[str]:
        chunks = await self._client.chat.completions.create(
            model="bench",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
        )
        async for chunk in chunks:  # type: ignore[union-attr]
            if chunk.choices and (text := chunk.choices[0].delta.content):
                yield text

    async def close(self) -> None:
        await self._client.close()


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.request_cost")
    parser.add_argument("--sdk", action="store_true", help="the openai client's own streaming call")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best is shown")
    parser.add_argument("--streams", type=int, default=10, help="concurrent long answers")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens in each long answer")
    args = parser.parse_args(argv)
    port = free_port()
    upstream = await start_upstream(port)
    try:
        settings = Settings(openai_base_url=f"http://127.0.0.1:{port}/v1", openai_api_key="bench")
        llm: OpenAILLM | SDKStream = SDKStream(settings) if args.sdk else OpenAILLM(settings)
        async with aiohttp.ClientSession() as http:

            async def pace(tokens: int, gap_s: float) -> None:
                await http.post(f"http://127.0.0.1:{port}/pace", json={"tokens": tokens, "ttft_s": 0, "gap_s": gap_s})

            await pace(2, 0)
            print("context messages   CPU per request (this process)")
            for n in (2, 50, 200):
                messages: list[ChatMessage] = [{"role": "system", "content": "You are a test."}]
                messages += [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 10}
                    for i in range(n - 1)
                ]
                rounds = 50
                best = float("inf")
                for _ in range(args.repeat):
                    for i in range(3):  # The first requests pay one-time costs.
                        async for _ in llm.stream([*messages, {"role": "user", "content": f"w{i}"}], StreamStats()):
                            pass
                    started = time.process_time()
                    for i in range(rounds):
                        async for _ in llm.stream([*messages, {"role": "user", "content": f"q{i}"}], StreamStats()):
                            pass
                    best = min(best, (time.process_time() - started) / rounds)
                print(f"{n:>16}   {best * 1000:.2f} ms")

            streams, tokens = args.streams, args.tokens
            pieces = 0

            async def one(i: int) -> None:
                nonlocal pieces
                async for _ in llm.stream([{"role": "user", "content": f"long {i}"}], StreamStats()):
                    pieces += 1

            print(f"\n{streams} concurrent answers of {tokens} tokens   CPU per token   CPU per read   tokens per read")
            # Paced: each token arrives in a network read of its own, so this is the cost of one read through the
            # transport, our decoder and our generators. Unpaced: the upstream writes as fast as it can and reads
            # carry many tokens, so this is mostly the decoder's cost per token.
            for label, gap_s in (("paced (1 read per token)", 0.0002), ("unpaced (gap 0)", 0.0)):
                await pace(tokens, gap_s)
                best, reads = float("inf"), 1
                for _ in range(args.repeat):
                    pieces = 0
                    started = time.process_time()
                    await asyncio.gather(*(one(i) for i in range(streams)))
                    cpu_s = time.process_time() - started
                    if cpu_s < best:
                        best, reads = cpu_s, max(pieces, 1)
                per_token, per_read = best / (streams * tokens) * 1e6, best / reads * 1e6
                print(f"{label:>36}   {per_token:10.1f} µs   {per_read:9.1f} µs   {streams * tokens / reads:12.1f}")
        await llm.close()
    finally:
        upstream.terminate()
        await upstream.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
