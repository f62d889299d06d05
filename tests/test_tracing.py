"""OpenTelemetry traces: a real OTLP/HTTP receiver decodes what the server and a real worker process export, and the
spans of one conversation form one trace, across both processes, with the GenAI attributes."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.conftest import eventually, receive
from tests.fakes import openai_server as fake
from tests.test_compaction import FACT, UNLIMITED, model, question, turn, worker_process

pytestmark = pytest.mark.asyncio


@dataclass
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    links: list[str]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class OTLPReceiver:
    """A collector's OTLP/HTTP trace endpoint: decodes each protobuf export into `spans`."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(
                        Span(
                            service=resource.get("service.name", ""),
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=[link.span_id.hex() for link in s.links],
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def named(self, name: str, service: str | None = None) -> list[Span]:
        return [s for s in self.spans if s.name == name and (service is None or s.service == service)]


@pytest_asyncio.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OTLPReceiver]:
    otlp = OTLPReceiver()
    await otlp.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    try:
        yield otlp
    finally:
        await otlp.close()


async def exported(otlp: OTLPReceiver, name: str) -> list[Span]:
    return otlp.named(name, "realtime-ai-worker")


async def stored_turn(ws: Any, text: str) -> None:
    done = await turn(ws, text)
    async with asyncio.timeout(10):
        while (event := await receive(ws)).get("response_id") != done["response_id"] or event[
            "type"
        ] != "message.stored":
            pass


def _otel_env(otlp: OTLPReceiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}


async def test_a_conversation_is_one_trace_across_the_server_and_the_worker(
    make_client, db, redis, fake_llm, settings, tmp_path, receiver
):
    fake_llm.responder = model
    budget = 300
    client = await make_client(context_max_tokens=budget, **UNLIMITED)
    env = {**_otel_env(receiver), "CONTEXT_MAX_TOKENS": str(budget)}
    async with worker_process(settings, tmp_path / "worker.log", **env):
        ws = await client.ws_connect("/ws/session/traced")
        await receive(ws)
        # Each answer stored before the next message: a compaction covers only stored messages, and a store that
        # lags (just restarted by an earlier test) would otherwise leave none to cover within the 16 turns.
        await stored_turn(ws, FACT)
        for i in range(2, 16):
            await stored_turn(ws, question(i))
        # One that fails: the provider is out of quota.
        fake_llm.script(fake.rate_limited(quota=True))
        failed = await turn(ws, "and one more")
        assert failed["status"] == "failed"
        await ws.close()
        await eventually(lambda: db.fetchval("select summary from sessions where session_id = 'traced'"), timeout=15)
        await eventually(lambda: exported(receiver, "summarize_session"), timeout=10)
        await eventually(lambda: exported(receiver, "compact_context"), timeout=10)
    await client.close()  # the server's last spans are exported when it stops

    [session] = [s for s in receiver.named("websocket session") if s.attributes["session.id"] == "traced"]
    assert session.service == "realtime-ai-server" and session.attributes["rt.mode"] == "write"
    trace = [s for s in receiver.spans if s.trace_id == session.trace_id]
    by_id = {s.span_id: s for s in trace}

    # A GenAI chat span per turn, each a child of the session's span.
    chats = [s for s in trace if s.name == "chat fake-model" and s.service == "realtime-ai-server"]
    assert len(chats) == 16
    assert all(c.parent_id == session.span_id for c in chats)
    ok = [c for c in chats if "error.type" not in c.attributes]
    assert len(ok) == 15
    for chat in ok:
        a = chat.attributes
        assert (a["gen_ai.operation.name"], a["gen_ai.request.model"], a["gen_ai.response.model"]) == (
            "chat",
            "fake-model",
            "fake-model",
        )
        assert a["gen_ai.usage.input_tokens"] > 0
        assert a["gen_ai.usage.output_tokens"] == fake.count_tokens("Okay, noted.")
        assert a["gen_ai.response.time_to_first_token"] > 0
    [bad] = [c for c in chats if "error.type" in c.attributes]
    assert bad.attributes["error.type"] == failed["error"]["code"]

    # The store's writes are in the same trace.
    writes = [s for s in trace if s.name == "store append_events"]
    assert writes and all(w.attributes["db.operation.name"] == "append_events" for w in writes)

    # The worker's jobs are children in the same trace: the compaction of the turn that asked for it, the summary
    # of the session; each with its own chat span under it.
    compactions = [s for s in trace if s.name == "compact_context"]
    assert compactions and all(s.service == "realtime-ai-worker" for s in compactions)
    assert all(by_id[s.parent_id].name == "chat fake-model" for s in compactions)
    [summary] = [s for s in trace if s.name == "summarize_session"]
    assert summary.parent_id == session.span_id
    worker_chats = [s for s in trace if s.name == "chat fake-model" and s.service == "realtime-ai-worker"]
    assert {by_id[s.parent_id].name for s in worker_chats} == {"compact_context", "summarize_session"}

    # No message text in any span unless asked for.
    assert not any("Zanzibar" in str(v) for s in receiver.spans for v in s.attributes.values())


async def test_message_content_is_captured_only_when_asked(make_client, fake_llm, receiver, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    client = await make_client()
    ws = await client.ws_connect("/ws/session/captured")
    await receive(ws)
    await turn(ws, "Zanzibar says hello")
    await ws.close()
    await client.close()
    [chat] = receiver.named("chat fake-model")
    assert "Zanzibar says hello" in chat.attributes["gen_ai.input.messages"]
    assert "You said: Zanzibar says hello" in chat.attributes["gen_ai.output.messages"]


async def test_tracing_is_off_without_an_endpoint(make_client, fake_llm):
    from core import telemetry

    client = await make_client()
    assert telemetry.tracer is None
    ws = await client.ws_connect("/ws/session/untraced")
    await receive(ws)
    assert (await turn(ws, "hello"))["status"] == "completed"
    await asyncio.sleep(0)
    assert telemetry.current() is None and telemetry.inject() is None
