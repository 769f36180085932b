"""The durable per-session event log: an append-only SQLite table fed by a writer thread.

Callers on the event loop (and on the media path) only ever call :meth:`EventLog.append`,
which puts the entry on a bounded in-memory queue and returns at once. One writer thread
drains the queue and commits entries in batches: a batch closes after ``batch_max`` entries
or ``batch_interval_s`` after its first entry, whichever comes first, and at once on a flush
or close. SQLite runs in WAL mode so readers never wait for the writer.

If the writer falls far behind (the queue holds ``max_queue`` entries), new entries are
dropped, counted in ``openconsult_eventlog_entries_dropped_total`` and a warning is logged,
rather than stalling the room that produced them. Acknowledged means flushed:
:meth:`flush` / :meth:`flush_sync` return once everything appended before the call is
committed.

Queries open their own read connection and run in a worker thread (``asyncio.to_thread``)
from the async API, or directly from the ``*_sync`` twins. They see committed entries only:
flush first if you need to read your own writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from metrics import prometheus
from metrics.events import LogEntry

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE: Final = 100_000
DEFAULT_BATCH_MAX: Final = 2_000
DEFAULT_BATCH_INTERVAL_S: Final = 0.05
DEFAULT_QUERY_LIMIT: Final = 10_000
_DROP_WARNING_INTERVAL_S: Final = 10.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq           INTEGER PRIMARY KEY,  -- insertion order, tie-break for equal times
    time_ms       INTEGER NOT NULL,
    session_id    TEXT NOT NULL,
    connection_id TEXT,
    stream_id     TEXT,
    kind          TEXT NOT NULL,
    component     TEXT NOT NULL,
    text          TEXT NOT NULL,
    payload       TEXT NOT NULL         -- JSON object
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session_id, time_ms, seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events (time_ms);
"""

_INSERT: Final = (
    "INSERT INTO events (time_ms, session_id, connection_id, stream_id, kind, component, text, payload)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS: Final = "seq, time_ms, session_id, connection_id, stream_id, kind, component, text, payload"


@dataclass(slots=True)
class _Flush:
    """Queue marker: the writer commits what it holds, then sets ``done``."""

    done: threading.Event


class _Close:
    """Queue marker: the writer commits what it holds and exits."""


_QueueItem = LogEntry | _Flush | _Close


def _payload_json(entry: LogEntry) -> str:
    try:
        return json.dumps(dict(entry.payload), separators=(",", ":"), ensure_ascii=False, default=str)
    except Exception as exc:
        # One bad payload must not cost the rest of its batch: keep the entry, say why.
        logger.warning("Unserialisable payload in %s entry for %s: %r", entry.kind, entry.session_id, exc)
        return json.dumps({"payload_error": f"not serialisable: {type(exc).__name__}"})


def _row(entry: LogEntry) -> tuple[Any, ...]:
    return (
        entry.time_ms,
        entry.session_id,
        entry.connection_id,
        entry.stream_id,
        str(entry.kind),
        str(entry.component),
        entry.text,
        _payload_json(entry),
    )


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class EventLog:
    """Append-only, durable event log in one SQLite file (WAL mode).

    :param path: the database file; created with its table on first use, reopened as is after.
    :param max_queue: entries held in memory before :meth:`append` starts dropping.
    :param batch_max: most entries committed in one transaction.
    :param batch_interval_s: longest an entry waits in memory for its batch to fill.
    :param before_write: test hook called in the writer thread with each batch before it is
        written (lets tests simulate a slow disk).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_interval_s: float = DEFAULT_BATCH_INTERVAL_S,
        before_write: Callable[[Sequence[LogEntry]], object] | None = None,
    ) -> None:
        if max_queue < 1 or batch_max < 1 or batch_interval_s < 0:
            raise ValueError("max_queue and batch_max must be >= 1, batch_interval_s >= 0")
        self.path = Path(path)
        self._batch_max = batch_max
        self._batch_interval_s = batch_interval_s
        self._before_write = before_write
        self._queue: queue.Queue[_QueueItem] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._close_lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._last_drop_warning = 0.0
        self.dropped = 0  # entries this instance dropped (the Prometheus counter is process-wide)
        self.written = 0  # entries this instance committed

        # Create the schema here, synchronously, so a bad path fails the constructor.
        conn = self._connect()
        try:
            conn.executescript(_SCHEMA)
        finally:
            conn.close()
        self._writer = threading.Thread(target=self._run_writer, name=f"eventlog-writer:{self.path.name}", daemon=True)
        self._writer.start()

    # --- writing ---------------------------------------------------------------------------

    def append(self, entry: LogEntry) -> None:
        """Queue ``entry`` for writing. Never blocks and never raises on a full queue.

        Thread-safe. Once the log is closed, or when the queue is full, the entry is dropped
        and counted.
        """
        if self._closed:
            self._drop(1, "event log is closed")
            return
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._drop(1, "event-log writer is behind, queue full")

    def extend(self, entries: Iterable[LogEntry]) -> None:
        """:meth:`append` each of ``entries``."""
        for entry in entries:
            self.append(entry)

    def flush_sync(self, timeout: float | None = None) -> bool:
        """Block until every entry appended before this call is committed (or dropped).

        Returns False if ``timeout`` seconds passed first. Not for the event loop: use
        :meth:`flush` there.
        """
        if self._closed or not self._writer.is_alive():
            return True
        marker = _Flush(threading.Event())
        # A flush may wait for room in the queue: flushing is allowed to block, appending is not.
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(timeout)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait, off the event loop, until every entry appended so far is committed."""
        return await asyncio.to_thread(self.flush_sync, timeout)

    def close(self) -> None:
        """Flush, stop the writer thread and release the file. Idempotent; blocks until done."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_Close())
        self._writer.join()

    async def aclose(self) -> None:
        """:meth:`close` off the event loop."""
        await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        """Entries waiting for the writer (approximate)."""
        return self._queue.qsize()

    def _drop(self, count: int, why: str) -> None:
        prometheus.EVENTLOG_ENTRIES_DROPPED.inc(count)
        now = time.monotonic()
        with self._drop_lock:
            self.dropped += count
            # Rate-limited: a writer that is behind would otherwise add a log line per entry.
            if now - self._last_drop_warning < _DROP_WARNING_INTERVAL_S:
                return
            self._last_drop_warning = now
        logger.warning("Dropping event-log entries for %s: %s (%d dropped so far)", self.path, why, self.dropped)

    # --- the writer thread -----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash or power
        # loss can lose the last transactions.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _run_writer(self) -> None:
        conn = self._connect()
        try:
            while True:
                batch, markers, closing = self._next_batch()
                if batch:
                    self._write(conn, batch)
                for marker in markers:
                    marker.done.set()
                prometheus.EVENTLOG_ENTRIES_QUEUED.set(self._queue.qsize())
                if closing:
                    return
        finally:
            conn.close()

    def _next_batch(self) -> tuple[list[LogEntry], list[_Flush], bool]:
        """Wait for an item, then gather more until the batch is full, old enough, or a marker comes."""
        batch: list[LogEntry] = []
        markers: list[_Flush] = []
        item = self._queue.get()
        deadline = time.monotonic() + self._batch_interval_s
        while True:
            if isinstance(item, _Close):
                return batch, markers, True
            if isinstance(item, _Flush):
                markers.append(item)
                return batch, markers, False
            batch.append(item)
            if len(batch) >= self._batch_max:
                return batch, markers, False
            # Take what is already queued without waiting; wait only until the deadline.
            try:
                item = self._queue.get_nowait()
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return batch, markers, False
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return batch, markers, False

    def _write(self, conn: sqlite3.Connection, batch: list[LogEntry]) -> None:
        try:
            if self._before_write is not None:
                self._before_write(batch)
            rows = [_row(entry) for entry in batch]
            conn.execute("BEGIN")
            try:
                conn.executemany(_INSERT, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except Exception:
            # The writer must outlive a bad batch (disk full, locked file…): count and go on.
            logger.exception("Event-log writer failed to write %d entries to %s", len(batch), self.path)
            self._drop(len(batch), "write failed")
            return
        self.written += len(batch)
        prometheus.EVENTLOG_ENTRIES_WRITTEN.inc(len(batch))

    # --- queries ---------------------------------------------------------------------------

    def _read_connection(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        conn.row_factory = sqlite3.Row
        return conn

    def events_sync(
        self,
        session_id: str,
        kinds: Iterable[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """Committed entries of one session, oldest first (by time, then insertion order).

        ``kinds`` keeps only those kinds; ``since_ms`` is inclusive, ``until_ms`` exclusive.
        Each dict has the :class:`LogEntry` fields, ``payload`` decoded, plus ``seq``.
        """
        where = ["session_id = ?"]
        params: list[Any] = [session_id]
        if kinds is not None:
            kind_list = [str(k) for k in kinds]
            if not kind_list:
                return []
            where.append(f"kind IN ({', '.join('?' * len(kind_list))})")
            params.extend(kind_list)
        if since_ms is not None:
            where.append("time_ms >= ?")
            params.append(since_ms)
        if until_ms is not None:
            where.append("time_ms < ?")
            params.append(until_ms)
        params.append(limit)
        sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY time_ms, seq LIMIT ?"
        conn = self._read_connection()
        try:
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        return [{**dict(row), "payload": json.loads(row["payload"])} for row in rows]

    async def events(
        self,
        session_id: str,
        kinds: Iterable[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """:meth:`events_sync` in a worker thread."""
        kind_list = None if kinds is None else list(kinds)
        return await asyncio.to_thread(self.events_sync, session_id, kind_list, since_ms, until_ms, limit)

    def sessions_sync(
        self,
        since_ms: int,
        until_ms: int,
        text: str | None = None,
        limit: int = 1_000,
    ) -> list[dict[str, Any]]:
        """Back-office search: sessions with entries in ``[since_ms, until_ms)``, newest first.

        ``text`` (case-insensitive substring) keeps sessions where some entry in the window
        mentions it in its session, connection or stream id, or its text (names, roles…).
        Each dict: ``session_id``, ``first_ms``, ``last_ms``, ``count`` (counted over the
        window).
        """
        params: list[Any] = [since_ms, until_ms]
        text_filter = ""
        if text:
            pattern = f"%{_like_escape(text)}%"
            text_filter = (
                " AND session_id IN (SELECT DISTINCT session_id FROM events"
                " WHERE time_ms >= ? AND time_ms < ? AND ("
                " session_id LIKE ? ESCAPE '\\' OR connection_id LIKE ? ESCAPE '\\'"
                " OR stream_id LIKE ? ESCAPE '\\' OR text LIKE ? ESCAPE '\\'))"
            )
            params.extend([since_ms, until_ms, pattern, pattern, pattern, pattern])
        params.append(limit)
        sql = (
            "SELECT session_id, MIN(time_ms) AS first_ms, MAX(time_ms) AS last_ms, COUNT(*) AS count"
            f" FROM events WHERE time_ms >= ? AND time_ms < ?{text_filter}"
            " GROUP BY session_id ORDER BY last_ms DESC, session_id LIMIT ?"
        )
        conn = self._read_connection()
        try:
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        return [dict(row) for row in rows]

    async def sessions(
        self,
        since_ms: int,
        until_ms: int,
        text: str | None = None,
        limit: int = 1_000,
    ) -> list[dict[str, Any]]:
        """:meth:`sessions_sync` in a worker thread."""
        return await asyncio.to_thread(self.sessions_sync, since_ms, until_ms, text, limit)
