-- 003_supabase: the SQL functions that write for both PostgreSQL backends, and row level security.
--
-- Its other functions now live in 004_shared_functions.sql, which redefined or replaced them all
-- (chat_session, chat_sessions, chat_summary_state, chat_sessions_needing_summary, chat_ended_sessions),
-- and so does the one list of who may call each function: a database that applied the earlier 003
-- ends in the same state once 004 has run.
--
-- PostgREST runs each request in one transaction, so a step that needs several statements, or a
-- result PostgREST cannot express (an upsert that reports whether it created the row, ids in input
-- order, a conditional update), is one function here. Every function returns one JSON value, not a
-- set: PostgREST caps set results at the project's Max Rows and does not promise their order, while a
-- value built with `order by` arrives whole and in order. They run as the caller (security invoker).
--
-- Row level security: on Supabase the `auth` schema, `auth.uid()` and the roles anon, authenticated
-- and service_role exist, and this migration adds the policies: a signed-in user reads only their own
-- sessions and those sessions' events; nobody but the service role (which bypasses RLS) writes. On a
-- plain PostgreSQL without them, RLS is still enabled, and with no policy nobody but the tables'
-- owner (the service's own login) can read or write. Run this file again, then 004, after adding
-- Supabase's auth there: both are idempotent. Changing a function's result type later needs
-- `drop function` first.

create or replace function chat_open_session(p_session_id text, p_owner_id text, p_now timestamptz)
returns json
language sql volatile security invoker set search_path from current
as $$
    with upserted as (
        insert into sessions as s (session_id, start_time, owner_id) values (p_session_id, p_now, p_owner_id)
        on conflict (session_id) do update set end_time = null, start_time = coalesce(s.start_time, excluded.start_time)
        returning s.session_id, s.start_time, s.end_time, s.summary, s.owner_id, (s.xmax = 0) as created
    )
    select to_json(upserted) from upserted
$$;

-- The ids of `p_events` (a JSON array of events) in the array's order. An event whose
-- (session_id, event_key) is already stored is skipped, and its stored id returned: a retried call
-- stores nothing twice. A clash on (session_id, client_msg_id) under another key raises, and the
-- whole batch is rolled back.
create or replace function chat_append_events(p_events jsonb)
returns bigint[]
language plpgsql volatile security invoker set search_path from current
as $$
declare
    ids bigint[];
begin
    insert into session_events (session_id, event_type, content, created_at, client_msg_id, event_key, metadata)
    select e->>'session_id', e->>'event_type', e->>'content', (e->>'created_at')::timestamptz,
        e->>'client_msg_id', e->>'event_key', coalesce(e->'metadata', '{}'::jsonb)
    from jsonb_array_elements(p_events) with ordinality as t(e, ord)
    order by t.ord
    on conflict (session_id, event_key) do nothing;

    -- A statement of its own, with a fresh snapshot: it also finds a key that a concurrent call
    -- committed while this one waited for it.
    select array_agg(se.id order by t.ord) into ids
    from jsonb_array_elements(p_events) with ordinality as t(e, ord)
    left join session_events se on se.session_id = t.e->>'session_id' and se.event_key = t.e->>'event_key';
    return coalesce(ids, '{}');
end
$$;

-- Store a summary covering the events up to `p_through_event_id` and set end_time if still null.
-- `<=`: a forced redo of the same state may replace its summary; an older state never replaces a
-- newer one. True when the row was written.
create or replace function chat_save_summary(
    p_session_id text, p_summary text, p_through_event_id bigint, p_end_time timestamptz
)
returns boolean
language sql volatile security invoker set search_path from current
as $$
    with updated as (
        update sessions set summary = p_summary, summarized_through = p_through_event_id,
            summary_updated_at = now(), end_time = coalesce(end_time, p_end_time)
        where session_id = p_session_id
          and (summarized_through is null or summarized_through <= p_through_event_id)
        returning 1
    )
    select exists (select from updated)
$$;

-- The policies below look sessions up by owner.
create index if not exists sessions_owner_id_idx on sessions (owner_id);

alter table sessions enable row level security;
alter table session_events enable row level security;

do $$
declare
    supabase boolean := to_regprocedure('auth.uid()') is not null
        and (select count(*) from pg_roles where rolname in ('anon', 'authenticated', 'service_role')) = 3;
begin
    if not supabase then
        raise notice '003_supabase: no auth.uid() or Supabase roles here, so no policies: only the owner of the tables can use them';
        return;
    end if;

    -- RLS does not cover TRUNCATE, which Supabase grants to these roles by default.
    revoke truncate on sessions, session_events from anon, authenticated;

    drop policy if exists "owners read their sessions" on sessions;
    create policy "owners read their sessions" on sessions
        for select to authenticated
        using (owner_id = (select auth.uid())::text);

    drop policy if exists "owners read their sessions' events" on session_events;
    create policy "owners read their sessions' events" on session_events
        for select to authenticated
        using (exists (
            select 1 from sessions s
            where s.session_id = session_events.session_id and s.owner_id = (select auth.uid())::text
        ));
end
$$;

-- Supabase's PostgREST reloads its schema cache on this notification; elsewhere nobody listens.
notify pgrst, 'reload schema';
