"""`python -m bench.request_cost`: event-loop CPU spent per upstream request, by the length of the context sent."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp

from server.llm import ChatMessage, OpenAILLM, StreamStats
from server.settings import Settings

from .run import REPO, _free_port, _wait_http


async def main() -> None:
    port = _free_port()
    upstream = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.upstream", "--port", str(port), cwd=REPO, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await _wait_http(f"http://127.0.0.1:{port}/timings")
        async with aiohttp.ClientSession() as http:
            await http.post(f"http://127.0.0.1:{port}/pace", json={"tokens": 2, "ttft_s": 0, "gap_s": 0})
        llm = OpenAILLM(Settings(openai_base_url=f"http://127.0.0.1:{port}/v1", openai_api_key="bench"))
        print("context messages   CPU per request (this process)")
        for n in (2, 50, 200):
            messages: list[ChatMessage] = [{"role": "system", "content": "You are a test."}]
            messages += [
                {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 10} for i in range(n - 1)
            ]
            rounds = 20
            started = time.process_time()
            for i in range(rounds + 3):
                if i == 3:  # The first requests pay one-time costs.
                    started = time.process_time()
                async for _ in llm.stream([*messages, {"role": "user", "content": f"q{i}"}], StreamStats()):
                    pass
            print(f"{n:>16}   {(time.process_time() - started) / rounds * 1000:.2f} ms")
        await llm.close()
    finally:
        upstream.terminate()
        await upstream.wait()


if __name__ == "__main__":
    asyncio.run(main())
