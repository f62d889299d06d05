"""The page in a real browser: Debian's Chromium driven by Playwright, against a real server, worker and database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
from arq.worker import Worker
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from core.settings import REPO_ROOT, Settings
from tests.conftest import eventually, free_port, service_env
from tests.fakes import openai_server as fake
from worker.settings import worker_options

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO_ROOT / "test-artifacts"
STORY = "Lisbon in spring: walk Alfama early, take tram 28, then eat pastéis de nata in Belém. " * 2
HTML_ANSWER = 'Plain text only: <b>not bold</b> and <img src="x" onerror="document.title=1"> stay as typed.'

expect.set_options(timeout=10_000)


# The browser and the page.


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium for the module; `launch` gives it a fresh, throwaway profile."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} not found: `make test` installs it (scripts/ensure-packages.sh), or: apt-get install chromium",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A fresh page; when the test fails, a screenshot in test-artifacts/ and the page's console in the report."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
    # pytest counts a failed test body before its fixtures are torn down: no hook needed to know.
    failures_before = request.session.testsfailed
    try:
        yield page
        if request.session.testsfailed > failures_before:
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / f"{request.node.name}.png"
            await page.screenshot(path=shot, full_page=True)
            print(f"screenshot: {shot}", *console, sep="\n")
    finally:
        await context.close()
    assert not [line for line in console if line.startswith("uncaught")], console


# The services behind it.


class Server:
    """A real `python -m server`, kept on one port across restarts: the page reconnects to where it was."""

    def __init__(self, settings: Settings, log: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self._settings = settings
        self._log = log
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self._log.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "server",
                env=service_env(self._settings, PORT=str(self.port), **self._env),
                cwd=REPO_ROOT,
                stdout=log,
                stderr=log,
            )
        await eventually(self._up, timeout=20)

    async def _up(self) -> bool:
        assert self._proc is not None and self._proc.returncode is None, f"the server exited; see {self._log}"
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.ClientSession() as http, http.get(f"{self.url}healthz") as resp:
                return resp.status == 200
        return False

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(sig)
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def restart(self, sig: signal.Signals) -> None:
        await self.stop(sig)
        await self.start()


@pytest_asyncio.fixture
async def serve(
    settings: Settings, fake_llm: fake.FakeOpenAI, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    """Start a real server against the test services; keyword arguments are extra environment variables.

    The page is a 1.1 client: its server runs the 1.1 default, where a closed socket does not stop the answer."""
    servers: list[Server] = []
    log = tmp_path / "server.log"
    failures_before = request.session.testsfailed

    async def start(**env: str) -> Server:
        server = Server(settings, log, {"SHUTDOWN_DRAIN_S": "10", "ON_DISCONNECT": "continue", **env})
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.stop()
        if request.session.testsfailed > failures_before and log.exists():
            print("server log:", *log.read_text(errors="replace").splitlines()[-40:], sep="\n")


@pytest_asyncio.fixture
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    """The real arq worker, running beside the test as it would beside the server."""
    options = worker_options(settings)
    options.update(cron_jobs=None, handle_signals=False, poll_delay=0.05)
    worker = Worker(**options)
    running = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await worker.close()


# What the user looks at.


def status(page: Page) -> Locator:
    return page.get_by_role("status")


def button(page: Page, name: str) -> Locator:
    return page.get_by_role("button", name=name, exact=True)


def message_box(page: Page) -> Locator:
    return page.get_by_label("Message", exact=True)


def said(page: Page) -> Locator:
    """The text of every message in the conversation, in order."""
    return page.locator("#log .msg .text")


async def connect(page: Page, server: Server) -> str:
    await page.goto(server.url)
    session_id = await page.get_by_label("Session id", exact=True).input_value()
    await button(page, "Connect").click()
    await expect(status(page)).to_contain_text("Connected")
    return session_id


async def send(page: Page, text: str) -> Locator:
    """Type a message, press Enter, and return the answer to it once the server has stored it."""
    answers = page.locator("#log .msg.assistant")
    answer = answers.nth(await answers.count())
    box = message_box(page)
    await box.fill(text)
    await box.press("Enter")
    await expect(page.locator("#log .msg.user").last).to_contain_text(text)
    await expect(answer).to_have_attribute("data-id", re.compile(r"\d+"))
    return answer


async def streaming_text(page: Page) -> str:
    """Wait until the newest answer shows some text while it is still streaming, and return that text."""
    handle = await page.wait_for_function(
        """() => {
            const answer = document.querySelector("#log .msg.assistant.streaming .text");
            return answer && answer.textContent.length > 0 && answer.textContent;
        }"""
    )
    return str(await handle.json_value())


# The stories.


async def test_a_message_sent_with_enter_streams_in_as_plain_text(page: Page, serve: Any, fake_llm: Any) -> None:
    fake_llm.script(fake.slow(0.08, text=HTML_ANSWER))
    server = await serve()
    await page.goto(server.url)
    await expect(status(page)).to_have_text("Disconnected")
    assert re.fullmatch(r"[A-Za-z0-9._:-]+", await page.get_by_label("Session id", exact=True).input_value())

    await button(page, "Connect").click()
    await expect(status(page)).to_contain_text("Connected · model fake-model")
    box = message_box(page)
    await expect(box).to_be_focused()
    await box.fill("Show me some HTML")
    await box.press("Enter")

    # The answer shows up word by word, with a Stop button, while the status line says it is answering.
    await expect(said(page).first).to_have_text("Show me some HTML")
    partial = await streaming_text(page)
    assert HTML_ANSWER.startswith(partial) and len(partial) < len(HTML_ANSWER)
    await expect(status(page)).to_contain_text("Answering")
    await expect(button(page, "Stop")).to_be_visible()

    # Then all of it, as the text the model wrote: its tags are shown, not obeyed.
    answer = page.locator("#log .msg.assistant")
    await expect(answer.locator(".text")).to_have_text(HTML_ANSWER)
    await expect(answer.locator("b, img")).to_have_count(0)
    await expect(answer.locator(".meta")).to_contain_text("saved #")
    await expect(button(page, "Stop")).to_be_hidden()
    await expect(status(page)).to_contain_text("Connected")


async def test_stop_cuts_an_answer_short_and_a_failed_answer_says_so(page: Page, serve: Any, fake_llm: Any) -> None:
    fake_llm.script(fake.slow(0.15, text=STORY), fake.server_error(503))
    server = await serve(LLM_MAX_RETRIES="0")
    await connect(page, server)
    box = message_box(page)
    await box.fill("Plan my Lisbon trip")
    await box.press("Enter")
    await streaming_text(page)

    await button(page, "Stop").click()
    first = page.locator("#log .msg.assistant").first
    await expect(first.locator(".meta")).to_contain_text(re.compile(r"stopped · .* · saved #\d+"))
    stopped_at = await first.locator(".text").text_content()
    assert stopped_at and STORY.startswith(stopped_at) and len(stopped_at) < len(STORY)
    await expect(box).to_be_focused()

    failed = await send(page, "Are you still there?")
    await expect(failed).to_have_class(re.compile(r"\bfailed\b"))
    await expect(failed.locator(".meta")).to_contain_text("failed:")
    await expect(failed.locator(".meta")).to_contain_text("llm_unavailable")
    await expect(failed.locator(".text")).to_have_text(re.compile("can't answer right now"))
    await expect(status(page)).to_contain_text("Connected")


async def test_after_disconnect_the_summary_appears_and_past_sessions_open(
    page: Page, serve: Any, worker: Any, db: Any
) -> None:
    server = await serve()
    session_id = await connect(page, server)
    await send(page, "I want to plan a trip to Lisbon.")

    await button(page, "Disconnect").click()
    await expect(status(page)).to_have_text("Disconnected")
    summary = page.get_by_role("region", name="Summary")
    await expect(summary).to_contain_text("Waiting for the worker")

    async def written() -> Any:
        return await db.fetchval("select summary from sessions where session_id = $1", session_id)

    stored = await eventually(written, timeout=15)
    await expect(summary).to_contain_text(stored.strip())

    # The recent sessions list this one with its summary; opening it shows the conversation.
    listed = page.locator("#sessions li", has_text=session_id)
    await expect(listed).to_contain_text("2 messages")
    await expect(listed).to_contain_text(stored.strip())
    await button(page, f"Open session {session_id}").click()
    dialog = page.get_by_role("dialog")
    await expect(dialog.locator(".msg .text")).to_have_text(
        ["I want to plan a trip to Lisbon.", "You said: I want to plan a trip to Lisbon."]
    )
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()


async def test_a_reload_with_the_same_id_brings_the_conversation_back_on_a_phone(page: Page, serve: Any) -> None:
    server = await serve(OPENAI_BASE_URL="", OPENAI_API_KEY="", OFFLINE_TOKEN_DELAY_S="0.005")
    await page.set_viewport_size({"width": 390, "height": 844})
    session_id = await connect(page, server)
    await expect(status(page)).to_contain_text("offline demo model answers")
    await send(page, "first message")
    await send(page, "second message")
    before = await said(page).all_text_contents()
    assert len(before) == 4

    # A reload while connected comes back to the same session by itself.
    await page.reload()
    id_field = page.get_by_label("Session id", exact=True)
    await expect(id_field).to_have_value(session_id)
    await expect(status(page)).to_contain_text("session resumed")
    await expect(said(page)).to_have_text(before)

    # After Disconnect a reload keeps the id and shows the saved conversation, but does not connect by itself;
    # Enter in the id field connects, keyboard only.
    await button(page, "Disconnect").click()
    await expect(status(page)).to_have_text("Disconnected")
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.reload()
    await expect(id_field).to_have_value(session_id)
    await expect(status(page)).to_have_text("Disconnected")
    await expect(said(page)).to_have_text(before)
    await expect(page.locator("#log .note")).to_have_text("The saved conversation. Press Connect to continue it.")
    assert sockets == []
    await id_field.press("Enter")
    await expect(status(page)).to_contain_text("session resumed")
    await expect(said(page)).to_have_text(before)
    await expect(message_box(page)).to_be_focused()

    # Everything fits the phone's width: nothing to scroll sideways.
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    for name in ("Send", "Disconnect"):
        assert await button(page, name).is_visible()


async def test_the_session_open_now_is_in_recent_sessions_even_an_old_one(page: Page, serve: Any, db: Any) -> None:
    server = await serve()
    session_id = await connect(page, server)
    # A new session is listed as soon as it is open, marked as the one open here, and counts its messages.
    listed = page.locator("#sessions li", has_text=session_id)
    await expect(listed).to_contain_text("open here")
    await expect(listed).to_have_attribute("aria-current", "true")
    await send(page, "count me")
    await expect(listed).to_contain_text("2 messages")
    await button(page, "Disconnect").click()
    await expect(status(page)).to_have_text("Disconnected")
    await expect(listed).not_to_contain_text("open here")

    # Twenty newer sessions push it off the list; opened from a link, it shows its saved conversation, and once
    # connected it is listed again, first.
    await db.execute("update sessions set start_time = '2020-01-01T00:00:00Z' where session_id = $1", session_id)
    await db.execute(
        "insert into sessions (session_id, start_time, end_time) select 'newer-' || i, now(), now()"
        " from generate_series(1, 20) i"
    )
    other = await page.context.new_page()
    await other.goto(f"{server.url}#{session_id}")
    await expect(other.locator("#sessions li")).to_have_count(20)
    await expect(said(other)).to_have_text(["count me", "You said: count me"])
    await expect(other.locator("#sessions li", has_text=session_id)).to_have_count(0)
    await button(other, "Connect").click()
    await expect(status(other)).to_contain_text("session resumed")
    first = other.locator("#sessions li").first
    await expect(first).to_contain_text(session_id)
    await expect(first).to_contain_text("open here")
    await expect(other.locator("#sessions li")).to_have_count(21)


async def test_a_reload_in_the_middle_of_a_long_answer_shows_the_whole_answer_once(
    page: Page, serve: Any, fake_llm: Any
) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    fake_llm.script(fake.slow(0.08, text=STORY))
    server = await serve()
    session_id = await connect(page, server)
    box = message_box(page)
    await box.fill("Plan my Lisbon trip")
    await box.press("Enter")
    before = await streaming_text(page)

    # The reload reconnects by itself, says which piece of the answer it holds, and streams on in the same bubble.
    await page.reload()
    await expect(page.get_by_label("Session id", exact=True)).to_have_value(session_id)
    after = await streaming_text(page)
    assert STORY.startswith(after) and len(after) >= len(before), (before, after)
    answer = page.locator("#log .msg.assistant")
    await expect(answer.locator(".text")).to_have_text(STORY)
    await expect(answer).to_have_attribute("data-id", re.compile(r"\d+"))
    await expect(said(page)).to_have_text(["Plan my Lisbon trip", STORY])
    assert re.search(r"[?&]resume=[^&]+%3A[1-9]\d*$", sockets[-1]), sockets

    # Another reload, the answer stored: the conversation once more, as it is stored.
    await page.reload()
    await expect(status(page)).to_contain_text("session resumed")
    await expect(said(page)).to_have_text(["Plan my Lisbon trip", STORY])
    assert "resume=" not in sockets[-1]


async def test_a_dropped_socket_mid_answer_picks_the_answer_up_where_it_was(
    page: Page, serve: Any, fake_llm: Any
) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    fake_llm.script(fake.slow(0.08, text=STORY))
    server = await serve()
    await connect(page, server)
    box = message_box(page)
    await box.fill("Plan my Lisbon trip")
    await box.press("Enter")
    await streaming_text(page)

    # The socket drops: as the page's own watchdog does with a socket silent for too long (the close arrives
    # later or never). The answer goes on at the server meanwhile.
    await page.evaluate("() => { const ws = state.ws; state.ws = null; ws.close(); onClosed(1006); }")
    await expect(page.locator("#log .note", has_text="Reconnected")).to_have_count(1)
    answer = page.locator("#log .msg.assistant")
    await expect(answer.locator(".text")).to_have_text(STORY)
    await expect(answer).to_have_attribute("data-id", re.compile(r"\d+"))
    await expect(answer.locator(".meta")).not_to_contain_text("stopped")
    await expect(said(page)).to_have_text(["Plan my Lisbon trip", STORY])
    assert re.search(r"[?&]resume=[^&]+%3A\d+$", sockets[-1]), sockets


async def test_another_tab_takes_the_session_over_mid_answer_and_shows_all_of_it(
    page: Page, serve: Any, fake_llm: Any
) -> None:
    fake_llm.script(fake.slow(0.08, text=STORY))
    server = await serve()
    session_id = await connect(page, server)
    box = message_box(page)
    await box.fill("Plan my Lisbon trip")
    await box.press("Enter")
    await streaming_text(page)

    # A second tab opens the same session: it gets the text so far in one piece, then the rest, once.
    other = await page.context.new_page()
    await other.goto(f"{server.url}#{session_id}")
    await button(other, "Connect").click()
    await expect(status(page)).to_contain_text("open in another tab")
    await expect(page.locator("#log .msg.assistant .meta")).to_contain_text("goes on in the other tab")
    await expect(said(other)).to_have_text(["Plan my Lisbon trip", STORY])
    await expect(other.locator("#log .msg.assistant")).to_have_attribute("data-id", re.compile(r"\d+"))


async def test_a_stopped_answer_shows_as_stopped_after_a_reload_and_in_the_session_viewer(
    page: Page, serve: Any, fake_llm: Any
) -> None:
    fake_llm.script(fake.slow(0.15, text=STORY))
    server = await serve()
    session_id = await connect(page, server)
    box = message_box(page)
    await box.fill("Plan my Lisbon trip")
    await box.press("Enter")
    await streaming_text(page)
    await button(page, "Stop").click()
    stopped = page.locator("#log .msg.assistant")
    await expect(stopped.locator(".meta")).to_contain_text(re.compile(r"stopped · .* · saved #\d+"))
    stopped_at = await stopped.locator(".text").text_content()
    assert stopped_at and len(stopped_at) < len(STORY)

    await page.reload()
    await expect(status(page)).to_contain_text("session resumed")
    await expect(said(page)).to_have_text(["Plan my Lisbon trip", stopped_at])
    await expect(stopped).to_have_class(re.compile(r"\bcancelled\b"))
    await expect(stopped.locator(".meta")).to_contain_text(re.compile(r"stopped · .* · saved #\d+"))

    await button(page, f"Open session {session_id}").click()
    dialog = page.get_by_role("dialog")
    in_viewer = dialog.locator(".msg.assistant")
    await expect(in_viewer.locator(".text")).to_have_text(stopped_at)
    await expect(in_viewer).to_have_class(re.compile(r"\bcancelled\b"))
    await expect(in_viewer.locator(".meta")).to_contain_text("stopped")


async def test_an_answer_cut_off_by_a_crash_shows_as_interrupted_after_a_reload_and_in_the_viewer(
    page: Page, serve: Any, fake_llm: Any, settings: Settings
) -> None:
    fake_llm.script(fake.slow(0.15, text=STORY))
    server = await serve(ANSWER_LEASE_S="1")
    session_id = await connect(page, server)
    box = message_box(page)
    await box.fill("Plan my Lisbon trip")
    await box.press("Enter")
    await streaming_text(page)

    # The server dies mid-answer; the worker (its recovery runs every 5 s) stores the text streamed so far as
    # interrupted, and the page, reconnected to the next server, shows it so.
    await server.stop(signal.SIGKILL)
    options = worker_options(settings.replace(answer_lease_s=1))
    options.update(handle_signals=False, poll_delay=0.05)
    worker = Worker(**options)
    running = asyncio.create_task(worker.async_run())
    try:
        await server.start()
        answer = page.locator("#log .msg.assistant")
        label = re.compile(r"interrupted: the server stopped before the answer ended · .* · saved #\d+")
        await expect(answer.locator(".meta")).to_contain_text(label, timeout=30_000)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await worker.close()
    await expect(answer).to_have_class(re.compile(r"\binterrupted\b"))

    await page.reload()
    await expect(status(page)).to_contain_text("session resumed")
    await expect(answer).to_have_class(re.compile(r"\binterrupted\b"))
    await expect(answer.locator(".meta")).to_contain_text(label)
    await button(page, f"Open session {session_id}").click()
    in_viewer = page.get_by_role("dialog").locator(".msg.assistant")
    await expect(in_viewer).to_have_class(re.compile(r"\binterrupted\b"))
    await expect(in_viewer.locator(".meta")).to_contain_text("interrupted: the server stopped")


async def test_the_page_resumes_after_the_server_goes_away_without_showing_anything_twice(
    page: Page, serve: Any, fake_llm: Any, db: Any
) -> None:
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    server = await serve()
    session_id = await connect(page, server)
    await send(page, "before the restart")

    # A restart (SIGTERM) mid-answer: the server finishes the answer, closes with 1001, and comes back.
    fake_llm.script(fake.slow(0.1, text=STORY))
    box = message_box(page)
    await box.fill("during the restart")
    await box.press("Enter")
    await streaming_text(page)
    await server.restart(signal.SIGTERM)
    await expect(page.locator("#log .note", has_text="Reconnected")).to_have_count(1)
    await expect(status(page)).to_contain_text("Connected")
    await send(page, "after the restart")

    # A crash (SIGKILL): the connection just drops, and the page finds the new process too.
    await server.restart(signal.SIGKILL)
    await expect(page.locator("#log .note", has_text="Reconnected")).to_have_count(2)
    await send(page, "after the crash")

    expected = [
        "before the restart",
        "You said: before the restart",
        "during the restart",
        STORY,
        "after the restart",
        "You said: after the restart",
        "after the crash",
        "You said: after the crash",
    ]
    await expect(said(page)).to_have_text(expected)
    ids = [await li.get_attribute("data-id") for li in await page.locator("#log .msg").all()]
    rows = await db.fetch(
        "select id from session_events where session_id = $1 and event_type in ('user_message', 'ai_message')"
        " order by id",
        session_id,
    )
    assert ids == [str(r["id"]) for r in rows]
    # Each reconnect asked only for what came after the last message it had.
    assert len(sockets) >= 3
    assert all(re.search(r"\?after=\d+$", url) for url in sockets[1:]), sockets


async def test_with_authentication_on_the_page_uses_the_token_it_was_opened_with(
    page: Page, serve: Any, worker: Worker, db: Any
) -> None:
    secret = "browser-test-secret-long-enough-for-hs256"
    server = await serve(AUTH_JWT_SECRET=secret)

    # Without a token the server refuses the socket, and the page says it could not connect.
    await page.goto(server.url)
    await button(page, "Connect").click()
    await expect(status(page)).not_to_contain_text("Connected ·")

    token = jwt.encode({"sub": "ada", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    await page.goto(f"{server.url}?access_token={token}")
    session_id = await page.get_by_label("Session id", exact=True).input_value()
    await button(page, "Connect").click()
    await expect(status(page)).to_contain_text("Connected")
    answer = await send(page, "hello with a token")
    await expect(answer.locator(".text")).to_contain_text("hello with a token")
    assert await db.fetchval("select owner_id from sessions where session_id = $1", session_id) == "ada"

    # The summary and the recent sessions come through the API with the same token.
    await button(page, "Disconnect").click()
    await expect(page.get_by_role("region", name="Summary")).to_contain_text("You said")


# Text in any script, and a phone.

CJK_EMOJI = "你好，世界。こんにちは、元気ですか？안녕하세요! 🌍🎉👍🏽❤️"
# What the page draws for each grapheme of an element, next to what it draws for a code point no font has
# (U+0378, unassigned): a grapheme drawn like that is a "tofu" box, a glyph the page's fonts do not have.
MISSING_GLYPHS = """(el) => {
    const cs = getComputedStyle(el);
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 96;
    const g = canvas.getContext("2d", { willReadFrequently: true });
    g.font = `${cs.fontStyle} ${cs.fontWeight} ${cs.fontSize} ${cs.fontFamily}`;
    const draw = (s) => {
        g.clearRect(0, 0, 96, 96);
        g.fillText(s, 8, 60);
        return Array.from(g.getImageData(0, 0, 96, 96).data).join();
    };
    const box = draw("\\u0378");
    const graphemes = Array.from(new Intl.Segmenter().segment(el.textContent), (s) => s.segment);
    return {
        boxesLookAlike: draw("\\u0379") === box,
        missing: graphemes.filter((s) => s.trim() && draw(s) === box),
    };
}"""


async def test_chinese_japanese_korean_and_emoji_show_as_glyphs_not_boxes(
    page: Page, serve: Any, fake_llm: Any
) -> None:
    answer_text = "第一句话说完了。第二句话还在路上，慢慢来。"
    fake_llm.script(
        fake.Scenario(text=answer_text, chunks=["第一句话说完了。", "第二句话", "还在路上，", "慢慢来。"], delay=0.4)
    )
    server = await serve()
    await connect(page, server)
    box = message_box(page)
    await box.fill(CJK_EMOJI)
    await box.press("Enter")
    sent = page.locator("#log .msg.user .text")
    await expect(sent).to_have_text(CJK_EMOJI)

    # A screen reader hears the answer sentence by sentence: a Chinese sentence ends with 。 and no space.
    await expect(page.locator("#announcer")).to_contain_text("第一句话说完了。")
    await expect(page.locator("#log .msg.assistant.streaming")).to_have_count(1)
    answer = page.locator("#log .msg.assistant")
    await expect(answer).to_have_attribute("data-id", re.compile(r"\d+"))

    ARTIFACTS.mkdir(exist_ok=True)
    await page.locator("#log").screenshot(path=ARTIFACTS / "cjk-and-emoji.png")
    for text in (sent, answer.locator(".text")):
        drawn = await text.evaluate(MISSING_GLYPHS)
        assert drawn["boxesLookAlike"], "the check needs missing glyphs to look alike"
        assert drawn["missing"] == [], (
            f"drawn as empty boxes: {drawn['missing']}; the page's fonts lack these glyphs"
            " (make test installs fonts-wqy-microhei and fonts-noto-color-emoji)"
        )

    # An input method uses Enter to end a composition: that Enter never sends (Safari says so with keyCode 229).
    await box.fill("にほんご")
    await box.evaluate(
        """(el) => el.dispatchEvent(new KeyboardEvent("keydown",
            { key: "Enter", keyCode: 229, bubbles: true, cancelable: true }))"""
    )
    await page.wait_for_timeout(300)
    await expect(box).to_have_value("にほんご")
    await expect(page.locator("#log .msg.user")).to_have_count(1)


async def test_on_a_phone_the_conversation_and_the_message_box_fit_the_screen(page: Page, serve: Any) -> None:
    server = await serve(OPENAI_BASE_URL="", OPENAI_API_KEY="", OFFLINE_TOKEN_DELAY_S="0.002")
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.goto(server.url)

    async def fits() -> None:
        # Nothing to scroll sideways; the message box and Send on the first screen, all of them.
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert await page.evaluate("window.scrollY") == 0
        for control in (page.locator("#log"), message_box(page), button(page, "Send")):
            await expect(control).to_be_in_viewport(ratio=1)

    await fits()
    await button(page, "Connect").click()
    await expect(status(page)).to_contain_text("Connected")
    await fits()
    # A long conversation scrolls inside the log: the box and Send stay where they were, and tapping Send sends.
    for i in range(4):
        await send(page, f"message {i} " + "long words wrap on a narrow screen " * 6)
    await message_box(page).fill("sent with the button")
    await button(page, "Send").click()
    await expect(page.locator("#log .msg.user .text").last).to_have_text("sent with the button")
    await expect(page.locator("#log .msg.assistant")).to_have_count(5)
    await page.evaluate("window.scrollTo(0, 0)")
    await fits()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "phone.png")


# The README's console snippet, pasted as a new user would.


def readme_snippet() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"```js\n(.*?)```", readme, re.S)
    assert match, "README.md has no ```js block"
    return match.group(1)


async def test_the_readme_console_snippet_works_on_the_page_and_a_refusal_is_logged(
    page: Page, serve: Any, tmp_path: Path
) -> None:
    server = await serve(OPENAI_BASE_URL="", OPENAI_API_KEY="", OFFLINE_TOKEN_DELAY_S="0.002")
    logged: list[Any] = []

    async def on_console(message: Any) -> None:
        logged.append([await arg.json_value() for arg in message.args])

    page.on("console", on_console)

    # In the console of the demo page, by either of its loopback names: the events arrive as decoded objects.
    for url in (server.url, server.url.replace("127.0.0.1", "localhost")):
        logged.clear()
        await page.goto(url)
        await page.evaluate(f"() => {{ {readme_snippet()} }}")

        async def stored() -> bool:
            return any(a and isinstance(a[0], dict) and a[0].get("role") == "assistant" for a in logged)

        await eventually(stored, timeout=10)
        types = [a[0]["type"] for a in logged if a and isinstance(a[0], dict)]
        assert types[:2] == ["session.ready", "response.started"], types
        assert {"response.delta", "response.done", "message.stored"} <= set(types), types
        done = next(a[0] for a in logged if isinstance(a[0], dict) and a[0]["type"] == "response.done")
        assert done["status"] == "completed" and "Hello, explain WebSockets simply" in done["text"]

    # From another origin (this page at localhost, the socket at 127.0.0.1) the server refuses and says why.
    logged.clear()
    await page.evaluate(
        "(url) => { " + readme_snippet().replace('location.origin.replace(/^http/, "ws")', "url") + " }",
        server.url.replace("http://", "ws://").rstrip("/"),
    )

    async def closed() -> bool:
        return ["closed", 1006] in logged

    await eventually(closed, timeout=10)
    port = server.port
    line = f"INFO server.auth origin not allowed origin=http://localhost:{port} host=127.0.0.1:{port}"
    assert line in (tmp_path / "server.log").read_text()


async def test_a_long_conversation_says_when_its_context_is_summarised(page: Page, serve: Any, settings: Any) -> None:
    offline = {"OPENAI_BASE_URL": "", "OPENAI_API_KEY": "", "OFFLINE_TOKEN_DELAY_S": "0.002"}
    server = await serve(CONTEXT_MAX_TOKENS="300", MESSAGES_PER_MINUTE="1000", **offline)
    options = worker_options(settings.replace(openai_base_url=None, openai_api_key=None, context_max_tokens=300))
    options.update(cron_jobs=None, handle_signals=False, poll_delay=0.05)
    worker = Worker(**options)
    running = asyncio.create_task(worker.async_run())
    try:
        await connect(page, server)
        note = page.locator("#log .note", has_text="is now summarised for the model")
        for i in range(12):
            await send(page, f"Message {i}: here is something long enough to fill a small context quickly.")
            if await note.count():
                break
        await expect(note.first).to_be_visible(timeout=15_000)
        # The conversation goes on after it.
        await send(page, "And one more after the summary.")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await worker.close()
