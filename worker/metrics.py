"""The worker's Prometheus metrics, served on WORKER_METRICS_PORT (0 turns the endpoint off)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
        self.summary_seconds = Histogram(
            "rt_summary_seconds", "Time to make and store one summary", buckets=_SUMMARY_BUCKETS, registry=r
        )
        self.swept = Counter(
            "rt_sweep_sessions_total", "Sessions the sweeper acted on, by action", ["action"], registry=r
        )
        self._runner: web.AppRunner | None = None

    async def serve(self, *, host: str, port: int) -> None:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
