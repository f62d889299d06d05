"""`python -m bench.request_cost`: event-loop CPU spent per upstream request, by the length of the context sent,
and per streamed chunk. `--httpx2` measures the openai client on its default httpx2 transport instead of the
aiohttp one the server uses, for comparison."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp
import openai

from server.llm import ChatMessage, OpenAILLM, StreamStats
from server.settings import Settings

from .run import REPO, _free_port, _wait_http


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.request_cost")
    parser.add_argument("--httpx2", action="store_true", help="the openai client's default transport")
    args = parser.parse_args(argv)
    port = _free_port()
    upstream = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.upstream", "--port", str(port), cwd=REPO, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await _wait_http(f"http://127.0.0.1:{port}/timings")
        settings = Settings(openai_base_url=f"http://127.0.0.1:{port}/v1", openai_api_key="bench")
        llm = OpenAILLM(settings)
        if args.httpx2:
            await llm.close()
            llm._client = openai.AsyncOpenAI(
                api_key="bench",
                base_url=settings.openai_base_url,
                max_retries=0,
                http_client=openai.DefaultAsyncHttpx2Client(),
            )
        async with aiohttp.ClientSession() as http:
            await http.post(f"http://127.0.0.1:{port}/pace", json={"tokens": 2, "ttft_s": 0, "gap_s": 0})
            print("context messages   CPU per request (this process)")
            for n in (2, 50, 200):
                messages: list[ChatMessage] = [{"role": "system", "content": "You are a test."}]
                messages += [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 10}
                    for i in range(n - 1)
                ]
                rounds = 20
                started = time.process_time()
                for i in range(rounds + 3):
                    if i == 3:  # The first requests pay one-time costs.
                        started = time.process_time()
                    async for _ in llm.stream([*messages, {"role": "user", "content": f"q{i}"}], StreamStats()):
                        pass
                print(f"{n:>16}   {(time.process_time() - started) / rounds * 1000:.2f} ms")

            # Paced so that each token arrives in a network read of its own: the per-chunk cost of the read path.
            streams, tokens = 10, 2000
            await http.post(f"http://127.0.0.1:{port}/pace", json={"tokens": tokens, "ttft_s": 0, "gap_s": 0.0002})
            pieces = 0

            async def one(i: int) -> None:
                nonlocal pieces
                async for _ in llm.stream([{"role": "user", "content": f"long {i}"}], StreamStats()):
                    pieces += 1

            started = time.process_time()
            await asyncio.gather(*(one(i) for i in range(streams)))
            cpu_us = (time.process_time() - started) / (streams * tokens) * 1e6
            print(f"\nstreamed: {cpu_us:.1f} µs CPU per token, {streams * tokens} tokens in {pieces} reads")
        await llm.close()
    finally:
        upstream.terminate()
        await upstream.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
