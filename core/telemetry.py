"""OpenTelemetry traces with the GenAI semantic conventions: off unless an OTLP endpoint is configured.

Configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`, `OTEL_BSP_*`, ...), read by the SDK itself. Off, nothing of the
SDK is imported and every helper here returns at its first line: `tracer` is None.

Each process builds its own TracerProvider rather than setting OpenTelemetry's global one, which can be set only
once per process (a test process runs many apps). Message text goes into spans only with
`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from .llm import StreamStats

log = logging.getLogger(__name__)

# The tracer of this process, or None: tracing is off.
tracer: Tracer | None = None
capture_content = False
_provider: TracerProvider | None = None

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def enabled_by_environment() -> bool:
    return (
        any(os.environ.get(name) for name in _ENDPOINTS) and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
    )


def setup(service_name: str) -> None:
    """Start exporting this process's spans, when the environment names an OTLP endpoint."""
    global tracer, capture_content, _provider
    if tracer is not None or not enabled_by_environment():
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME, when set, wins over our default name (Resource.create reads it and OTEL_RESOURCE_ATTRIBUTES).
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = _provider.get_tracer("realtime-ai-backend")
    capture_content = os.environ.get(_CAPTURE, "").lower() == "true"
    log.info("tracing on", extra={"fields": {"service": service_name, "capture_content": capture_content}})


def shutdown() -> None:
    """Export what is buffered and stop (blocking: call it from a thread, or at the very end)."""
    global tracer, _provider
    provider, _provider, tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def current() -> Context | None:
    """The active trace context, to hand to work that runs later elsewhere (a turn, a write); None when off."""
    if tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


def inject(ctx: Context | None = None) -> dict[str, str] | None:
    """The W3C trace context of `ctx` (default: the active one) as a dict for a job's arguments; None when off."""
    if tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=ctx)
    return carrier or None


def span(
    name: str,
    *,
    kind: str = "INTERNAL",
    parent: Context | None = None,
    carrier: dict[str, str] | None = None,
    links: Sequence[Context | None] = (),
    attributes: dict[str, Any] | None = None,
    start_time: int | None = None,
) -> AbstractContextManager[Span | None]:
    """A span, current inside the block, child of `parent` (or of the context in `carrier`, a job's); None when
    tracing is off. An exception leaving the block marks it failed with `error.type`. `start_time` (epoch ns): when
    the work began, if before the block."""
    if tracer is None:
        # One shared object: a generator-based context manager would live as long as each WebSocket it wraps.
        return _NO_SPAN
    return _span(
        name, kind=kind, parent=parent, carrier=carrier, links=links, attributes=attributes, start_time=start_time
    )


_NO_SPAN: AbstractContextManager[None] = nullcontext()


def open_span(
    name: str, *, kind: str = "INTERNAL", attributes: dict[str, Any] | None = None
) -> tuple[Span, Context] | None:
    """A span for something with no coroutine of its own to hold a `with` block (a WebSocket): started now as a
    child of the active context, ended by the caller (`span.end()`); with it, the context that makes it the
    parent. None when tracing is off."""
    if tracer is None:
        return None
    from opentelemetry import trace

    started = tracer.start_span(name, kind=getattr(trace.SpanKind, kind), attributes=attributes)
    return started, trace.set_span_in_context(started)


@contextmanager
def _span(
    name: str,
    *,
    kind: str,
    parent: Context | None,
    carrier: dict[str, str] | None,
    links: Sequence[Context | None],
    attributes: dict[str, Any] | None,
    start_time: int | None,
) -> Iterator[Span | None]:
    assert tracer is not None
    from opentelemetry import context, trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if carrier:
        parent = TraceContextTextMapPropagator().extract(carrier)
    span_links = []
    for ctx in links:
        linked = trace.get_current_span(ctx).get_span_context() if ctx is not None else None
        if linked is not None and linked.is_valid:
            span_links.append(trace.Link(linked))
    with tracer.start_as_current_span(
        name,
        context=parent if parent is not None else context.get_current(),
        kind=getattr(trace.SpanKind, kind),
        attributes=attributes,
        links=span_links,
        start_time=start_time,
        record_exception=False,
    ) as current_span:
        try:
            yield current_span
        except BaseException as e:
            # A code set by the block (an LLM error's) says more than the exception's class.
            if not isinstance(e, GeneratorExit) and "error.type" not in (
                getattr(current_span, "attributes", None) or {}
            ):
                current_span.set_attribute("error.type", type(e).__name__)
                current_span.set_status(trace.StatusCode.ERROR, str(e)[:200])
            raise


def chat_attributes(model: str) -> dict[str, Any]:
    """The GenAI attributes known before a chat request is sent."""
    return {"gen_ai.operation.name": "chat", "gen_ai.request.model": model}


def chat_request(messages: Sequence[Any]) -> None:
    """The request's messages on the current span, when message content may be captured."""
    if tracer is None or not capture_content:
        return
    import orjson
    from opentelemetry import trace

    trace.get_current_span().set_attribute("gen_ai.input.messages", orjson.dumps(list(messages)).decode())


def chat_finished(
    current_span: Span | None, stats: StreamStats, *, error_type: str | None = None, output: str | None = None
) -> None:
    """What the provider said of a chat request: its model, token usage and time to first token."""
    if current_span is None:
        return
    if stats.response_model is not None:
        current_span.set_attribute("gen_ai.response.model", stats.response_model)
    if stats.prompt_tokens is not None:
        current_span.set_attribute("gen_ai.usage.input_tokens", stats.prompt_tokens)
    if stats.completion_tokens is not None:
        current_span.set_attribute("gen_ai.usage.output_tokens", stats.completion_tokens)
    if stats.finish_reason is not None:
        current_span.set_attribute("gen_ai.response.finish_reasons", [stats.finish_reason])
    if stats.first_token_s is not None:
        current_span.set_attribute("gen_ai.response.time_to_first_token", stats.first_token_s)
    if error_type is not None:
        from opentelemetry import trace

        current_span.set_attribute("error.type", error_type)
        current_span.set_status(trace.StatusCode.ERROR, error_type)
    if capture_content and output is not None:
        import orjson

        current_span.set_attribute(
            "gen_ai.output.messages", orjson.dumps([{"role": "assistant", "content": output}]).decode()
        )
