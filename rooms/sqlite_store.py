"""The SQLite store: the embedded default. One file, WAL, survives restarts.

Documents live in ``docs(kind, key, version, body)``, logs in ``logs(log, key, seq, time_ms,
body)``; bodies are msgpack. A commit is one ``BEGIN IMMEDIATE`` transaction that checks every
expected version and writes, so two stores (or two processes) on one file serialise on SQLite's
write lock and a stale compare-and-set is refused. ``synchronous=FULL``: a commit that returned is
on disk. Blocking calls run in a worker thread, one at a time per store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

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

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    log TEXT NOT NULL,
    key TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_key ON logs (log, key, seq);
"""


class SqliteStore:
    """``SqliteStore(path)``; ``":memory:"`` works too (one connection, so one store)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        self._closed = False

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                if self._closed:
                    raise RuntimeError("store is closed")
                return fn(self._conn)

        return await asyncio.to_thread(locked)

    async def get(self, kind: str, key: str) -> Doc | None:
        def q(c: sqlite3.Connection) -> Doc | None:
            row = c.execute("SELECT version, body FROM docs WHERE kind=? AND key=?", (kind, key)).fetchone()
            return None if row is None else Doc(int(row[0]), unpack(row[1]))

        return await self._run(q)

    async def keys(self, kind: str) -> list[str]:
        def q(c: sqlite3.Connection) -> list[str]:
            return [r[0] for r in c.execute("SELECT key FROM docs WHERE kind=? ORDER BY key", (kind,))]

        return await self._run(q)

    async def commit(self, ops: Sequence[Op]) -> None:
        validate_ops(ops)
        packed = [
            (op, pack(op.body) if isinstance(op, Put) else pack(op.item) if isinstance(op, Append) else b"")
            for op in ops
        ]

        def tx(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                for op, _ in packed:
                    if isinstance(op, (Put, Check)):
                        row = c.execute(
                            "SELECT version FROM docs WHERE kind=? AND key=?", (op.kind, op.key)
                        ).fetchone()
                        actual = 0 if row is None else int(row[0])
                        if actual != op.expected_version:
                            raise StoreConflict(op.kind, op.key, op.expected_version, actual)
                for op, data in packed:
                    if isinstance(op, Put):
                        c.execute(
                            "INSERT INTO docs (kind, key, version, body) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (kind, key) DO UPDATE SET version=excluded.version, body=excluded.body",
                            (op.kind, op.key, op.expected_version + 1, data),
                        )
                    elif isinstance(op, Append):
                        c.execute(
                            "INSERT INTO logs (log, key, time_ms, body) VALUES (?, ?, ?, ?)",
                            (op.log, op.key, int(op.item["time_ms"]), data),
                        )
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

        await self._run(tx)

    async def read_log(self, log: str, key: str) -> list[Body]:
        def q(c: sqlite3.Connection) -> list[Body]:
            rows = c.execute("SELECT body FROM logs WHERE log=? AND key=? ORDER BY seq", (log, key))
            return [unpack(r[0]) for r in rows]

        return await self._run(q)

    async def trim_log(self, log: str, key: str, before_ms: int | None) -> int:
        def q(c: sqlite3.Connection) -> int:
            if before_ms is None:
                cur = c.execute("DELETE FROM logs WHERE log=? AND key=?", (log, key))
            else:
                cur = c.execute(
                    "DELETE FROM logs WHERE log=? AND key=? AND time_ms < ?", (log, key, before_ms)
                )
            return int(cur.rowcount)

        return await self._run(q)

    async def close(self) -> None:
        def q() -> None:
            with self._lock:
                if not self._closed:
                    self._closed = True
                    self._conn.close()

        await asyncio.to_thread(q)
