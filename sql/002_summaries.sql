-- 002_summaries: what each session's summary covers.
--
-- summarized_through is the id of the last event the stored summary covers: a summary is up to date
-- when it covers the session's last event, and a job for an older state can never overwrite a newer one.
-- summary_updated_at says when it was written. Additions only; safe to run again.

alter table sessions add column if not exists summarized_through bigint;
alter table sessions add column if not exists summary_updated_at timestamptz;

-- The sweeper looks for sessions that never ended.
create index if not exists sessions_open_idx on sessions (start_time) where end_time is null;
