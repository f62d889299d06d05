"""The worker's Prometheus metrics, served on WORKER_METRICS_PORT (0 turns the endpoint off)."""

from __future__ import annotations

import asyncio
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_SUMMARY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    """Jobs done and failed, and how long a summary takes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("rt_worker_jobs_total", "Summary jobs finished, by outcome", ["outcome"], registry=r)
        self.failures = Counter(
            "rt_worker_job_failures_total", "Summary jobs given up after their last try", registry=r
        )
        self.retries = Counter(
            "rt_worker_job_retries_total", "Summary job tries that failed and were deferred", registry=r
        )
        self.compactions = Counter(
            "rt_worker_compactions_total", "Context compaction jobs finished, by outcome", ["outcome"], registry=r
        )
        self.summary_seconds = Histogram(
            "rt_summary_seconds", "Time to make and store one summary", buckets=_SUMMARY_BUCKETS, registry=r
        )
        self.swept = Counter(
            "rt_sweep_sessions_total", "Sessions the sweeper acted on, by action", ["action"], registry=r
        )
        self._server: tuple[WSGIServer, threading.Thread] | None = None

    def serve(self, *, host: str, port: int) -> None:
        """prometheus_client's own server, in a daemon thread: a scrape never waits for the worker's event loop."""
        self._server = start_http_server(port, addr=host, registry=self.registry)

    async def close(self) -> None:
        if self._server is None:
            return
        server, thread = self._server
        self._server = None
        # shutdown() blocks until the serving loop notices (it polls every 0.5 s): not on the event loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        thread.join()
