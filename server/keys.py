"""The typed keys under which the application keeps its shared resources."""

from __future__ import annotations

from aiohttp import web
from arq.connections import ArqRedis

from core.llm import LLM
from core.settings import Settings
from core.store import Store

from .auth import Authenticator
from .live.admission import Admission
from .live.attach import Attacher
from .live.lifecycle import Lifecycle
from .live.presence import Presence
from .live.registry import Registry
from .metrics import Metrics
from .ratelimit import UserRateLimiter
from .websocket import Sockets

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", Store)
LLM_CLIENT = web.AppKey("llm", LLM)
REDIS = web.AppKey("redis", ArqRedis)
AUTH = web.AppKey("auth", Authenticator)
PRESENCE = web.AppKey("presence", Presence)
REGISTRY = web.AppKey("registry", Registry)
ADMISSION = web.AppKey("admission", Admission)
ATTACHER = web.AppKey("attacher", Attacher)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
USER_RATE = web.AppKey("user_rate", UserRateLimiter)
SOCKETS = web.AppKey("sockets", Sockets)
