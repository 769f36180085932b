"""Redis-only guarantees (namespaced keys, msgpack values) and the CI rule of the redis helper."""

from __future__ import annotations

import msgpack
import pytest
import redis.asyncio as aioredis

from rooms.redis_store import RedisStore
from rooms.store import Append, Put
from tests import redis_server
from tests.redis_server import RedisServer


@pytest.mark.redis
async def test_keys_are_namespaced_and_values_msgpack(redis_srv: RedisServer) -> None:
    store = RedisStore(redis_srv.url, namespace="nsx:")
    other = RedisStore(redis_srv.url, namespace="nsy:")
    try:
        await store.commit([Put("room", "r1", {"name": "A"}, 0), Append("chat", "c1", {"time_ms": 1, "t": "<b>"})])
        assert await other.get("room", "r1") is None  # namespaces do not see each other
        raw = aioredis.Redis.from_url(redis_srv.url)
        try:
            keys = sorted(k.decode() for k in await raw.keys("*") if isinstance(k, bytes) and k.startswith(b"nsx:"))
            assert keys == ["nsx:doc:room:r1", "nsx:keys:room", "nsx:log:chat:c1"]
            assert msgpack.unpackb(await raw.hget("nsx:doc:room:r1", "d")) == {"name": "A"}
            assert msgpack.unpackb((await raw.lrange("nsx:log:chat:c1", 0, -1))[0]) == {"time_ms": 1, "t": "<b>"}
        finally:
            await raw.aclose()
        with pytest.raises(ValueError):
            await store.get("bad:kind", "x")
    finally:
        await store.close()
        await other.close()


def _no_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_SERVER", raising=False)
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server.os.path, "exists", lambda path: False)


def test_missing_redis_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_binary(monkeypatch)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        redis_server.require_redis_server()


def test_missing_redis_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_binary(monkeypatch)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        redis_server.require_redis_server()


def test_server_helper_starts_and_stops() -> None:
    with redis_server.redis_server() as srv:
        assert srv.process.poll() is None
        assert redis_server._ping(srv.host, srv.port)
    assert srv.process.poll() is not None
    assert not redis_server._ping(srv.host, srv.port)
