"""Fixtures for rooms/ tests: a real redis-server (one per test session) and each store kind."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rooms.redis_store import RedisStore
from rooms.sqlite_store import SqliteStore
from rooms.store import MemoryStore, Store
from tests.redis_server import RedisServer, redis_srv

__all__ = ["redis_srv", "store", "store_pair"]

_namespaces = itertools.count()


def fresh_namespace() -> str:
    return f"test{next(_namespaces)}:"


STORE_KINDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """One fresh store of each kind: the same contract tests run against all three."""
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SqliteStore(tmp_path / "rooms.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_srv")
        s = RedisStore(server.url, namespace=fresh_namespace())
    yield s
    await s.close()


@pytest.fixture(params=STORE_KINDS)
async def store_pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two clients of one backing store (two connections to one file, two to one Redis)."""
    a: Store
    b: Store
    if request.param == "memory":
        a = b = MemoryStore()
    elif request.param == "sqlite":
        a, b = SqliteStore(tmp_path / "rooms.db"), SqliteStore(tmp_path / "rooms.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_srv")
        ns = fresh_namespace()
        a, b = RedisStore(server.url, namespace=ns), RedisStore(server.url, namespace=ns)
    yield a, b
    await a.close()
    if b is not a:
        await b.close()
