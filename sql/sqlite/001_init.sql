-- 001_init: sessions and their ordered events, in SQLite's dialect (the same schema as ../001_init.sql).
--
-- Timestamps are ISO-8601 text in UTC with microseconds ("2024-05-01T12:00:00.000000+00:00"), one
-- fixed format so that text order is time order. metadata is JSON text. NULLs in the unique
-- constraints stay distinct, so rows without a client_msg_id or event_key never conflict.

create table if not exists sessions (
    session_id text primary key,
    start_time text,
    end_time text,
    summary text,
    owner_id text
);

create table if not exists session_events (
    id integer primary key autoincrement,
    session_id text references sessions(session_id),
    event_type text,
    content text,
    -- strftime's %f has milliseconds only: pad to the microseconds the service writes.
    created_at text default (strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now')),
    metadata text not null default '{}',
    client_msg_id text,
    event_key text,
    constraint session_events_session_id_client_msg_id_key unique (session_id, client_msg_id),
    constraint session_events_session_id_event_key_key unique (session_id, event_key)
);

create index if not exists session_events_session_id_id_idx on session_events (session_id, id);
create index if not exists sessions_start_time_idx on sessions (start_time desc);
