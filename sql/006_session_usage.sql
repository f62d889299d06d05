-- 006_session_usage: every session record carries its token usage (the sums of its answers' `prompt_tokens` and
-- `completion_tokens` metadata: the provider's counts, or the server's where the provider gave none), beside its
-- message count, for GET /api/sessions and the session budget. Both PostgreSQL backends read it through
-- chat_session() and chat_sessions(), which select from this function and so pick the new columns up.
--
-- Its result type changes, so it is dropped and created again (chat_session and chat_sessions resolve it when
-- called), and its privileges are set again as 004 sets them. Safe to run again.

drop function if exists chat_session_records();

create function chat_session_records()
returns table (
    session_id text, start_time timestamptz, end_time timestamptz, summary text, owner_id text, message_count bigint,
    prompt_tokens bigint, completion_tokens bigint
)
language sql stable
as $$
    select s.session_id, s.start_time, s.end_time, s.summary, s.owner_id,
        c.message_count, c.prompt_tokens, c.completion_tokens
    from sessions s
    cross join lateral (
        select count(*) filter (where e.event_type = any(chat_message_types())) as message_count,
            coalesce(sum(case when jsonb_typeof(e.metadata -> 'prompt_tokens') = 'number'
                then (e.metadata ->> 'prompt_tokens')::numeric end)
                filter (where e.event_type = 'ai_message'), 0)::bigint as prompt_tokens,
            coalesce(sum(case when jsonb_typeof(e.metadata -> 'completion_tokens') = 'number'
                then (e.metadata ->> 'completion_tokens')::numeric end)
                filter (where e.event_type = 'ai_message'), 0)::bigint as completion_tokens
        from session_events e
        where e.session_id = s.session_id
    ) c
$$;

do $$
declare
    supabase boolean := to_regprocedure('auth.uid()') is not null
        and (select count(*) from pg_roles where rolname in ('anon', 'authenticated', 'service_role')) = 3;
begin
    revoke all on function chat_session_records() from public;
    if supabase then
        revoke all on function chat_session_records() from anon, authenticated;
        grant execute on function chat_session_records() to service_role;
    end if;
end
$$;

notify pgrst, 'reload schema';
