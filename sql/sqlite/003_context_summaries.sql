-- See sql/005_context_summaries.sql: the last context summary of a session, found without a walk.
create index if not exists session_events_context_summary_idx
    on session_events (session_id, id) where event_type = 'context_summary';
