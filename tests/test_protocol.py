"""Frame parsing as the protocol defines it, including the awkward inputs a fuzzer would send."""

from __future__ import annotations

import pytest

from core.errors import ProtocolError
from server import protocol
from server.protocol import Cancel, Ping, UserMessage, parse_frame


def parse(text: str) -> object:
    return parse_frame(text, max_message_bytes=16)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello", UserMessage("hello")),
        (" {nope", UserMessage(" {nope")),
        ('["a"]', UserMessage('["a"]')),
        ('{"type":"message","text":"hi","client_msg_id":"c1"}', UserMessage("hi", "c1")),
        ('{"type":"message","text":"hi","extra":1}', UserMessage("hi")),
        ('{"type":"cancel"}', Cancel()),
        ('{"type":"ping"}', Ping()),
    ],
)
def test_frames_parse_to_what_the_protocol_says(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "invalid_message"),
        (" \t\n", "invalid_message"),
        ('{"type":"message","text":""}', "invalid_message"),
        ('{"type":"message","text":null}', "invalid_message"),
        ('{"type":["message"]}', "invalid_message"),
        ('{"type":"message","text":"a","client_msg_id":""}', "invalid_message"),
        ('{"type":"wat"}', "unknown_type"),
        ("x" * 17, "message_too_long"),
        ("é" * 9, "message_too_long"),
        ("a\x00b", "invalid_message"),
    ],
)
def test_bad_frames_get_their_code(text, code):
    with pytest.raises(ProtocolError) as e:
        parse(text)
    assert e.value.code == code


def test_the_size_limit_counts_utf8_bytes_not_characters():
    assert parse("é" * 8) == UserMessage("é" * 8)


def test_deeply_nested_json_is_just_text():
    text = "{" + '"a":{' * 2000
    assert parse_frame(text, max_message_bytes=1 << 20) == UserMessage(text)


def test_session_ids():
    assert protocol.valid_session_id("abc-DEF_1.2:3")
    assert protocol.valid_session_id("x" * 128)
    for bad in ("", "x" * 129, "a b", "a/b", "é", "a\n"):
        assert not protocol.valid_session_id(bad)
