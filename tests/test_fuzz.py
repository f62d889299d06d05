"""Fuzzing /ws/session/{id}: thousands of random and malformed frames, each answered as docs/protocol.md says."""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiohttp import WSMsgType

from tests.conftest import eventually, receive, receive_until
from tests.fakes import openai_server as fake

# FUZZ_SEED=<n> replays another run; the seed is printed, and named in every failure.
SEED = int(os.environ.get("FUZZ_SEED", "20241125"))
FRAMES = 3000

# The protocol's limits (docs/protocol.md), and a small hard frame limit for the fuzzed server, so that the
# 1009 case is cheap; every frame sent on a socket that must stay open is under it.
MAX_MESSAGE_BYTES = 16 * 1024
MAX_CLIENT_MSG_ID = 128
MAX_FRAME_BYTES = 64 * 1024
NO_LIMITS = {"messages_per_minute": 1_000_000, "max_pending_messages": 1_000_000, "max_turns_per_session": 1_000_000}
# A short context keeps each model request small (the fuzz is about frames, not about context).
SHORT_CONTEXT = {"context_max_chars": 500}

WORD_CHARS = (
    string.ascii_letters
    + string.digits
    + "àéîõüßçñæøå"
    + "ДЖЯжя"
    + "αβγΩ"
    + "中文字漢語"
    + "ひらがなカタカナ"
    + "한국어"
    + "عربية"
    + "עברית"
    + "हिन्दी"
)
EXOTIC = [
    *string.punctuation,
    "😀",
    "👩\u200d👩\u200d👧",
    "🇫🇷",
    "e\u0301",
    "\u200b",
    "\u202e",
    "\u2066",
    "\ufeff",
    "\ufffd",
    "\ufffe",
    "\uffff",
    "\ue000",
    "\U000f0000",
    "\U0010ffff",
    "\u2028",
    "\u2029",
]
# Every control character but NUL, which has a rule of its own.
CONTROLS = [chr(c) for c in range(1, 0x20)] + [chr(c) for c in range(0x7F, 0xA0)]
# White space to Unicode and to the server alike (U+001C..U+001F are left out: only Python calls them space).
BLANKS = (
    " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
JSON_SPACE = ["", "", " ", "\n", "\t", "\r\n ", "  "]
INVALID_UTF8 = [
    b"\xff",
    b"\xc3\x28",
    b"\xc0\xaf",  # an overlong "/"
    b"\xed\xa0\x80",  # a UTF-16 surrogate, encoded
    b"\xe2\x82",  # cut short
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b'{"type": "message", "text": "caf\xe9"}',  # Latin-1
    b"hello \x80 world",
]


# What the protocol promises for one frame.


@dataclass(frozen=True)
class Answered:
    """An accepted user message: acknowledged as stored, then answered in its turn."""

    text: str
    client_msg_id: str | None = None


@dataclass(frozen=True)
class Acked:
    """A retry of an accepted client_msg_id: acknowledged again, never stored or answered twice."""

    client_msg_id: str


@dataclass(frozen=True)
class Refused:
    """An `error` event with this code; the socket stays open."""

    code: str


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Silent:
    """A cancel: nothing of its own comes back (it may cut the answer streaming now short)."""


Outcome = Answered | Acked | Refused | Pong | Silent


@dataclass(frozen=True)
class Frame:
    kind: str
    data: str | bytes
    outcome: Outcome

    def __str__(self) -> str:
        if len(self.data) <= 80:
            return f"{self.kind} frame {self.data!r}"
        return f"{self.kind} frame {self.data[:60]!r}... ({len(self.data)} long)"


@dataclass
class Limits:
    """The per-connection limits as the protocol states them: a message is refused as `rate_limited` past
    `per_minute` messages (no time passes during a burst), else as `busy` while `pending` are waiting."""

    per_minute: int
    pending: int
    used: int = 0
    waiting: int = 0

    def admit(self) -> str | None:
        self.used += 1
        if self.used > self.per_minute:
            return "rate_limited"
        if self.waiting >= self.pending:
            return "busy"
        self.waiting += 1
        return None


class Fuzzer:
    """Makes frames at random, each with the outcome the protocol promises for it; each breaks at most one rule."""

    def __init__(self, rng: random.Random, *, limits: Limits | None = None) -> None:
        self.rng = rng
        self.limits = limits
        self.client_msg_ids: list[str] = []
        self.messages = 0
        self._ids = 0
        self.kinds: list[tuple[Any, int]] = [
            (self.plain_text, 12),
            (self.json_value, 3),
            (self.message, 12),
            (self.retry, 3),
            (self.ping, 4),
            (self.cancel, 1),
            (self.unknown_type, 4),
            (self.mistyped_type, 4),
            (self.mistyped_text, 3),
            (self.mistyped_client_msg_id, 3),
            (self.long_client_msg_id, 2),
            (self.blank, 3),
            (self.nul, 2),
            (self.too_long, 2),
            (self.at_the_limit, 1),
            (self.binary, 3),
            (self.broken_json, 3),
            (self.beyond_the_parser, 2),
            (self.nested, 2),
            (self.control_characters, 3),
        ]

    def frames(self, n: int) -> list[Frame]:
        return [self.frame() for _ in range(n)]

    def frame(self, *, only: list[Any] | None = None) -> Frame:
        makers = [(make, weight) for make, weight in self.kinds if only is None or make in only]
        make = self.rng.choices([m for m, _ in makers], weights=[w for _, w in makers])[0]
        frame: Frame = make()
        size = len(frame.data if isinstance(frame.data, bytes) else frame.data.encode())
        assert size <= MAX_FRAME_BYTES, f"{frame}: {size} bytes would close the socket"
        return frame

    # Random material.

    def word(self) -> str:
        rng = self.rng
        chars = [rng.choice(WORD_CHARS) for _ in range(rng.randint(1, 10))]
        if rng.random() < 0.2:
            chars.insert(rng.randint(1, len(chars)), rng.choice(EXOTIC))
        return "".join(chars)

    def text(self, *, words: int | None = None) -> str:
        """Non-blank, without NUL, never read as JSON (it starts with a word, maybe after white space)."""
        rng = self.rng
        if words is None:
            words = rng.choice([1, 2, 3, 5, 8, 13, rng.randint(1, 60), rng.randint(1, 300)])
        gaps = [" " if rng.random() < 0.8 else rng.choice(BLANKS) for _ in range(words)]
        lead = rng.choice(["", "", "", " ", "\n", rng.choice(BLANKS)])
        return lead + "".join(self.word() + gap for gap in gaps[:-1]) + self.word()

    def client_msg_id(self, length: int | None = None) -> str:
        """A new id, never used before in the session; no NUL (see the xfail test at the end)."""
        rng = self.rng
        self._ids += 1
        prefix = f"{self._ids}-"
        if length is None:
            length = rng.choice([len(prefix) + 1, rng.randint(len(prefix) + 1, 40), MAX_CLIENT_MSG_ID])
        alphabet = rng.choice([string.ascii_letters + string.digits + "-_:.", WORD_CHARS, "".join(EXOTIC + CONTROLS)])
        return prefix + "".join(rng.choice(alphabet) for _ in range(length - len(prefix)))

    def odd_value(self, depth: int = 0) -> Any:
        """Any JSON value but a string, huge numbers included."""
        rng = self.rng
        choices: list[Any] = [
            0,
            -1,
            1.5,
            -0.0,
            10**30,
            -(10**40),
            2**64,
            1e308,
            -1e308,
            5e-324,
            True,
            False,
            None,
        ]
        if depth < 3:
            choices += [
                [self.odd_value(depth + 1) for _ in range(rng.randint(0, 3))],
                {self.word(): self.any_value(depth + 1) for _ in range(rng.randint(0, 3))},
            ]
        return rng.choice(choices)

    def any_value(self, depth: int = 0) -> Any:
        return self.text(words=self.rng.randint(1, 4)) if self.rng.random() < 0.4 else self.odd_value(depth)

    def extras(self, obj: dict[str, Any], *, reserved: tuple[str, ...]) -> dict[str, Any]:
        """`obj` with some unknown fields added, which the server ignores."""
        for _ in range(self.rng.choice([0, 0, 0, 1, 2, 5])):
            key = self.word()
            if key not in reserved:
                obj[key] = self.any_value()
        return obj

    def encode(self, obj: dict[str, Any], *, compact: bool = False) -> str:
        """`obj` as JSON text, written any of the ways JSON allows (`compact`: the shortest, for big frames)."""
        rng = self.rng
        items = list(obj.items())
        rng.shuffle(items)
        obj = dict(items)
        style = 0 if compact else rng.randrange(4)
        if style == 0:
            text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        elif style == 1:
            text = json.dumps(obj)
        elif style == 2:
            indent = rng.choice(["\t", " ", "    "])
            text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=indent)
        else:
            text = json.dumps(obj, ensure_ascii=False)
        if rng.random() < 0.1:
            text = text.replace('"type"', '"\\u0074ype"', 1)
        return rng.choice(JSON_SPACE) + text + rng.choice(JSON_SPACE)

    # Outcomes.

    def accepted(self, text: str, client_msg_id: str | None = None) -> Outcome:
        self.messages += 1
        if self.limits is not None and (code := self.limits.admit()) is not None:
            return Refused(code)
        if client_msg_id is not None:
            self.client_msg_ids.append(client_msg_id)
        return Answered(text, client_msg_id)

    def as_message(self, kind: str, text: str) -> Frame:
        """A frame of plain text, or the same text in a JSON message, maybe with a new client_msg_id."""
        rng = self.rng
        if rng.random() < 0.5:
            return Frame(kind, text, self.accepted(text))
        client_msg_id = self.client_msg_id() if rng.random() < 0.5 else None
        obj = {"type": "message", "text": text, **({} if client_msg_id is None else {"client_msg_id": client_msg_id})}
        obj = self.extras(obj, reserved=("type", "text", "client_msg_id"))
        return Frame(kind + " in JSON", self.encode(obj), self.accepted(text, client_msg_id))

    def refused(self, kind: str, code: str, text: str) -> Frame:
        """`text` breaking a rule, as plain text or in a JSON message."""
        if self.rng.random() < 0.5:
            return Frame(kind, text, Refused(code))
        obj = self.extras({"type": "message", "text": text}, reserved=("type", "text", "client_msg_id"))
        return Frame(kind + " in JSON", self.encode(obj), Refused(code))

    # The kinds of frame.

    def plain_text(self) -> Frame:
        text = self.text()
        return Frame("plain text", text, self.accepted(text))

    def json_value(self) -> Frame:
        """JSON that is not an object is a message, verbatim."""
        rng = self.rng
        value = rng.choice([self.text(words=3), [self.any_value() for _ in range(3)], 42, -0.0, 10**30, True, None])
        text = rng.choice(JSON_SPACE) + json.dumps(value, ensure_ascii=rng.random() < 0.5)
        text = rng.choice([text, '[{"type": "ping"}]', "1e400", '"{\\"type\\": \\"ping\\"}"'])
        return Frame("JSON but not an object", text, self.accepted(text))

    def message(self) -> Frame:
        return self.as_message("message", self.text())

    def retry(self) -> Frame:
        if not self.client_msg_ids:
            return self.message()
        client_msg_id = self.rng.choice(self.client_msg_ids)
        obj = {"type": "message", "text": self.text(), "client_msg_id": client_msg_id}
        return Frame("retry", self.encode(obj), Acked(client_msg_id))

    def ping(self) -> Frame:
        return Frame("ping", self.encode(self.extras({"type": "ping"}, reserved=("type",))), Pong())

    def cancel(self) -> Frame:
        return Frame("cancel", self.encode(self.extras({"type": "cancel"}, reserved=("type",))), Silent())

    def unknown_type(self) -> Frame:
        rng = self.rng
        kind = rng.choice(
            [
                "Message",
                "PING",
                "ping ",
                " cancel",
                "",
                "ping\x00",
                "response.done",
                "error",
                "pong",
                self.word(),
                self.text(),
                "t" * rng.randint(100, 20_000),
            ]
        )
        if kind in ("message", "cancel", "ping"):
            kind += "!"
        obj = self.extras({"type": kind, "text": self.text()}, reserved=("type",))
        return Frame("unknown type", self.encode(obj), Refused("unknown_type"))

    def mistyped_type(self) -> Frame:
        obj = {"type": self.odd_value()} if self.rng.random() < 0.7 else {}
        obj = self.extras(obj, reserved=("type",))
        if self.rng.random() < 0.3:
            obj[self.rng.choice(["Type", "TYPE", "kind", "text"])] = "message"
        return Frame("type missing or not a string", self.encode(obj), Refused("invalid_message"))

    def mistyped_text(self) -> Frame:
        obj: dict[str, Any] = {"type": "message"}
        if self.rng.random() < 0.7:
            obj["text"] = self.odd_value()
        if self.rng.random() < 0.3:
            obj["client_msg_id"] = self.client_msg_id()
        obj = self.extras(obj, reserved=("type", "text", "client_msg_id"))
        return Frame("text missing or not a string", self.encode(obj), Refused("invalid_message"))

    def mistyped_client_msg_id(self) -> Frame:
        # null is left out: the protocol does not say whether it counts as absent.
        value = self.rng.choice([self.odd_value(), ""])
        while value is None:
            value = self.odd_value()
        obj = {"type": "message", "text": self.text(), "client_msg_id": value}
        return Frame("client_msg_id not a string, or empty", self.encode(obj), Refused("invalid_message"))

    def long_client_msg_id(self) -> Frame:
        """At most 128 characters (of any width), not bytes."""
        rng = self.rng
        if rng.random() < 0.3:
            client_msg_id = self.client_msg_id(MAX_CLIENT_MSG_ID)
            text = self.text()
            obj = {"type": "message", "text": text, "client_msg_id": client_msg_id}
            return Frame("client_msg_id of 128 characters", self.encode(obj), self.accepted(text, client_msg_id))
        length = rng.choice(
            [MAX_CLIENT_MSG_ID + 1, rng.randint(MAX_CLIENT_MSG_ID + 1, 1000), rng.randint(1000, 10_000)]
        )
        obj = {"type": "message", "text": self.text(), "client_msg_id": rng.choice(["i", "é", "😀"]) * length}
        return Frame("client_msg_id too long", self.encode(obj, compact=True), Refused("invalid_message"))

    def blank(self) -> Frame:
        text = "".join(self.rng.choice(BLANKS) for _ in range(self.rng.choice([0, 1, 2, 10, 500])))
        return self.refused("blank text", "invalid_message", text)

    def nul(self) -> Frame:
        text = self.rng.choice([self.text(), '{"type": "ping"}', "\x00"])
        at = self.rng.randint(0, len(text))
        return self.refused("text with NUL", "invalid_message", text[:at] + "\x00" + text[at:])

    def too_long(self) -> Frame:
        """Over 16 KiB of UTF-8, however few characters that is."""
        rng = self.rng
        unit = rng.choice(["x", "é", "€", "😀", "ab c ", "中文 ", self.text(words=5) + " "])
        size = rng.choice([MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 3, rng.randint(MAX_MESSAGE_BYTES + 1, 30_000)])
        text = unit * -(-size // len(unit.encode()))
        if rng.random() < 0.2:
            text = "{" + text  # text that only looks like JSON is a message, and this one is too long
        kind = f"{len(text.encode())} bytes in {len(text)} characters"
        if rng.random() < 0.5:
            return Frame(kind, text, Refused("message_too_long"))
        obj = {"type": "message", "text": text, "client_msg_id": self.client_msg_id()}
        return Frame(kind + " in JSON", self.encode(obj, compact=True), Refused("message_too_long"))

    def at_the_limit(self) -> Frame:
        """Exactly 16 KiB of UTF-8 is allowed."""
        rng = self.rng
        parts = [self.text(words=rng.randint(1, 200))]
        room = MAX_MESSAGE_BYTES - len(parts[0].encode())
        while room:
            part = rng.choice([c for c in ("é", "€", "😀", " ", "x", "中") if len(c.encode()) <= room])
            parts.append(part)
            room -= len(part.encode())
        text = "".join(parts)
        assert len(text.encode()) == MAX_MESSAGE_BYTES
        return self.as_message("exactly 16 KiB", text)

    def binary(self) -> Frame:
        rng = self.rng
        data = rng.choice(
            [
                rng.randbytes(rng.randint(0, 64)),
                rng.randbytes(rng.randint(64, 4000)),
                rng.randbytes(rng.randint(4000, MAX_FRAME_BYTES)),
                b'{"type": "ping"}',
                orjson.dumps({"type": "message", "text": self.text()}),
                self.text().encode(),
                b"",
            ]
        )
        return Frame("binary", data, Refused("unsupported_frame"))

    def broken_json(self) -> Frame:
        """Text that opens like a JSON object but is not valid JSON is a message, verbatim."""
        rng = self.rng
        whole = json.dumps({"type": "message", "text": self.text(words=3)})
        text = rng.choice(
            [
                "{",
                "{oops",
                "{}}",
                '{"type": "ping"',
                '{"type": "ping"}}',
                "{'type': 'ping'}",
                '{"type": "ping",}',
                '{"type": ping}',
                '{type: "ping"}',
                '{"type": "ping"} trailing',
                '{"type": "ping"}{"type": "ping"}',
                '{"type": "message", "text": "raw \x01 control"}',
                '{"type": "message", "text": "tab\tinside"}',
                '{"type": "message", "text": "bad \\x41 escape"}',
                '{"type": "ping", "n": NaN}',
                '{"type": "ping", "n": Infinity}',
                '{"type": "ping", "n": 01}',
                '{"type": "ping", "n": .5}',
                '{"type": "ping", "n": +1}',
                '{"type": "ping"}\x0b',
                '\x1c{"type": "ping"}',
                '{"type": "ping"}\u3000',
                "{" + self.text(),
                whole[: rng.randint(1, len(whole) - 1)],
            ]
        )
        return Frame("broken JSON", text, self.accepted(text))

    def beyond_the_parser(self) -> Frame:
        """JSON the server cannot read as an object (nesting deeper than its parser allows, a number beyond a
        double, a lone surrogate) is text that is not a JSON object to it: a message, verbatim, or too long."""
        rng = self.rng
        # Up to 10,000 levels, as long as the frame stays under the hard limit.
        depth, shallower = rng.randint(2000, 10_000), rng.randint(2000, 8000)
        text = rng.choice(
            [
                '{"type": "ping", "deep": ' + "[" * depth + "]" * depth + "}",
                '{"type": "message", "text": "deep", "x": ' + '{"a":' * shallower + "1" + "}" * shallower + "}",
                "[" * depth + "]" * depth,
                '{"a":' * shallower + "null" + "}" * shallower,
                '{"type": "ping", "n": 1e400}',
                '{"type": "ping", "n": -2e308}',
                '{"type": "ping", "n": 1' + "0" * rng.randint(309, 5000) + "}",
                '{"type": "message", "text": "\\ud800"}',
                '{"type": "ping", "x": "\\udc00\\ud800"}',
            ]
        )
        if len(text.encode()) > MAX_MESSAGE_BYTES:
            return Frame("beyond the parser, too long", text, Refused("message_too_long"))
        return Frame("beyond the parser", text, self.accepted(text))

    def nested(self) -> Frame:
        """Nesting within reason is just JSON."""
        value: Any = self.any_value()
        for _ in range(self.rng.randint(1, 200)):
            value = [value] if self.rng.random() < 0.5 else {"k": value}
        if self.rng.random() < 0.5:
            return Frame("nested ping", self.encode({"type": "ping", "nested": value}, compact=True), Pong())
        text = self.text()
        client_msg_id = self.client_msg_id()
        obj = {"type": "message", "text": text, "client_msg_id": client_msg_id, "nested": value}
        return Frame("nested message", self.encode(obj, compact=True), self.accepted(text, client_msg_id))

    def control_characters(self) -> Frame:
        rng = self.rng
        words = [self.word() if rng.random() < 0.5 else rng.choice(CONTROLS) for _ in range(rng.randint(1, 30))]
        text = self.word() + "".join(words)
        if rng.random() < 0.3:
            text = rng.choice(CONTROLS) + text
        return self.as_message("control characters", text)


# Sending and reading.


async def connect(client: Any, session_id: str) -> Any:
    ws = await client.ws_connect(f"/ws/session/{session_id}")
    assert (await receive(ws))["type"] == "session.ready"
    return ws


async def send(ws: Any, frame: Frame) -> None:
    if isinstance(frame.data, bytes):
        await ws.send_bytes(frame.data)
    else:
        await ws.send_str(frame.data)


def expected_counts(frames: list[Frame]) -> Counter[str]:
    """How many of each event the frames are owed."""
    counts: Counter[str] = Counter()
    for frame in frames:
        match frame.outcome:
            case Answered():
                counts.update(["response.done", "stored user", "stored assistant"])
            case Acked():
                counts["stored user"] += 1
            case Refused() | Pong():
                counts["reply"] += 1
    return counts


def counted_as(event: dict[str, Any]) -> str:
    if event["type"] == "message.stored":
        return f"stored {event['role']}"
    return "reply" if event["type"] in ("error", "pong") else event["type"]


async def exchange(ws: Any, frames: list[Frame], *, hold_first: bool = False) -> list[dict[str, Any]]:
    """Send the frames while reading what comes back; return every event once all the frames are answered.

    With `hold_first`, the first frame's answer is streaming before the rest are sent.
    """
    owed = expected_counts(frames)
    counts: Counter[str] = Counter()
    events: list[dict[str, Any]] = []
    streaming = asyncio.Event()

    async def read() -> None:
        while any(counts[k] < n for k, n in owed.items()):
            event = await receive(ws, timeout=10)
            events.append(event)
            counts[counted_as(event)] += 1
            if event["type"] == "response.delta":
                streaming.set()

    async def write() -> None:
        for i, frame in enumerate(frames):
            await send(ws, frame)
            if i == 0 and hold_first:
                await streaming.wait()

    async with asyncio.timeout(90), asyncio.TaskGroup() as tasks:
        tasks.create_task(read())
        tasks.create_task(write())
    # Nothing else is on its way: the next event is the answer to one more ping.
    await ws.send_str('{"type": "ping"}')
    assert await receive(ws) == {"type": "pong"}
    return events


@dataclass
class Answer:
    response_id: str
    client_msg_id: str | None
    deltas: list[str] = field(default_factory=list)
    done: dict[str, Any] = field(default_factory=dict)


def answers_in(events: list[dict[str, Any]]) -> list[Answer]:
    """The answers, checking that each one's events arrive in order and that one ends before the next starts."""
    answers: list[Answer] = []
    current: Answer | None = None
    for event in events:
        if event["type"] == "response.started":
            assert current is None, f"{event} began before {current} ended"
            current = Answer(event["response_id"], event["client_msg_id"])
            answers.append(current)
        elif event["type"] in ("response.delta", "response.done"):
            assert current is not None and event["response_id"] == current.response_id, event
            if event["type"] == "response.delta":
                current.deltas.append(event["delta"])
            else:
                current.done = event
                current = None
    assert current is None, f"{current} never ended"
    return answers


def check_exchange(frames: list[Frame], events: list[dict[str, Any]]) -> list[Answer]:
    """Every frame got exactly what the protocol promises for it; returns the answers, in order."""
    known = {"error", "pong", "response.started", "response.delta", "response.done", "message.stored"}
    assert [e for e in events if e["type"] not in known] == []

    # Errors and pongs are sent as each frame is read: in the order of the frames, whatever else is streaming.
    owed = [(i, f) for i, f in enumerate(frames) if isinstance(f.outcome, Refused | Pong)]
    replies = [Pong() if e["type"] == "pong" else Refused(e["code"]) for e in events if e["type"] in ("error", "pong")]
    for (i, frame), reply in zip(owed, replies, strict=False):
        assert reply == frame.outcome, f"seed {SEED}: frame {i}, a {frame}, got {reply}"
    assert len(replies) == len(owed), f"seed {SEED}"
    assert all(isinstance(e["message"], str) and e["message"] for e in events if e["type"] == "error")

    # Accepted messages are answered one at a time, in the order they arrived.
    accepted = [(i, f) for i, f in enumerate(frames) if isinstance(f.outcome, Answered)]
    answers = answers_in(events)
    assert len(answers) == len(accepted), f"seed {SEED}"
    cut_short = 0
    for (i, frame), answer in zip(accepted, answers, strict=True):
        assert isinstance(frame.outcome, Answered)
        where = f"seed {SEED}: frame {i}, a {frame}"
        assert answer.client_msg_id == frame.outcome.client_msg_id, where
        assert answer.done["text"] == "".join(answer.deltas), where
        assert answer.done["error"] is None, where
        full = "You said: " + frame.outcome.text
        if answer.done["status"] == "cancelled":
            cut_short += 1
            assert full.startswith(answer.done["text"]), where
        else:
            assert (answer.done["status"], answer.done["text"]) == ("completed", full), where
    assert cut_short <= sum(isinstance(f.outcome, Silent) for f in frames)

    # One acknowledgement per accepted message and per retry, one per answer.
    acked = [e["client_msg_id"] for e in events if e["type"] == "message.stored" and e["role"] == "user"]
    owed_acks = [f.outcome.client_msg_id for f in frames if isinstance(f.outcome, Answered | Acked)]
    assert Counter(acked) == Counter(owed_acks), f"seed {SEED}"
    answered = [e["response_id"] for e in events if e["type"] == "message.stored" and e["role"] == "assistant"]
    assert sorted(answered) == sorted(a.response_id for a in answers)
    return answers


async def rows(db: asyncpg.Connection, session_id: str) -> list[Any]:
    return await db.fetch(
        "select id, event_type, content, client_msg_id, metadata from session_events where session_id = $1 order by id",
        session_id,
    )


async def check_stored(
    db: asyncpg.Connection, session_id: str, frames: list[Frame], events: list[dict[str, Any]]
) -> None:
    """The database holds the accepted messages, each once and in order, and the answers as they ended."""
    stored = await rows(db, session_id)
    users = [r for r in stored if r["event_type"] == "user_message"]
    accepted = [f.outcome for f in frames if isinstance(f.outcome, Answered)]
    assert [(r["content"], r["client_msg_id"]) for r in users] == [(m.text, m.client_msg_id) for m in accepted]
    answers = [r for r in stored if r["event_type"] == "ai_message"]
    assert [(r["content"], orjson.loads(r["metadata"])["response_id"]) for r in answers] == [
        (a.done["text"], a.response_id) for a in answers_in(events)
    ]
    # Every acknowledgement names the row it stands for; retries name the first one.
    by_id = {r["id"]: r for r in users}
    acks = [e for e in events if e["type"] == "message.stored" and e["role"] == "user"]
    assert {a["id"] for a in acks} == set(by_id)
    assert all(by_id[a["id"]]["client_msg_id"] == a["client_msg_id"] for a in acks)


# The well-behaved neighbour and the sockets that break the rules of WebSocket itself.


async def chat_calmly(client: Any, until: asyncio.Event) -> list[str]:
    """A session that chats at a human pace until `until` is set (at least five turns); returns what it asked."""
    ws = await connect(client, "calm")
    asked: list[str] = []
    while len(asked) < 5 or not until.is_set():
        await asyncio.sleep(0.1)
        text = f"calm question {len(asked) + 1}"
        asked.append(text)
        await ws.send_str(
            orjson.dumps({"type": "message", "text": text, "client_msg_id": f"calm-{len(asked)}"}).decode()
        )
        events = await receive_until(ws, "response.done")
        while sum(e["type"] == "message.stored" for e in events) < 2:
            events.append(await receive(ws))
        [started, *deltas, done] = [e for e in events if e["type"].startswith("response.")]
        assert started["client_msg_id"] == f"calm-{len(asked)}"
        assert done["status"] == "completed"
        assert done["text"] == "".join(d["delta"] for d in deltas) == f"You said: {text}"
        stored = {e["role"]: e for e in events if e["type"] == "message.stored"}
        assert stored["user"]["client_msg_id"] == f"calm-{len(asked)}"
        assert stored["assistant"]["response_id"] == done["response_id"]
        assert len(events) == len(deltas) + 4, events
    await ws.close()
    return asked


async def break_the_websocket_rules(client: Any) -> list[tuple[str, int | None]]:
    """Invalid UTF-8 in a text frame (1007) and frames over the hard limit (1009), each on a socket of its own."""
    closes = []
    attempts: list[tuple[str, bytes, WSMsgType]] = [
        (f"bad-utf8-{i}", b, WSMsgType.TEXT) for i, b in enumerate(INVALID_UTF8)
    ]
    attempts += [
        ("too-big-text", b"x" * (MAX_FRAME_BYTES + 1), WSMsgType.TEXT),
        ("too-big-binary", bytes(MAX_FRAME_BYTES + 1), WSMsgType.BINARY),
        ("too-big-json", b'{"type": "ping"}' + b" " * MAX_FRAME_BYTES, WSMsgType.TEXT),
    ]
    for session_id, data, kind in attempts:
        ws = await connect(client, session_id)
        await ws.send_frame(data, kind)
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE, (session_id, msg)
        closes.append((session_id, msg.data))
        await ws.close()
    return closes


# The stories.


async def test_thousands_of_random_and_malformed_frames_each_get_their_documented_answer(make_client, db, fake_llm):
    print(f"fuzz seed {SEED} (FUZZ_SEED to change it)")
    rng = random.Random(SEED)
    client = await make_client(**NO_LIMITS, **SHORT_CONTEXT, max_frame_bytes=MAX_FRAME_BYTES)
    frames = Fuzzer(rng).frames(FRAMES)

    fuzzed = await connect(client, "fuzzed")
    fuzz_done = asyncio.Event()
    calm = asyncio.create_task(chat_calmly(client, fuzz_done))
    breakers = asyncio.create_task(break_the_websocket_rules(client))
    try:
        events = await exchange(fuzzed, frames)
    finally:
        fuzz_done.set()
    asked = await calm
    closes = await breakers

    answers = check_exchange(frames, events)
    assert closes == [(f"bad-utf8-{i}", 1007) for i in range(len(INVALID_UTF8))] + [
        ("too-big-text", 1009),
        ("too-big-binary", 1009),
        ("too-big-json", 1009),
    ]

    # The server still serves: a newcomer is answered, and the health check is fine.
    await fuzzed.close()
    newcomer = await connect(client, "newcomer")
    await newcomer.send_str("hello")
    assert (await receive_until(newcomer, "response.done"))[-1]["text"] == "You said: hello"
    await newcomer.close()
    assert (await client.get("/healthz")).status == 200

    # The database holds exactly the accepted messages, and nothing from the refused frames or the broken sockets.
    await check_stored(db, "fuzzed", frames, events)
    assert [(r["event_type"], r["content"]) for r in await rows(db, "calm") if r["content"] is not None] == [
        pair for text in asked for pair in (("user_message", text), ("ai_message", f"You said: {text}"))
    ]

    async def broken_sessions_ended() -> bool:
        ended = await db.fetch("select session_id from sessions where end_time is not null")
        return {r["session_id"] for r in ended} >= {session_id for session_id, _ in closes}

    await eventually(broken_sessions_ended)
    total = await db.fetchval("select count(*) from session_events where event_type = 'user_message'")
    assert total == len([f for f in frames if isinstance(f.outcome, Answered)]) + len(asked) + 1
    assert len(answers) > FRAMES // 4


async def test_with_the_default_limits_a_burst_is_refused_as_busy_then_rate_limited_and_bad_frames_keep_their_errors(
    client, db, fake_llm, settings
):
    rng = random.Random(SEED + 1)
    fuzzer = Fuzzer(rng, limits=Limits(per_minute=settings.messages_per_minute, pending=settings.max_pending_messages))
    # The first message's answer streams slowly all through the burst, so whatever is accepted waits its turn.
    fake_llm.script(fake.slow(0.05))
    slow = " ".join(["hold on"] * 100)
    frames = [Frame("slow message", slow, fuzzer.accepted(slow))]
    assert fuzzer.limits is not None
    fuzzer.limits.waiting = 0  # being answered, no longer waiting
    messages = [fuzzer.plain_text, fuzzer.message, fuzzer.json_value, fuzzer.broken_json, fuzzer.control_characters]
    others = [fuzzer.ping, fuzzer.retry, fuzzer.unknown_type, fuzzer.mistyped_type, fuzzer.mistyped_text]
    others += [fuzzer.blank, fuzzer.nul, fuzzer.too_long, fuzzer.binary, fuzzer.long_client_msg_id]
    while fuzzer.messages < 1 + 70:
        frames.append(fuzzer.frame(only=rng.choice([messages, others])))
    frames.append(Frame("cancel", '{"type": "cancel"}', Silent()))

    # 8 wait their turn, the rest of the first 60 a minute are busy, and the 11 after them are rate limited; the
    # burst takes milliseconds, far less than the second in which the limit lets one more message through.
    refusals = Counter(f.outcome.code for f in frames if isinstance(f.outcome, Refused))
    assert (refusals["busy"], refusals["rate_limited"]) == (60 - 1 - 8, 71 - 60)

    ws = await connect(client, "burst")
    events = await exchange(ws, frames, hold_first=True)
    answers = check_exchange(frames, events)
    assert [a.done["status"] for a in answers] == ["cancelled"] + ["completed"] * 8
    await ws.close()
    await check_stored(db, "burst", frames, events)


async def test_a_client_msg_id_holding_nul_is_refused_and_nothing_is_stored(client, db, fake_llm):
    # PostgreSQL cannot store NUL: an id that could not be kept as sent could never be recognised as a retry.
    ws = await connect(client, "nul-id")
    await ws.send_str(orjson.dumps({"type": "message", "text": "remember me", "client_msg_id": "id\x00nul"}).decode())
    event = await receive(ws)
    assert (event["type"], event["code"]) == ("error", "invalid_message")
    await ws.send_str('{"type":"ping"}')
    assert await receive(ws) == {"type": "pong"}
    await ws.close()
    assert fake_llm.requests == []
    assert [r for r in await rows(db, "nul-id") if r["event_type"] == "user_message"] == []
