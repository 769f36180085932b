"""Typed keys for what the aiohttp application holds."""

from __future__ import annotations

import weakref

from aiohttp import web

from media.router import Router
from metrics.eventlog import EventStore
from signalling.auth import TokenAuthority
from signalling.config import Config
from signalling.hub import Hub
from signalling.workflow import Workflow

CONFIG_KEY = web.AppKey("config", Config)
TOKENS_KEY = web.AppKey("tokens", TokenAuthority)
EVENTLOG_KEY = web.AppKey("eventlog", EventStore)
ROUTER_KEY = web.AppKey("router", Router)
HUB_KEY = web.AppKey("hub", Hub)
SOCKETS_KEY: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")
SHUTTING_DOWN_KEY = web.AppKey("shutting_down", bool)
STARTED_KEY = web.AppKey("started_at", float)
WORKFLOW_KEY = web.AppKey("workflow", Workflow)
