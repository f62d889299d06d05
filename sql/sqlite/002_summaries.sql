-- 002_summaries: what each session's summary covers (the same as ../002_summaries.sql).

alter table sessions add column summarized_through integer;
alter table sessions add column summary_updated_at text;

create index if not exists sessions_open_idx on sessions (start_time) where end_time is null;
