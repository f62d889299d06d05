"""The typed keys under which the application keeps its shared resources."""

from __future__ import annotations

import weakref

from aiohttp import web
from arq.connections import ArqRedis

from core.llm import LLM
from core.settings import Settings
from core.store import Store

from .auth import Authenticator
from .metrics import Metrics
from .presence import Presence
from .sessions import Hub

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", Store)
LLM_CLIENT = web.AppKey("llm", LLM)
REDIS = web.AppKey("redis", ArqRedis)
HUB = web.AppKey("hub", Hub)
AUTH = web.AppKey("auth", Authenticator)
PRESENCE = web.AppKey("presence", Presence)
SOCKETS = web.AppKey("sockets", weakref.WeakSet[web.WebSocketResponse])
