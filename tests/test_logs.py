"""Log lines: one per event with its fields, readable text by default and JSON with LOG_FORMAT=json, one time format."""

from __future__ import annotations

import logging
import re

import orjson

from core.logs import JSONFormatter, TextFormatter


def _record(message: str, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("server.ws", logging.INFO, __file__, 1, message, None, None)
    record.fields = fields
    return record


def test_json_lines_carry_the_event_and_its_fields():
    line = JSONFormatter().format(_record("connected", session_id="s1", resumed=False, history=3))
    entry = orjson.loads(line)
    assert entry["event"] == "connected"
    assert entry["level"] == "info"
    assert (entry["session_id"], entry["resumed"], entry["history"]) == ("s1", False, 3)
    assert "\n" not in line


def test_text_lines_are_key_value_pairs():
    line = TextFormatter().format(_record("answer done", session_id="s1", status="completed", error=None))
    assert line.endswith("INFO server.ws answer done session_id=s1 status=completed error=None")


def test_text_and_json_lines_carry_the_same_timestamp():
    record = _record("connected", session_id="s1")
    text_ts = TextFormatter().format(record).split(" ", 1)[0]
    json_ts = orjson.loads(JSONFormatter().format(record))["ts"]
    assert text_ts == json_ts
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", json_ts)
