-- 004_shared_functions: every query both PostgreSQL backends run, defined once; summaries keyed on messages.
--
-- The asyncpg backend (`select * from chat_x(...)`) and the Supabase backend (rpc) now call the same functions,
-- so a rule such as "is this summary up to date" exists once, in chat_summary_states(). A summary covers
-- messages only: `connected` and `disconnected` events no longer make it look stale, so a reconnect without
-- new messages costs no second summary. The summary functions report `last_message_id`, `last_message_at`
-- and `up_to_date` instead of `last_event_id` and `last_event_at`.
--
-- chat_session and chat_sessions lose their `p_message_types` argument: the list of message types is
-- chat_message_types(), here. chat_open_session, chat_append_events and chat_save_summary stay as 003
-- defines them; every other function is here only, and the end of this file says, once for all of
-- them, who may call them. Safe to run again; run it again after running 003 again.

-- The event types that are messages: what a summary covers and what message counts count.
create or replace function chat_message_types()
returns text[]
language sql immutable parallel safe
as $$
    select array['user_message', 'ai_message']
$$;

-- Every session with its message count. No `set search_path` on this one and chat_summary_states(): a
-- function with a SET clause is never inlined, and inlined, the planner pushes the caller's filters into it.
create or replace function chat_session_records()
returns table (
    session_id text, start_time timestamptz, end_time timestamptz, summary text, owner_id text, message_count bigint
)
language sql stable
as $$
    select s.session_id, s.start_time, s.end_time, s.summary, s.owner_id,
        (select count(*) from session_events e
         where e.session_id = s.session_id and e.event_type = any(chat_message_types()))
    from sessions s
$$;

-- Every session's summary bookkeeping: its last message (found backwards through the (session_id, id)
-- index), what its summary covers, and whether that is all of it.
create or replace function chat_summary_states()
returns table (
    session_id text, start_time timestamptz, end_time timestamptz, summarized_through bigint,
    summary_updated_at timestamptz, last_message_id bigint, last_message_at timestamptz, up_to_date boolean
)
language sql stable
as $$
    select s.session_id, s.start_time, s.end_time, s.summarized_through, s.summary_updated_at,
        m.id, m.created_at,
        -- The rule, once: up to date when the summary covers the last message, or there is none.
        m.id is null or coalesce(s.summarized_through >= m.id, false)
    from sessions s
    left join lateral (
        select e.id, e.created_at from session_events e
        where e.session_id = s.session_id and e.event_type = any(chat_message_types())
        order by e.id desc limit 1
    ) m on true
$$;

drop function if exists chat_session(text, text[]);
drop function if exists chat_sessions(integer, text, text[]);

-- One session with its message count, or null.
create or replace function chat_session(p_session_id text)
returns json
language sql stable security invoker set search_path from current
as $$
    select to_json(r) from chat_session_records() r where r.session_id = p_session_id
$$;

-- Sessions (of one owner when `p_owner_id` is not null), newest start first, with message counts.
create or replace function chat_sessions(p_limit integer, p_owner_id text)
returns json
language sql stable security invoker set search_path from current
as $$
    select coalesce(json_agg(r order by r.start_time desc nulls last, r.session_id), '[]'::json) from (
        select * from chat_session_records() r
        where p_owner_id is null or r.owner_id = p_owner_id
        order by r.start_time desc nulls last, r.session_id
        limit p_limit
    ) r
$$;

-- A session's summary bookkeeping, or null.
create or replace function chat_summary_state(p_session_id text)
returns json
language sql stable security invoker set search_path from current
as $$
    select to_json(st) from chat_summary_states() st where st.session_id = p_session_id
$$;

-- Sessions to (re)summarise, oldest first: ended ones whose summary is not up to date, and ones never ended
-- whose last message is older than `p_stale_before` (their server may have died). The first condition is
-- only a cheap filter, before the look-up of the last message (a summary written after the session last
-- ended is up to date); the rest is exact.
create or replace function chat_sessions_needing_summary(p_stale_before timestamptz, p_limit integer)
returns json
language sql stable security invoker set search_path from current
as $$
    select coalesce(json_agg(st order by coalesce(st.end_time, st.last_message_at), st.session_id), '[]'::json)
    from (
        select * from chat_summary_states() st
        where (st.end_time is null or st.summarized_through is null or st.summary_updated_at is null
               or st.summary_updated_at < st.end_time)
          and st.last_message_id is not null
          and ((st.end_time is not null and not st.up_to_date)
               or (st.end_time is null and st.last_message_at < p_stale_before))
        order by coalesce(st.end_time, st.last_message_at), st.session_id
        limit p_limit
    ) st
$$;

-- Ended sessions whose start_time falls in [p_started_after, p_started_before) (a null bound is open),
-- oldest start first.
create or replace function chat_ended_sessions(p_started_after timestamptz, p_started_before timestamptz, p_limit integer)
returns json
language sql stable security invoker set search_path from current
as $$
    select coalesce(json_agg(st order by st.start_time, st.session_id), '[]'::json) from (
        select * from chat_summary_states() st
        where st.end_time is not null
          and (p_started_after is null or st.start_time >= p_started_after)
          and (p_started_before is null or st.start_time < p_started_before)
        order by st.start_time, st.session_id
        limit p_limit
    ) st
$$;

do $$
declare
    fn regprocedure;
    supabase boolean := to_regprocedure('auth.uid()') is not null
        and (select count(*) from pg_roles where rolname in ('anon', 'authenticated', 'service_role')) = 3;
begin
    -- Functions are executable by PUBLIC by default, and Supabase also grants every new function in
    -- `public` to anon and authenticated: only the service role may call these (the helpers too, though
    -- they run as the caller). 003's functions are here as well, so that this list is the only one.
    foreach fn in array array[
        'chat_open_session(text, text, timestamptz)',
        'chat_append_events(jsonb)',
        'chat_save_summary(text, text, bigint, timestamptz)',
        'chat_message_types()',
        'chat_session_records()',
        'chat_summary_states()',
        'chat_session(text)',
        'chat_sessions(integer, text)',
        'chat_summary_state(text)',
        'chat_sessions_needing_summary(timestamptz, integer)',
        'chat_ended_sessions(timestamptz, timestamptz, integer)'
    ]::regprocedure[] loop
        execute format('revoke all on function %s from public', fn);
        if supabase then
            execute format('revoke all on function %s from anon, authenticated', fn);
            execute format('grant execute on function %s to service_role', fn);
        end if;
    end loop;
end
$$;

notify pgrst, 'reload schema';
