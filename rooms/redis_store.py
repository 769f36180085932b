"""The Redis store: shared state for several nodes. Keys namespaced, values msgpack.

Layout under the namespace prefix (default ``openconsult:``):

- ``{ns}doc:{kind}:{key}`` — hash ``v`` (version) and ``d`` (msgpack body);
- ``{ns}keys:{kind}`` — set of the keys of one kind (for listings);
- ``{ns}log:{log}:{key}`` — list of msgpack items, in append order.

A commit is one Lua script: it compares every expected version and only then writes, atomically
on the Redis server, so two nodes admitting the same patient cannot both win. Trimming a log uses
WATCH/MULTI and retries if an append raced it. Multi-key scripts need all keys on one server:
with Redis Cluster, put the namespace in a hash tag (``{openconsult}:``).

A Redis that does not answer raises ``DirectoryUnavailable`` (code ``cluster_unavailable``, HTTP
503), as the room directory does: the workflow's requests fail with a coded error, not a crash.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from rooms.directory import DirectoryUnavailable

from rooms.store import (
    Append,
    Body,
    Check,
    Doc,
    Op,
    Put,
    StoreConflict,
    pack,
    unpack,
    validate_ops,
)

# ARGV[1] = n; then per op 4 values: type ('p' put, 'c' check, 'a' append), expected, data, member.
# KEYS[i] = the op's doc or log key; KEYS[n+i] = the kind's key set (used by puts only).
_COMMIT_LUA = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local base = 1 + (i - 1) * 4
  if ARGV[base + 1] ~= 'a' then
    local actual = tonumber(redis.call('HGET', KEYS[i], 'v') or '0')
    if actual ~= tonumber(ARGV[base + 2]) then
      return {i, actual}
    end
  end
end
for i = 1, n do
  local base = 1 + (i - 1) * 4
  local t = ARGV[base + 1]
  if t == 'p' then
    redis.call('HSET', KEYS[i], 'v', tonumber(ARGV[base + 2]) + 1, 'd', ARGV[base + 3])
    redis.call('SADD', KEYS[n + i], ARGV[base + 4])
  elseif t == 'a' then
    redis.call('RPUSH', KEYS[i], ARGV[base + 3])
  end
end
return {0, 0}
"""


def _as_bytes(value: bytes | str | None) -> bytes:
    # The client is created with decode_responses=False, so replies are bytes.
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")
    return value


@contextmanager
def _answering() -> Iterator[None]:
    """Redis failures (refused, reset, timed out) become ``DirectoryUnavailable``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None


class RedisStore:
    """``RedisStore("redis://127.0.0.1:6379/0", namespace="openconsult:")``."""

    def __init__(self, url: str, namespace: str = "openconsult:") -> None:
        self.namespace = namespace
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=False)
        self._commit = self._redis.register_script(_COMMIT_LUA)

    def _doc_key(self, kind: str, key: str) -> str:
        return f"{self.namespace}doc:{kind}:{key}"

    def _set_key(self, kind: str) -> str:
        return f"{self.namespace}keys:{kind}"

    def _log_key(self, log: str, key: str) -> str:
        return f"{self.namespace}log:{log}:{key}"

    @staticmethod
    def _check_kind(kind: str) -> None:
        # A ':' in a kind would make "a:b"/"c" and "a"/"b:c" share a key.
        if ":" in kind:
            raise ValueError(f'kind "{kind}" must not contain ":"')

    async def get(self, kind: str, key: str) -> Doc | None:
        self._check_kind(kind)
        with _answering():
            found = await self._redis.hmget(self._doc_key(kind, key), ["v", "d"])
        if found[0] is None:
            return None
        return Doc(int(found[0]), unpack(_as_bytes(found[1])))

    async def keys(self, kind: str) -> list[str]:
        self._check_kind(kind)
        with _answering():
            members = await self._redis.smembers(self._set_key(kind))
        return sorted(_as_bytes(m).decode() for m in members)

    async def commit(self, ops: Sequence[Op]) -> None:
        validate_ops(ops)
        keys: list[str] = []
        sets: list[str] = []
        args: list[Any] = [len(ops)]
        for op in ops:
            if isinstance(op, Append):
                self._check_kind(op.log)
                keys.append(self._log_key(op.log, op.key))
                sets.append(self._set_key(op.log))
                args += ["a", 0, pack(op.item), ""]
            else:
                self._check_kind(op.kind)
                keys.append(self._doc_key(op.kind, op.key))
                sets.append(self._set_key(op.kind))
                if isinstance(op, Put):
                    args += ["p", op.expected_version, pack(op.body), op.key]
                else:
                    assert isinstance(op, Check)
                    args += ["c", op.expected_version, b"", ""]
        with _answering():
            result = await self._commit(keys=keys + sets, args=args)
        failed, actual = int(result[0]), int(result[1])
        if failed:
            op = ops[failed - 1]
            assert isinstance(op, (Put, Check))
            raise StoreConflict(op.kind, op.key, op.expected_version, actual)

    async def read_log(self, log: str, key: str) -> list[Body]:
        self._check_kind(log)
        with _answering():
            items = await self._redis.lrange(self._log_key(log, key), 0, -1)
        return [unpack(_as_bytes(d)) for d in items]

    async def trim_log(self, log: str, key: str, before_ms: int | None) -> int:
        self._check_kind(log)
        k = self._log_key(log, key)
        with _answering():
            return await self._trim(k, before_ms)

    async def _trim(self, k: str, before_ms: int | None) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(k)
                    items = [_as_bytes(d) for d in await pipe.lrange(k, 0, -1)]
                    kept = [] if before_ms is None else [d for d in items if unpack(d)["time_ms"] >= before_ms]
                    pipe.multi()
                    pipe.delete(k)
                    if kept:
                        pipe.rpush(k, *kept)
                    await pipe.execute()
                    return len(items) - len(kept)
                except WatchError:
                    continue  # an append raced us; read again

    async def close(self) -> None:
        await self._redis.aclose()
