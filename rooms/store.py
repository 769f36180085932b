"""The store contract and its in-memory implementation.

A store holds two things:

- versioned documents, addressed by ``(kind, key)``: a plain dict body (msgpack-able: str, int,
  float, bool, None, list, dict) and a version that starts at 1 and grows by one per write;
- append-only logs, addressed by ``(log, key)``: dict items in append order, each with a
  ``time_ms`` so retention can trim them.

All writes go through :meth:`Store.commit`, an all-or-nothing batch of compare-and-set puts,
version checks and appends. If any expected version is stale the whole batch is refused with
:class:`StoreConflict` and nothing changes — that is how two nodes admitting the same patient
resolve to one winner. Documents are never deleted (a delete would let a stale version match a new
incarnation of the key); callers write a tombstone body instead.

Implementations: :class:`MemoryStore` (here; tests and single-process use),
``rooms.sqlite_store.SqliteStore`` (the default) and ``rooms.redis_store.RedisStore``.
All pass ``tests/rooms/test_store_contract.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from rooms.errors import Conflict

Body = dict[str, Any]


class StoreConflict(Conflict):
    """A compare-and-set in a commit found another version than expected."""

    def __init__(self, kind: str, key: str, expected: int, actual: int) -> None:
        self.kind = kind
        self.key = key
        self.expected = expected
        self.actual = actual
        super().__init__(f'{kind} "{key}" is at version {actual}, expected {expected}')


@dataclass(frozen=True, slots=True)
class Doc:
    version: int
    body: Body


@dataclass(frozen=True, slots=True)
class Put:
    """Write ``body`` if the document is at ``expected_version`` (0: it must not exist yet)."""

    kind: str
    key: str
    body: Mapping[str, Any]
    expected_version: int


@dataclass(frozen=True, slots=True)
class Check:
    """Refuse the commit unless the document is still at ``expected_version``; write nothing."""

    kind: str
    key: str
    expected_version: int


@dataclass(frozen=True, slots=True)
class Append:
    """Append ``item`` (which must carry an int ``time_ms``) to the log ``(log, key)``."""

    log: str
    key: str
    item: Mapping[str, Any]


Op = Put | Check | Append


class Store(Protocol):
    """The contract every store implements. All methods are safe to call concurrently."""

    async def get(self, kind: str, key: str) -> Doc | None: ...

    async def keys(self, kind: str) -> list[str]:
        """Every key of ``kind``, sorted."""
        ...

    async def commit(self, ops: Sequence[Op]) -> None:
        """Apply all ``ops`` atomically, or raise :class:`StoreConflict` and apply none."""
        ...

    async def read_log(self, log: str, key: str) -> list[Body]:
        """The log's items in append order."""
        ...

    async def trim_log(self, log: str, key: str, before_ms: int | None) -> int:
        """Delete items with ``time_ms < before_ms`` (all items if None); return how many."""
        ...

    async def close(self) -> None: ...


def pack(body: Mapping[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Body:
    value = msgpack.unpackb(data, raw=False)
    if not isinstance(value, dict):
        raise TypeError("stored value is not a map")
    return value


def validate_ops(ops: Sequence[Op]) -> None:
    """Shared input checks so every implementation rejects the same bad batches."""
    seen: set[tuple[str, str]] = set()
    for op in ops:
        if isinstance(op, Append):
            if not isinstance(op.item.get("time_ms"), int):
                raise ValueError(f"log item for {op.log}/{op.key} needs an int time_ms")  # noqa: TRY004
            continue
        if op.expected_version < 0:
            raise ValueError("expected_version must be >= 0")
        if (op.kind, op.key) in seen:
            raise ValueError(f'{op.kind} "{op.key}" appears twice in one commit')
        seen.add((op.kind, op.key))


class MemoryStore:
    """Dicts in one process. Bodies round-trip through msgpack so they behave like stored ones."""

    def __init__(self) -> None:
        self._docs: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._logs: dict[tuple[str, str], list[bytes]] = {}

    async def get(self, kind: str, key: str) -> Doc | None:
        found = self._docs.get((kind, key))
        return None if found is None else Doc(found[0], unpack(found[1]))

    async def keys(self, kind: str) -> list[str]:
        return sorted(k for (kd, k) in self._docs if kd == kind)

    async def commit(self, ops: Sequence[Op]) -> None:
        validate_ops(ops)
        # No await between the checks and the writes: atomic on one event loop.
        for op in ops:
            if isinstance(op, (Put, Check)):
                actual = self._docs.get((op.kind, op.key), (0, b""))[0]
                if actual != op.expected_version:
                    raise StoreConflict(op.kind, op.key, op.expected_version, actual)
        packed = [(op, pack(op.body if isinstance(op, Put) else op.item)) for op in ops if not isinstance(op, Check)]
        for op, data in packed:
            if isinstance(op, Put):
                self._docs[(op.kind, op.key)] = (op.expected_version + 1, data)
            elif isinstance(op, Append):
                self._logs.setdefault((op.log, op.key), []).append(data)

    async def read_log(self, log: str, key: str) -> list[Body]:
        return [unpack(d) for d in self._logs.get((log, key), [])]

    async def trim_log(self, log: str, key: str, before_ms: int | None) -> int:
        items = self._logs.get((log, key), [])
        kept = [] if before_ms is None else [d for d in items if unpack(d)["time_ms"] >= before_ms]
        removed = len(items) - len(kept)
        if items:
            self._logs[(log, key)] = kept
        return removed

    async def close(self) -> None:
        return None

    def snapshot(self) -> tuple[dict[tuple[str, str], tuple[int, bytes]], dict[tuple[str, str], list[bytes]]]:
        """A copy of everything, for tests that assert "nothing changed"."""
        return dict(self._docs), {k: list(v) for k, v in self._logs.items()}
