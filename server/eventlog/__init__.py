"""The event log: every session's events, written behind the conversation in order, spooled to disk when the
store is away (`EventLog` is the face; `writer` commits, `spool` keeps what the store cannot take)."""

from .log import EventLog
from .writer import EventWriter

__all__ = ["EventLog", "EventWriter"]
