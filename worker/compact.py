"""Writing a session's context summary: the previous one folded together with the messages after it.

Separate from the end-of-session summary: this one is the model's memory of the conversation, so it keeps the
facts (names, numbers, decisions, open questions) rather than telling what happened.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.llm import LLM, ChatMessage, StreamStats
from core.llm.tokens import estimate
from core.settings import OFFLINE_MODEL, Settings
from core.store import StoredEvent

from .summarize import traced_complete, transcript_lines

# Of the context budget: the most the summary may take (the server keeps a quarter for the latest turns verbatim),
# and the most one request of ours may send (the previous summary and a slice of the messages).
SUMMARY_SHARE = 0.2
INPUT_SHARE = 0.6
_OFFLINE_QUOTE = 120
# The first statements of a conversation are where names and goals usually are: the offline summary keeps them.
_OFFLINE_KEEP_FIRST = 3


async def compact(
    llm: LLM, previous: str | None, events: Sequence[StoredEvent], settings: Settings
) -> tuple[str, int | None]:
    """The new context summary and its length in tokens as the provider counted it (None when it did not say).
    A long stretch of messages is folded in slices, each request within the context budget."""
    budget = settings.context_max_tokens
    max_tokens = max(32, int(budget * SUMMARY_SHARE))
    lines = transcript_lines(events)
    if llm.model == OFFLINE_MODEL:
        return offline_compaction(previous, lines, max_tokens=max_tokens), None
    summary, tokens = previous, None
    room = max(1, int(budget * INPUT_SHARE) - (0 if previous is None else estimate(previous)))
    for part in _slices(lines, room):
        summary, tokens = await _fold(llm, settings.context_summary_prompt, summary, part, max_tokens)
    if summary is None:
        return "", 0
    return summary, tokens


async def _fold(
    llm: LLM, instruction: str, previous: str | None, lines: Sequence[str], max_tokens: int
) -> tuple[str, int | None]:
    text = "Previous summary:\n" + (previous or "(none yet)") + "\n\nMessages since:\n" + "\n".join(lines)
    messages: list[ChatMessage] = [{"role": "system", "content": instruction}, {"role": "user", "content": text}]
    stats = StreamStats()
    summary = (await traced_complete(llm, messages, max_tokens, stats)).strip()
    return summary, stats.completion_tokens


def _slices(lines: Sequence[str], room: int) -> list[list[str]]:
    """Consecutive groups of lines of at most `room` estimated tokens each (a longer line goes alone, cut)."""
    slices: list[list[str]] = []
    current: list[str] = []
    size = 0
    for line in lines:
        tokens = estimate(line)
        if tokens > room:
            line = line[: room * 3]
            tokens = estimate(line)
        if current and size + tokens > room:
            slices.append(current)
            current, size = [], 0
        current.append(line)
        size += tokens
    if current:
        slices.append(current)
    return slices


def offline_compaction(previous: str | None, lines: Sequence[str], *, max_tokens: int) -> str:
    """The offline demo model's context summary: deterministic, it quotes what the user said, the first
    statements and then as many of the latest as fit in `max_tokens`."""
    said = [] if previous is None else [line for line in previous.splitlines() if line.startswith("- ")]
    for line in lines:
        if line.startswith("User: "):
            quote = " ".join(line.removeprefix("User: ").split())
            if len(quote) > _OFFLINE_QUOTE:
                quote = quote[: _OFFLINE_QUOTE - 1] + "…"
            said.append(f'- "{quote}"')
    header = "Offline demo context summary. Earlier, the user said:"
    first, rest = said[:_OFFLINE_KEEP_FIRST], said[_OFFLINE_KEEP_FIRST:]
    room = max_tokens - estimate(header) - sum(estimate(s) + 1 for s in first)
    latest: list[str] = []
    for item in reversed(rest):
        room -= estimate(item) + 1
        if room < 0:
            break
        latest.append(item)
    return "\n".join([header, *first, *reversed(latest)])
