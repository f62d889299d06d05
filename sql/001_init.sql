-- 001_init: sessions and their ordered events.
--
-- Creates the seed's two tables when they are missing, then upgrades them in place: only additions,
-- the seed's columns stay as they are. Safe to run again (every statement is idempotent) and plain
-- SQL, so it also runs unchanged in Supabase's SQL editor.
--
-- Adds: sessions.owner_id (who may read the session), session_events.metadata (extra facts as JSON),
-- session_events.client_msg_id and session_events.event_key (what makes writes idempotent), the
-- indexes the service reads with, and unique constraints on (session_id, client_msg_id) and
-- (session_id, event_key). They are constraints, not partial indexes, because PostgREST's on_conflict
-- cannot name a partial index; NULLs stay distinct, so rows without these ids never conflict.

create table if not exists sessions (
    session_id text primary key,
    start_time timestamptz,
    end_time timestamptz,
    summary text
);

create table if not exists session_events (
    id bigserial primary key,
    session_id text references sessions(session_id),
    event_type text,
    content text,
    created_at timestamptz default now()
);

alter table sessions add column if not exists owner_id text;

alter table session_events add column if not exists metadata jsonb not null default '{}'::jsonb;
alter table session_events add column if not exists client_msg_id text;
alter table session_events add column if not exists event_key text;

create index if not exists session_events_session_id_id_idx on session_events (session_id, id);
create index if not exists sessions_start_time_idx on sessions (start_time desc nulls last);

-- `add constraint` has no `if not exists`: look each constraint up first (on this schema's table).
do $$
declare
    c record;
begin
    for c in select * from (values
        ('session_events_session_id_client_msg_id_key', 'session_id, client_msg_id'),
        ('session_events_session_id_event_key_key', 'session_id, event_key')
    ) as t(name, columns) loop
        if not exists (
            select 1 from pg_constraint where conrelid = 'session_events'::regclass and conname = c.name
        ) then
            execute format('alter table session_events add constraint %I unique (%s)', c.name, c.columns);
        end if;
    end loop;
end
$$;
