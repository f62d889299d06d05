"""Who sees a session's events on this process: its writing connection and its watchers."""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    """Where frames go (a connection's outbox)."""

    async def send(self, frame: bytes) -> None: ...

    def put(self, frame: bytes) -> None: ...


class Audience:
    """The writer (the newest writing connection) and the watchers of one session.

    `everyone` is a tuple replaced on every change, so a loop that is sending to it keeps the members it
    started with: a connection that joins meanwhile gets its catch-up instead, never a frame twice.
    """

    __slots__ = ("everyone", "watchers", "writer")

    def __init__(self) -> None:
        self.writer: Sink | None = None
        self.watchers: tuple[Sink, ...] = ()
        self.everyone: tuple[Sink, ...] = ()

    def set_writer(self, sink: Sink | None) -> None:
        self.writer = sink
        self._changed()

    def add_watcher(self, sink: Sink) -> None:
        self.watchers = (*self.watchers, sink)
        self._changed()

    def remove(self, sink: Sink) -> None:
        if self.writer is sink:
            self.writer = None
        self.watchers = tuple(w for w in self.watchers if w is not sink)
        self._changed()

    async def send(self, frame: bytes) -> None:
        for sink in self.everyone:
            await sink.send(frame)

    def put(self, frame: bytes) -> None:
        for sink in self.everyone:
            sink.put(frame)

    def put_watchers(self, frame: bytes) -> None:
        for sink in self.watchers:
            sink.put(frame)

    def _changed(self) -> None:
        self.everyone = self.watchers if self.writer is None else (self.writer, *self.watchers)
