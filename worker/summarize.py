"""Turning a session's stored messages into a concise summary: one request, or chunks combined when it is long."""

from __future__ import annotations

from collections.abc import Sequence

from core import telemetry
from core.errors import LLMError
from core.llm import LLM, ChatMessage, StreamStats
from core.settings import OFFLINE_MODEL, Settings
from core.store import AI_MESSAGE, USER_MESSAGE, StoredEvent

_COMBINE = (
    "These are summaries of consecutive parts of one conversation, in order. Merge them into a single summary "
    "of the whole conversation."
)


def transcript_lines(events: Sequence[StoredEvent]) -> list[str]:
    """One line per message; failed answers are left out, as they were out of the model's context."""
    lines = []
    for event in events:
        if event.event_type == USER_MESSAGE:
            lines.append(f"User: {event.content or ''}")
        elif event.event_type == AI_MESSAGE and event.metadata.get("status") != "failed":
            lines.append(f"Assistant: {event.content or ''}")
    return lines


def chunk(lines: Sequence[str], max_chars: int) -> list[list[str]]:
    """Consecutive groups of lines of at most `max_chars` each (a longer line is cut to fit)."""
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for line in lines:
        line = line[:max_chars]
        if current and size + len(line) + 1 > max_chars:
            chunks.append(current)
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append(current)
    return chunks


async def summarize(llm: LLM, events: Sequence[StoredEvent], settings: Settings, *, earlier: str | None = None) -> str:
    """A summary of the conversation in `events`, after what `earlier` (its context summary) covers; raises
    LLMError when the model fails."""
    lines = transcript_lines(events)
    if earlier:
        lines.insert(0, f"(Summary of the conversation before the messages below: {earlier})")
    if not lines:
        return "No messages were exchanged in this session."
    if llm.model == OFFLINE_MODEL:
        return offline_summary(lines)
    instruction = settings.summary_prompt.format(max_words=settings.summary_max_words)
    # Room for the words asked for, with slack: a word is about two tokens in most languages.
    max_tokens = settings.summary_max_words * 3
    parts = chunk(lines, settings.summary_chunk_chars)
    partials = [await _ask(llm, instruction, "\n".join(part), max_tokens) for part in parts]
    if len(partials) == 1:
        return partials[0]
    # Each part's summary is short, so the combined request fits even for very long sessions.
    return await _ask(llm, f"{_COMBINE} {instruction}", "\n\n".join(partials), max_tokens)


async def _ask(llm: LLM, instruction: str, text: str, max_tokens: int) -> str:
    messages: list[ChatMessage] = [
        {"role": "system", "content": instruction},
        {"role": "user", "content": text},
    ]
    return (await traced_complete(llm, messages, max_tokens, StreamStats())).strip()


async def traced_complete(llm: LLM, messages: list[ChatMessage], max_tokens: int, stats: StreamStats) -> str:
    """`llm.complete`, in a GenAI `chat` span when tracing is on."""
    with telemetry.span(f"chat {llm.model}", kind="CLIENT", attributes=telemetry.chat_attributes(llm.model)) as span:
        telemetry.chat_request(messages)
        try:
            text = await llm.complete(messages, max_tokens=max_tokens, stats=stats)
        except LLMError as e:
            telemetry.chat_finished(span, stats, error_type=e.code)
            raise
        telemetry.chat_finished(span, stats, output=text)
        return text


def offline_summary(lines: Sequence[str]) -> str:
    """What the offline demo model can honestly say about a conversation: its shape, and where it started and ended."""
    users = [line.removeprefix("User: ") for line in lines if line.startswith("User: ")]
    answers = sum(line.startswith("Assistant: ") for line in lines)

    def quote(text: str) -> str:
        text = " ".join(text.split())
        return f'"{text[:80]}…"' if len(text) > 80 else f'"{text}"'

    summary = f"Offline demo summary: {len(users)} user message(s) and {answers} answer(s)"
    summary += " after its context summary." if lines and lines[0].startswith("(Summary") else "."
    if users:
        summary += f" It began with {quote(users[0])}"
        summary += f" and ended with {quote(users[-1])}." if len(users) > 1 else "."
    return summary
