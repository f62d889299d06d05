"""Reading a Chat Completions event stream (server-sent events) off the network: text, usage, the end, errors."""

from __future__ import annotations

import orjson

from ..errors import LLMError, LLMUnavailable
from .base import StreamStats
from .failures import stream_error


class SSEDecoder:
    """Turns network reads of a Chat Completions event stream into text, stats, the end marker or an error."""

    __slots__ = ("_data", "_rest", "done", "error")

    def __init__(self) -> None:
        self._rest = b""
        self._data: list[bytes] = []
        self.done = False
        self.error: LLMError | None = None

    def feed(self, data: bytes, stats: StreamStats) -> str:
        """The text of every event completed by `data`, joined: one read, one piece downstream."""
        lines = (self._rest + data if self._rest else data).split(b"\n")
        # The last line is unfinished (or empty): it waits for the next read.
        self._rest = lines.pop()
        pieces: list[str] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    self._dispatch(pieces, stats)
                    if self.done or self.error is not None:
                        break
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # ":" comments are keep-alives; "event:", "id:" and "retry:" carry nothing we use.
        return "".join(pieces)

    def end(self, stats: StreamStats) -> str:
        """The body ended: dispatch a last event that lacked its blank line."""
        return self.feed(b"\n\n", stats) if self._rest or self._data else ""

    def _dispatch(self, pieces: list[str], stats: StreamStats) -> None:
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data.clear()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            event = orjson.loads(payload)
            if not isinstance(event, dict):
                return
            if (error := event.get("error")) is not None:
                self.error = stream_error(error)
                return
            if stats.response_model is None and isinstance(model := event.get("model"), str):
                stats.response_model = model
            if choices := event.get("choices"):
                choice = choices[0]
                if (delta := choice.get("delta")) and isinstance(content := delta.get("content"), str) and content:
                    pieces.append(content)
                if reason := choice.get("finish_reason"):
                    stats.finish_reason = str(reason)
            # Advisory: a server that leaves it out, or sends something odd, must not fail the answer. (Every chunk
            # has `"usage": null` but the last: the truth test first keeps them at their old cost.)
            if (usage := event.get("usage")) and isinstance(usage, dict):
                stats.prompt_tokens = usage.get("prompt_tokens")
                stats.completion_tokens = usage.get("completion_tokens")
        except (orjson.JSONDecodeError, AttributeError, IndexError, KeyError, TypeError):
            self.error = LLMUnavailable("the model provider sent an unreadable stream", retryable=True)
