"""Prometheus metrics of one server process, in a registry of its own so several apps can live in one test run."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


# The GenAI conventions' advised boundaries.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


class Metrics:
    """Every metric the server records. Counters are bumped per message or answer, never per token."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.open_sockets = Gauge("rt_open_sockets", "WebSocket connections open now", registry=r)
        self.sessions_started = Counter(
            "rt_sessions_started_total",
            "Connections accepted, by whether the session was resumed",
            ["resumed"],
            registry=r,
        )
        self.messages_accepted = Counter("rt_user_messages_total", "User messages accepted", registry=r)
        self.frames_rejected = Counter(
            "rt_frames_rejected_total", "Client frames answered with an error", ["code"], registry=r
        )
        self.answers = Counter("rt_answers_total", "Answers finished, by status", ["status"], registry=r)
        self.first_token = Histogram(
            "rt_time_to_first_token_seconds",
            "From a message's turn starting to its first delta",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.deltas_streamed = Counter("rt_deltas_streamed_total", "Delta frames sent to clients", registry=r)
        self.completion_tokens = Counter(
            "rt_completion_tokens_total", "Tokens the model generated, as its usage reports them", registry=r
        )
        # The GenAI semantic conventions' client metrics, in Prometheus' naming.
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per answer, by type (input: the prompt, output: the answer), as the provider reports them",
            ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "From a turn's start to its answer's end, by error type (empty when it succeeded)",
            ["gen_ai_operation_name", "gen_ai_request_model", "error_type"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.context_trimmed = Counter(
            "rt_context_trimmed_total",
            "Old messages left out of a request to stay within CONTEXT_MAX_TOKENS, until a context summary covers them",
            registry=r,
        )
        self.context_compactions = Counter(
            "rt_context_compactions_total",
            "Context summaries asked of the worker (requested) and put in use (applied)",
            ["stage"],
            registry=r,
        )
        self.llm_errors = Counter("rt_llm_errors_total", "Failed answers, by error code", ["code"], registry=r)
        self.llm_retries = Counter(
            "rt_llm_retries_total", "Upstream requests retried before the first token", registry=r
        )
        self.store_write_seconds = Histogram(
            "rt_store_write_seconds", "Time to commit one batch of events", buckets=_WRITE_BUCKETS, registry=r
        )
        self.store_write_retries = Counter(
            "rt_store_write_retries_total", "Event batches retried after a failure", registry=r
        )
        self.store_events_dropped = Counter(
            "rt_store_events_dropped_total", "Events the store refused permanently", registry=r
        )
        self.pending_writes = Gauge("rt_store_pending_events", "Events accepted but not yet committed", registry=r)
        self.spooled_events = Gauge(
            "rt_spooled_events", "Events waiting in the local spool for the store to come back", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
