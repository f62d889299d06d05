"""`python -m bench.naive`: the naive relay, the baseline the bench compares the real server with; not a product.

It is the seed description's server written the straightforward way, with no batching and no optimisation: on
each WebSocket message it awaits an INSERT of the user message, calls the `openai` SDK with the session's
history and `stream=True`, sends each chunk's delta content as a JSON frame, then awaits an INSERT of the AI
message. History is a dict of lists in memory, one per session.

It speaks just enough of our protocol (docs/protocol.md) for bench/stack.py's `converse`: `session.ready` at
connect, `message.stored` for the user message once its INSERT returned, `response.started`, one
`response.delta` per chunk, `response.done` with the text, `message.stored` for the answer. A text frame that is
not a JSON object is the message as it is, as in the description's browser example.

It keeps to the seed's schema, in tables of its own (`naive_sessions`, `naive_events`, created at start with the
seed's columns), so that nothing it writes is seen by the real server or its worker. The post-session summary of
the description (on disconnect) is left out: the bench measures the relay, and closes its sockets after.

    python -m bench.naive --port 8002 --database-url postgresql://... --upstream-url http://127.0.0.1:8001/v1
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

import asyncpg
import openai
from aiohttp import WSMsgType, web
from openai.types.chat import ChatCompletionMessageParam

SCHEMA = """
create table if not exists naive_sessions (
  session_id text primary key,
  start_time timestamptz,
  end_time timestamptz,
  summary text
);
create table if not exists naive_events (
  id bigserial primary key,
  session_id text references naive_sessions(session_id),
  event_type text,
  content text,
  created_at timestamptz default now()
);
"""

FALLBACK = "Sorry, the AI service is unavailable right now. Please try again later."


class NaiveRelay:
    def __init__(self, *, database_url: str, upstream_url: str, model: str) -> None:
        self.database_url = database_url
        self.model = model
        self.client = openai.AsyncOpenAI(base_url=upstream_url, api_key="bench")
        self.history: dict[str, list[ChatCompletionMessageParam]] = {}
        self.pool: asyncpg.Pool[Any] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/ws/session/{session_id}", self.session)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app

    async def start(self, app: web.Application) -> None:
        self.pool = await asyncpg.create_pool(self.database_url)
        await self.pool.execute(SCHEMA)

    async def stop(self, app: web.Application) -> None:
        if self.pool is not None:
            await self.pool.close()
        await self.client.close()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def session(self, request: web.Request) -> web.WebSocketResponse:
        assert self.pool is not None
        session_id = request.match_info["session_id"]
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        # Create or update the session record.
        await self.pool.execute(
            "insert into naive_sessions (session_id, start_time) values ($1, now())"
            " on conflict (session_id) do update set end_time = null",
            session_id,
        )
        history = self.history.setdefault(session_id, [])
        await ws.send_json(
            {
                "type": "session.ready",
                "session_id": session_id,
                "resumed": bool(history),
                "model": self.model,
                "history": [],
                "active_response": None,
                "mode": "write",
            }
        )
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await self.answer(ws, session_id, history, msg.data)
        await self.pool.execute("update naive_sessions set end_time = now() where session_id = $1", session_id)
        return ws

    async def answer(
        self, ws: web.WebSocketResponse, session_id: str, history: list[ChatCompletionMessageParam], data: str
    ) -> None:
        assert self.pool is not None
        client_msg_id = None
        text = data
        try:
            frame = json.loads(data)
        except ValueError:
            frame = None
        if isinstance(frame, dict):
            if frame.get("type") == "ping":
                await ws.send_json({"type": "pong"})
                return
            text = frame.get("text", "")
            client_msg_id = frame.get("client_msg_id")

        user_id = await self.pool.fetchval(
            "insert into naive_events (session_id, event_type, content) values ($1, 'user_message', $2) returning id",
            session_id,
            text,
        )
        await ws.send_json({"type": "message.stored", "id": user_id, "role": "user", "client_msg_id": client_msg_id})
        history.append({"role": "user", "content": text})

        response_id = uuid.uuid4().hex
        await ws.send_json({"type": "response.started", "response_id": response_id, "client_msg_id": client_msg_id})
        parts: list[str] = []
        status, error = "completed", None
        try:
            stream = await self.client.chat.completions.create(
                model=self.model,
                messages=history,
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    delta = chunk.choices[0].delta.content
                    parts.append(delta)
                    await ws.send_json({"type": "response.delta", "response_id": response_id, "delta": delta})
            reply = "".join(parts)
        except openai.OpenAIError as exc:
            # The socket stays open; a fallback AI message is stored instead.
            status, error = "failed", {"code": "llm_error", "message": str(exc)}
            reply = FALLBACK
        history.append({"role": "assistant", "content": reply})

        ai_id = await self.pool.fetchval(
            "insert into naive_events (session_id, event_type, content) values ($1, 'ai_message', $2) returning id",
            session_id,
            reply,
        )
        await ws.send_json(
            {"type": "response.done", "response_id": response_id, "status": status, "text": reply, "error": error}
        )
        await ws.send_json({"type": "message.stored", "id": ai_id, "role": "assistant", "response_id": response_id})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--upstream-url", required=True, help="the OpenAI base URL, e.g. http://127.0.0.1:8001/v1")
    parser.add_argument("--model", default="bench")
    args = parser.parse_args()
    relay = NaiveRelay(database_url=args.database_url, upstream_url=args.upstream_url, model=args.model)
    web.run_app(relay.app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
