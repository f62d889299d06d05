"""Assembles the aiohttp application: routes, and one cleanup context per resource."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool

from core import telemetry
from core.jobs import JobQueue
from core.llm import make_llm
from core.llm.tokens import counter_for
from core.settings import Settings
from core.store import open_store
from core.tasks import TaskSet

from . import api, ws
from .auth import Authenticator
from .eventlog import EventLog
from .hosts import EXEMPT_PATHS, HostPolicy, allowed_hosts
from .keys import (
    ADMISSION,
    ATTACHER,
    AUTH,
    LIFECYCLE,
    LLM_CLIENT,
    METRICS,
    PRESENCE,
    REDIS,
    REGISTRY,
    SETTINGS,
    SOCKETS,
    STORE,
    USER_RATE,
)
from .live.admission import Admission
from .live.attach import Attacher
from .live.broker import Broker
from .live.conversation import Conversation
from .live.lifecycle import Lifecycle
from .live.presence import Presence
from .live.registry import Registry
from .live.session import Session
from .metrics import Metrics
from .parsing import handler_args
from .ratelimit import DailyTokenBudget, UserRateLimiter
from .websocket import Sockets

log = logging.getLogger(__name__)


async def _telemetry(app: web.Application) -> AsyncIterator[None]:
    """Traces, when OTEL_EXPORTER_OTLP_ENDPOINT is set (core/telemetry.py); the last spans exported at the end."""
    telemetry.setup("realtime-ai-server")
    yield
    await asyncio.to_thread(telemetry.shutdown)


async def _store(app: web.Application) -> AsyncIterator[None]:
    store = await open_store(app[SETTINGS])
    app[STORE] = store
    log.info("store ready", extra={"fields": {"backend": store.name}})
    yield
    await store.close()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    # Connects lazily: a Redis that is down must not keep the chat from starting.
    settings = app[SETTINGS]
    # Bounded, and commands wait for a free connection: a pool without a cap grows with every burst of
    # concurrent commands (one per connecting client) and never shrinks.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=5,
    )
    redis = ArqRedis(pool)
    app[REDIS] = redis
    yield
    await redis.aclose()


async def _llm(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    llm = make_llm(settings)
    app[LLM_CLIENT] = llm
    if settings.offline:
        log.warning(
            "no OPENAI_API_KEY or OPENAI_BASE_URL set: the offline demo model answers",
            extra={"fields": {"model": llm.model}},
        )
    else:
        log.info("model configured", extra={"fields": {"model": llm.model, "base_url": settings.openai_base_url}})
    yield
    await llm.close()


async def _auth(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    auth = Authenticator(settings)
    app[AUTH] = auth
    if not auth.enabled and not settings.loopback_only:
        log.warning(
            "AUTH_DISABLED: serving without authentication on a non-loopback address",
            extra={"fields": {"host": settings.host}},
        )
    yield
    await auth.close()


async def _live(app: web.Application) -> AsyncIterator[None]:
    """The live sessions: the event log, the lease between servers, the registry, and how sessions end."""
    settings, store, metrics, redis = app[SETTINGS], app[STORE], app[METRICS], app[REDIS]
    eventlog = EventLog(store, metrics, settings)
    presence = Presence(redis, ttl_s=settings.presence_ttl_s, takeover_wait_s=settings.takeover_wait_s)
    llm = app[LLM_CLIENT]
    broker = Broker(
        redis, server_id=presence.server_id, lease_s=settings.answer_lease_s, on_failure=presence.suspect_redis
    )

    jobs = JobQueue(redis, registry=metrics.registry)
    budget = None if settings.user_daily_max_tokens is None else DailyTokenBudget(redis, settings.user_daily_max_tokens)
    # Once per process: loading a tokenizer reads a file of several MB.
    count = counter_for(llm.model)

    def make_session(session_id: str) -> Session:
        writer = eventlog.writer()
        conversation = Conversation(
            session_id,
            writer=writer,
            llm=llm,
            settings=settings,
            metrics=metrics,
            broker=broker,
            jobs=jobs,
            count=count,
            budget=budget,
        )
        return Session(session_id, writer=writer, conversation=conversation)

    def idle(session: Session) -> None:
        lifecycle.session_idle(session)

    registry = Registry(
        make_session,
        on_idle=idle,
        on_handed_over=presence.release,
        stop_on_takeover=settings.on_disconnect == "cancel",
    )
    lifecycle = Lifecycle(registry, eventlog, store, jobs, presence, settings)
    user_rate = UserRateLimiter(redis, settings.user_messages_per_minute)
    presence.on_release_request(registry.release_request)
    presence.on_cancel_request(registry.cancel_request)
    presence.on_context_summary(registry.context_summary)
    eventlog.start()
    background = TaskSet()
    background.spawn(presence.run(), name="presence")
    background.spawn(registry.sweep_stalled(), name="stalled-sockets")
    background.spawn(app[SOCKETS].heartbeat(), name="heartbeat")
    app[PRESENCE], app[REGISTRY], app[LIFECYCLE], app[USER_RATE] = presence, registry, lifecycle, user_rate
    app[ADMISSION] = Admission(settings, user_rate)
    app[ATTACHER] = Attacher(store, eventlog, presence, settings, broker=broker, budget=budget)
    yield
    # Runs after on_shutdown closed the sockets: give their last writes time to land before the store closes.
    await lifecycle.close(within_s=settings.shutdown_flush_s)
    await broker.close()
    await user_rate.close()
    if budget is not None:
        await budget.close()
    await background.cancel()
    await presence.close()


async def tune_gc(app: web.Application) -> None:
    """Keep the cyclic garbage collector from stalling every stream at once (measured in bench/RESULTS.md).

    Everything built at start-up (modules, the model client, pools) lives as long as the process: frozen, the
    collector no longer walks it, and a full collection drops from ~70 ms to ~15 ms. Streaming allocates and
    frees many short-lived objects that reference counting already reclaims: collecting the young generation
    every 50,000 allocations instead of 700 turns a 2-5 ms pause every few milliseconds into a rare one.
    For the server process only (`python -m server`): a test process running many apps must not freeze them.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _frameless_host_check(settings: Settings) -> Middleware:
    """`hosts.allowed_hosts`, as a plain function: an allowed request goes on to the route as a tail call, so the
    check keeps no coroutine frame for the life of a WebSocket (~300 bytes each); a refused one is answered by
    `allowed_hosts` itself (the same policy, log line and 403)."""
    policy, refuse = HostPolicy(settings), allowed_hosts(settings)

    @web.middleware
    def check_host(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        if request.path in EXEMPT_PATHS or policy.allows(request.headers.get(hdrs.HOST)):
            return handler(request)
        return refuse(request, handler)

    return check_host


@web.middleware
def _json_errors(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """`api.json_errors` for every route but the WebSocket one, which answers its own HTTP errors in JSON the same
    way (`ws.session_socket`): no middleware frame is kept for the life of its socket."""
    if request.match_info.handler is ws.session_socket:
        return handler(request)
    return api.json_errors(request, handler)


def create_app(settings: Settings) -> web.Application:
    # The host check is outermost: a request for another host name reaches nothing, not even a 404.
    app = web.Application(
        middlewares=[_frameless_host_check(settings), _json_errors],
        handler_args=handler_args(),
        client_max_size=64 * 1024,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[SOCKETS] = Sockets(heartbeat_s=settings.ws_heartbeat_s)
    app.cleanup_ctx.extend([_telemetry, _store, _redis, _llm, _auth, _live])
    app.on_shutdown.append(ws.close_sockets)
    app.router.add_get("/", api.index)
    app.router.add_get("/ws/session/{session_id}", ws.session_socket)
    app.router.add_get("/api/sessions", api.list_sessions)
    app.router.add_get("/api/sessions/{session_id}", api.get_session)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    if settings.web_dir.is_dir():
        app.router.add_static("/web/", settings.web_dir, show_index=False)
    return app
