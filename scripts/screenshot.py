"""Takes docs/screenshot.png: the page in use, in Debian's Chromium, against a real server, worker and database.

Run it with the private PostgreSQL and Redis of the tests:

    bash scripts/with-services.sh .venv/bin/python scripts/screenshot.py

It starts `python -m server` and `arq worker.WorkerSettings` with the offline demo model, has a conversation
through the page (one answer streamed in full, one stopped midway), disconnects and waits for the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from playwright.async_api import Page, async_playwright, expect

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "docs" / "screenshot.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def services(port: int) -> AsyncIterator[None]:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": os.environ["TEST_DATABASE_URL"],
        "REDIS_URL": os.environ["TEST_REDIS_URL"],
        "PORT": str(port),
        "OFFLINE_TOKEN_DELAY_S": "0.06",
        "WORKER_METRICS_PORT": "0",
    }
    arq = str(Path(sys.executable).with_name("arq"))
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-m", "server", env=env, cwd=REPO_ROOT),
        await asyncio.create_subprocess_exec(arq, "worker.WorkerSettings", env=env, cwd=REPO_ROOT),
    ]
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()


async def earlier_session(port: int) -> None:
    """A session from before, so the recent-sessions panel has something in it."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws/session/chat-earlier-demo")
        await ws.receive()
        await ws.send_str("What can this demo do?")
        async for msg in ws:
            if '"message.stored"' in msg.data and '"assistant"' in msg.data:
                break
        await ws.close()


async def converse(page: Page, port: int) -> None:
    await page.goto(f"http://127.0.0.1:{port}/")
    await page.get_by_label("Session id", exact=True).fill("chat-lisbon-trip")
    await page.get_by_role("button", name="Connect", exact=True).click()
    box = page.get_by_label("Message", exact=True)
    await box.fill("I'd like to plan three days in Lisbon in April.")
    await box.press("Enter")
    await expect(page.locator("#log .msg.assistant[data-id]")).to_have_count(1, timeout=15_000)
    await box.fill("Which neighbourhoods should I stay in?")
    await box.press("Enter")
    await page.wait_for_timeout(900)
    await page.get_by_role("button", name="Stop", exact=True).click()
    await expect(page.locator("#log .msg.assistant[data-id]")).to_have_count(2)
    await page.get_by_role("button", name="Disconnect", exact=True).click()
    await expect(page.locator("#summary[data-state=done]")).to_be_visible(timeout=30_000)
    await expect(page.locator("#sessions li")).to_have_count(2)
    await page.mouse.move(0, 0)


async def main() -> None:
    port = free_port()
    async with services(port), async_playwright() as playwright:
        await earlier_session(port)
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 940})
        await converse(page, port)
        await page.screenshot(path=OUT)
        await browser.close()
    print(f"wrote {OUT.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
