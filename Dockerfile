# One image for the server (`python -m server`) and the worker (`arq worker.WorkerSettings`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app

# Dependencies first, in a layer of their own: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# OpenAI's tokenizer files, fetched while building: the running service counts tokens with them and never
# downloads one itself (core/llm/tokens.py).
ENV TIKTOKEN_CACHE_DIR=/app/.tiktoken
RUN python -c "import tiktoken; [tiktoken.get_encoding(n) for n in ('o200k_base', 'cl100k_base')]"

# The code runs from /app (not installed), so it finds web/ and sql/ beside it.
COPY core ./core
COPY server ./server
COPY worker ./worker
COPY web ./web
COPY sql ./sql
# data/ holds the SQLite file when no database is configured, and data/spool the writes a down database could
# not take yet (a volume in docker-compose.yml, so they outlive the container).
RUN mkdir -p /app/data/spool && chown -R app /app/data

USER app
EXPOSE 8001
CMD ["python", "-m", "server"]
