-- Protocol 1.1, context compaction: every connect reads a session's last `context_summary` event. This index
-- finds it without walking the session's messages (which the general (session_id, id) index would).
create index if not exists session_events_context_summary_idx
    on session_events (session_id, id) where event_type = 'context_summary';
