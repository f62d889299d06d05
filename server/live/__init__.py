"""The live session: a socket adapter (`connection`, `outbox`), the conversation that owns turns and answers
(`conversation`, `answer`, `context`), the session's state (`session`), the registry of live sessions and how
connections reach them (`registry`, `admission`, `attach`), the lease between servers (`presence`), and how
sessions end (`lifecycle`)."""
