"""The SQLite store's read queries, in SQLite's dialect: its counterpart of the PostgreSQL functions in sql/004."""

# SQLite cannot call PostgreSQL functions, so it keeps its own copy of these queries: keep the two in step.
from __future__ import annotations

from . import rows
from .base import MESSAGE_TYPES

EVENT_COLUMNS = ", ".join(rows.EVENT_COLUMNS)
SESSION_COLUMNS = "s.session_id, s.start_time, s.end_time, s.summary, s.owner_id"
MESSAGE_TYPES_SQL = f"({', '.join(repr(t) for t in MESSAGE_TYPES)})"
COUNTS = (
    "(select count(*) from session_events e where e.session_id = s.session_id"
    f" and e.event_type in {MESSAGE_TYPES_SQL}) as message_count, "
    # chat_session_records()' usage columns (sql/006): the sums over the session's answers.
    "(select coalesce(sum(json_extract(e.metadata, '$.prompt_tokens')), 0) from session_events e"
    " where e.session_id = s.session_id and e.event_type = 'ai_message') as prompt_tokens, "
    "(select coalesce(sum(json_extract(e.metadata, '$.completion_tokens')), 0) from session_events e"
    " where e.session_id = s.session_id and e.event_type = 'ai_message') as completion_tokens"
)

# chat_summary_states(): the rule "up to date" as SQLite states it; the two queries after it build on it.
SUMMARY_STATE = f"""
select t.*, (t.last_message_id is null or coalesce(t.summarized_through >= t.last_message_id, 0)) as up_to_date
from (
    select s.session_id, s.start_time, s.end_time, s.summarized_through, s.summary_updated_at,
        m.id as last_message_id, m.created_at as last_message_at
    from sessions s
    left join session_events m on m.id = (
        select max(e.id) from session_events e where e.session_id = s.session_id and e.event_type in {MESSAGE_TYPES_SQL}
    )
) t
"""

NEEDING_SUMMARY = f"""
select * from ({SUMMARY_STATE}) st
where st.last_message_id is not null
  and ((st.end_time is not null and not st.up_to_date) or (st.end_time is null and st.last_message_at < ?))
order by coalesce(st.end_time, st.last_message_at), st.session_id
limit ?
"""

ENDED = f"""
select * from ({SUMMARY_STATE}) st
where st.end_time is not null and (? is null or st.start_time >= ?) and (? is null or st.start_time < ?)
order by st.start_time, st.session_id
limit ?
"""
