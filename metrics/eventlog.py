"""The durable per-session event log: an append-only SQLite table fed by a writer thread.

Callers on the event loop (and on the media path) only ever call :meth:`EventLog.append`,
which puts the entry on a bounded in-memory queue and returns at once. One writer thread
drains the queue and commits entries in batches: a batch closes after ``batch_max`` entries
or ``batch_interval_s`` after its first entry, whichever comes first, and at once on a flush,
a close, or while someone waits in :meth:`EventLog.committed`. SQLite runs in WAL mode so
readers never wait for the writer.

Durability (group commit): :attr:`EventLog.appended` counts the entries accepted so far;
``await log.committed(mark)`` returns once every entry up to ``mark`` is committed (or was
refused by SQLite and counted as dropped). The writer wakes waiters with one
``call_soon_threadsafe`` per commit, and while anyone waits it commits what is queued at
once instead of waiting out the batch window, so many waiting requests share one commit.
The signalling edge waits like this before every reply whose request appended entries:
what a client was told succeeded survives ``kill -9``.

One bad entry never costs another: the writer stores :meth:`LogEntry.made_safe` of every
entry (lone surrogates and control characters replaced, long texts cut, payloads JSON-ready),
and if SQLite still refuses a batch, the batch is split in halves and retried until only the
entries that fail on their own are left; those alone are dropped and counted.

If the writer falls far behind (the queue holds ``max_queue`` entries), new entries are
dropped rather than stalling the room that produced them. Every loss is counted in
``openconsult_eventlog_entries_dropped_total{reason}`` and warned about (at most every 10 s).
:meth:`flush` / :meth:`flush_sync` return once everything appended before the call is
committed.

Queries open their own read connection and run in a worker thread (``asyncio.to_thread``)
from the async API, or directly from the ``*_sync`` twins. They see committed entries only:
flush first if you need to read your own writes.

:class:`EventStore` is the contract and the writer machinery (queue, batches, group commit,
isolation of a bad entry); a backend supplies the connection, the batch insert, the queries and
retention. :class:`EventLog` stores in SQLite (the embedded default);
:class:`metrics.eventlog_pg.PgEventLog` in PostgreSQL (``[eventlog] url``), for nodes on several
hosts. The app picks one from the config; both pass the same contract tests.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from metrics import prometheus
from metrics.events import LogEntry, safe_name
from metrics.prometheus import EventLogDropReason

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE: Final = 100_000
DEFAULT_BATCH_MAX: Final = 2_000
DEFAULT_BATCH_INTERVAL_S: Final = 0.05
DEFAULT_QUERY_LIMIT: Final = 10_000
_WARNING_INTERVAL_S: Final = 10.0

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


class _CommitNow:
    """Queue marker: someone waits in :meth:`EventLog.committed`; commit without waiting."""


_COMMIT_NOW: Final = _CommitNow()

_QueueItem = LogEntry | _Flush | _Close | _CommitNow


def _row(entry: LogEntry) -> tuple[Any, ...]:
    """The SQLite row of ``entry`` made safe: encodable by construction."""
    safe = entry.made_safe()
    return (
        safe.time_ms,
        safe.session_id,
        safe.connection_id,
        safe.stream_id,
        safe.kind,
        safe_name(safe.component),
        safe.text,
        json.dumps(safe.payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
    )


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class _RateLimited:
    """At most one log line per interval for one kind of trouble (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -_WARNING_INTERVAL_S

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last < _WARNING_INTERVAL_S:
                return False
            self._last = now
            return True


class EventStore(ABC):
    """The event log contract and its writer machinery, whatever stores the entries.

    :param where: names the store in log lines and the writer thread's name.
    :param max_queue: entries held in memory before :meth:`append` starts dropping.
    :param batch_max: most entries committed in one transaction.
    :param batch_interval_s: longest an entry waits in memory for its batch to fill (when
        nobody waits for it in :meth:`committed`).
    :param before_write: test hook called in the writer thread with each batch before it is
        written, and again with each half of a batch the store refused; an exception it raises
        counts as the store refusing those entries (lets tests simulate a slow or failing disk).

    A backend creates its schema, then calls :meth:`_start_writer`.
    """

    def __init__(
        self,
        where: str,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_interval_s: float = DEFAULT_BATCH_INTERVAL_S,
        before_write: Callable[[Sequence[LogEntry]], object] | None = None,
    ) -> None:
        if max_queue < 1 or batch_max < 1 or batch_interval_s < 0:
            raise ValueError("max_queue and batch_max must be >= 1, batch_interval_s >= 0")
        self._where = where
        self._batch_max = batch_max
        self._batch_interval_s = batch_interval_s
        self._before_write = before_write
        self._queue: queue.Queue[_QueueItem] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._close_lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._drop_warning = _RateLimited()
        self._failure_warning = _RateLimited()
        self.dropped = 0  # entries this instance dropped (the Prometheus counter is process-wide)
        self.written = 0  # entries this instance committed
        # Group commit. Entries get their number under _append_lock in queue order, so the
        # writer knows the number of each entry it takes: the n-th entry taken is entry n.
        self._append_lock = threading.Lock()
        self._appended = 0  # entries accepted into the queue (dropped ones are not numbered)
        self._taken = 0  # writer thread: entries taken off the queue
        self._handled = 0  # entries committed or refused: waiters up to here may go
        self._wanted = 0  # highest mark anyone waits for (set on the loop, read by the writer)
        self._commit_requested = False  # a _CommitNow marker is queued
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap, on self._loop only
        self._waiter_ids = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer = threading.Thread(target=self._run_writer, name=f"eventlog-writer:{where}", daemon=True)

    def _start_writer(self) -> None:
        self._writer.start()

    # --- what a backend supplies -----------------------------------------------------------

    @abstractmethod
    def _open_writer(self) -> Any:
        """The writer thread's connection (opened in the writer thread)."""

    @abstractmethod
    def _close_writer(self, conn: Any) -> None:
        """Release the writer thread's connection."""

    @abstractmethod
    def _insert(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        """Commit ``rows`` (from :meth:`_row`) in one transaction, or raise and commit none."""

    def _row(self, entry: LogEntry) -> tuple[Any, ...]:
        """The stored row of ``entry``, made safe (see :func:`_row`)."""
        return _row(entry)

    @abstractmethod
    def events_sync(
        self,
        session_id: str,
        kinds: Iterable[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """Committed entries of one session, oldest first (by time, then write order).

        ``kinds`` keeps only those kinds; ``since_ms`` is inclusive, ``until_ms`` exclusive.
        Each dict has the :class:`LogEntry` fields, ``payload`` decoded, plus ``seq``.
        """

    @abstractmethod
    def sessions_sync(
        self,
        since_ms: int,
        until_ms: int,
        text: str | None = None,
        limit: int = 1_000,
        *,
        room: str | None = None,
        name: str | None = None,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Back-office search: sessions with entries in ``[since_ms, until_ms)``, newest first
        (see :meth:`EventLog.sessions_sync` for the filters)."""

    @abstractmethod
    def delete_before_sync(self, before_ms: int) -> int:
        """Retention: delete every entry older than ``before_ms``; returns how many."""

    @abstractmethod
    def anonymise_before_sync(self, before_ms: int, chunk: int = 1_000) -> int:
        """Retention: anonymise every entry older than ``before_ms``; returns how many changed."""

    # --- writing ---------------------------------------------------------------------------

    def append(self, entry: LogEntry) -> None:
        """Queue ``entry`` for writing. Never blocks and never raises on a full queue.

        Thread-safe. Once the log is closed, or when the queue is full, the entry is dropped
        and counted (and not numbered in :attr:`appended`, so nobody waits for it).
        """
        if self._closed:
            self._drop(1, EventLogDropReason.CLOSED)
            return
        with self._append_lock:
            try:
                self._queue.put_nowait(entry)
            except queue.Full:
                pass
            else:
                self._appended += 1
                return
        self._drop(1, EventLogDropReason.QUEUE_FULL)

    def extend(self, entries: Iterable[LogEntry]) -> None:
        """:meth:`append` each of ``entries``."""
        for entry in entries:
            self.append(entry)

    @property
    def appended(self) -> int:
        """Entries accepted so far (a monotonic count): the mark for :meth:`committed`."""
        return self._appended

    async def committed(self, mark: int) -> None:
        """Return once every entry up to ``mark`` (an earlier :attr:`appended`) is committed.

        Entries SQLite refused count as done (they are dropped and counted), and so does
        everything once the log is closed: this never waits for an entry that cannot come.
        While anyone waits, the writer commits at once (group commit); it wakes waiters with
        one thread hop per commit. Call it from one event loop.
        """
        mark = min(mark, self._appended)
        if mark <= self._handled or not self._writer.is_alive():
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if any(not waiter.done() for _, _, waiter in self._waiters):
                raise RuntimeError("EventLog.committed() is waited on from another event loop")
            self._waiters.clear()  # cancelled waiters of a loop that is gone
            self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        self._waiter_ids += 1
        heapq.heappush(self._waiters, (mark, self._waiter_ids, future))
        # Say what is wanted, then look again: the writer publishes _handled, then reads
        # _wanted, so one of the two sides sees the other.
        self._wanted = max(self._wanted, mark)
        if mark <= self._handled or not self._writer.is_alive():
            self._wake_waiters()
        elif not self._commit_requested:
            # Wake a writer that waits out its batch window; a full queue needs no marker (the
            # writer takes full batches without waiting and then sees _wanted).
            self._commit_requested = True
            try:
                self._queue.put_nowait(_COMMIT_NOW)
            except queue.Full:
                self._commit_requested = False
        await future

    async def committed_since(self, mark: int) -> None:
        """If entries were appended since ``mark`` (an earlier :attr:`appended`), wait until
        they are all committed; otherwise return at once."""
        now = self._appended
        if now != mark:
            await self.committed(now)

    def _wake_waiters(self) -> None:
        """On the waiters' loop: release every waiter whose mark is handled."""
        handled = self._handled if self._writer.is_alive() else self._appended
        while self._waiters and self._waiters[0][0] <= handled:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def _publish_handled(self, handled: int) -> None:
        """Writer thread: entries up to ``handled`` are done; wake whoever waits for them."""
        previous = self._handled
        self._handled = handled
        loop = self._loop
        if loop is not None and self._wanted > previous:
            try:
                loop.call_soon_threadsafe(self._wake_waiters)
            except RuntimeError:  # the loop is closed: nobody is left to wake
                pass

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

    def _drop(self, count: int, reason: EventLogDropReason) -> None:
        prometheus.EVENTLOG_ENTRIES_DROPPED.labels(reason=reason.value).inc(count)
        with self._drop_lock:
            self.dropped += count
        # Rate-limited: a writer that is behind would otherwise add a log line per entry.
        if self._drop_warning.due():
            logger.warning("Dropping event-log entries for %s: %s (%d dropped so far)", self._where, reason.value,
                           self.dropped)

    # --- the writer thread -----------------------------------------------------------------

    def _run_writer(self) -> None:
        conn = self._open_writer()
        try:
            while True:
                batch, markers, closing = self._next_batch()
                if batch:
                    self._write(conn, batch)
                self._publish_handled(self._taken)
                for marker in markers:
                    marker.done.set()
                prometheus.EVENTLOG_ENTRIES_QUEUED.set(self._queue.qsize())
                if closing:
                    return
        finally:
            self._close_writer(conn)
            # An append that raced close() may have queued an entry behind the close marker.
            left = 0
            while True:
                try:
                    left += isinstance(self._queue.get_nowait(), LogEntry)
                except queue.Empty:
                    break
            if left:
                self._drop(left, EventLogDropReason.CLOSED)
            # Whatever happened, nobody waits for this writer any more.
            self._handled = self._appended
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._wake_waiters)
                except RuntimeError:
                    pass

    def _next_batch(self) -> tuple[list[LogEntry], list[_Flush], bool]:
        """Wait for an item, then gather more until the batch is full, old enough, wanted by a
        waiter, or a marker comes."""
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
            if isinstance(item, _CommitNow):
                self._commit_requested = False
                if batch:
                    return batch, markers, False
            else:
                batch.append(item)
                self._taken += 1
                if len(batch) >= self._batch_max:
                    return batch, markers, False
            # Take what is already queued without waiting; wait only until the deadline, and
            # not at all while someone waits for an entry already taken.
            try:
                item = self._queue.get_nowait()
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if (batch and self._wanted > self._handled) or remaining <= 0:
                return batch, markers, False
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return batch, markers, False

    def _write(self, conn: Any, batch: list[LogEntry]) -> None:
        """Commit ``batch``; if the store refuses it, retry each half until only the entries that
        fail on their own are left, and drop and count just those."""
        rows: list[tuple[Any, ...]] = []
        entries: list[LogEntry] = []
        for entry in batch:
            try:
                rows.append(self._row(entry))
                entries.append(entry)
            except Exception as exc:  # made_safe() never raises; this is the last line of defence
                self._refused(1, exc)
        pending = [(0, len(rows))]
        while pending:
            start, end = pending.pop()
            try:
                if self._before_write is not None:
                    self._before_write(entries[start:end])
                self._insert(conn, rows[start:end])
            except Exception as exc:
                if end - start == 1:
                    self._refused(1, exc)
                    continue
                middle = (start + end) // 2
                pending.extend([(middle, end), (start, middle)])  # first half first: keep order
                continue
            self.written += end - start
            prometheus.EVENTLOG_ENTRIES_WRITTEN.inc(end - start)

    def _refused(self, count: int, exc: Exception) -> None:
        # The writer must outlive a bad entry (and a bad disk): count, warn now and then, go on.
        if self._failure_warning.due():
            logger.warning("Event-log writer could not write an entry to %s: %r", self._where, exc)
        self._drop(count, EventLogDropReason.WRITE_FAILED)

    # --- queries (async) -------------------------------------------------------------------

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

    async def sessions(
        self,
        since_ms: int,
        until_ms: int,
        text: str | None = None,
        limit: int = 1_000,
        *,
        room: str | None = None,
        name: str | None = None,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`sessions_sync` in a worker thread."""
        return await asyncio.to_thread(lambda: self.sessions_sync(since_ms, until_ms, text, limit, room=room,
                                                                  name=name, session_id=session_id))

    # --- retention -------------------------------------------------------------------------

    async def delete_before(self, before_ms: int) -> int:
        return await asyncio.to_thread(self.delete_before_sync, before_ms)

    async def anonymise_before(self, before_ms: int) -> int:
        return await asyncio.to_thread(self.anonymise_before_sync, before_ms)


class EventLog(EventStore):
    """Append-only, durable event log in one SQLite file (WAL mode).

    :param path: the database file; created with its table on first use, reopened as is after.
    The other parameters are :class:`EventStore`'s.
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
        self.path = Path(path)
        super().__init__(str(self.path), max_queue=max_queue, batch_max=batch_max,
                         batch_interval_s=batch_interval_s, before_write=before_write)
        # Create the schema here, synchronously, so a bad path fails the constructor.
        conn = self._connect()
        try:
            conn.executescript(_SCHEMA)
        finally:
            conn.close()
        self._start_writer()

    def _open_writer(self) -> sqlite3.Connection:
        return self._connect()

    def _close_writer(self, conn: Any) -> None:
        conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash or power
        # loss can lose the last transactions.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _insert(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

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

    def sessions_sync(
        self,
        since_ms: int,
        until_ms: int,
        text: str | None = None,
        limit: int = 1_000,
        *,
        room: str | None = None,
        name: str | None = None,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Back-office search: sessions with entries in ``[since_ms, until_ms)``, newest first.

        ``text`` (case-insensitive substring) keeps sessions where some entry in the window
        mentions it in its session, connection or stream id, or its text (names, roles…).
        ``room`` keeps sessions of that room (exactly: a consultation's session id, or the
        ``room`` of its connect and video-session entries); ``name`` (substring) sessions a
        participant of that name joined; ``session_id`` (substring) sessions whose id holds it.
        The filters combine. Each dict: ``session_id``, ``first_ms``, ``last_ms``, ``count``
        (counted over the window).
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
        if room:
            text_filter += (
                " AND (session_id = ? OR session_id IN (SELECT DISTINCT session_id FROM events"
                " WHERE time_ms >= ? AND time_ms < ? AND kind = 'VideoSession'"
                " AND json_extract(payload, '$.room') = ?))"
            )
            params.extend([room, since_ms, until_ms, room])
        if name:
            text_filter += (
                " AND session_id IN (SELECT DISTINCT session_id FROM events"
                " WHERE time_ms >= ? AND time_ms < ? AND kind = 'serverDetectedConnect'"
                " AND json_extract(payload, '$.name') LIKE ? ESCAPE '\\')"
            )
            params.extend([since_ms, until_ms, f"%{_like_escape(name)}%"])
        if session_id:
            text_filter += " AND session_id LIKE ? ESCAPE '\\'"
            params.append(f"%{_like_escape(session_id)}%")
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

    # --- retention -------------------------------------------------------------------------

    def _write_connection(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.row_factory = sqlite3.Row
        return conn

    def delete_before_sync(self, before_ms: int) -> int:
        """Retention: delete every entry older than ``before_ms`` (event log, quality timeline and
        client stats alike). Returns how many were deleted."""
        conn = self._write_connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            deleted = conn.execute("DELETE FROM events WHERE time_ms < ?", (before_ms,)).rowcount
            conn.execute("COMMIT")
        finally:
            conn.close()
        return int(deleted)

    def anonymise_before_sync(self, before_ms: int, chunk: int = 1_000) -> int:
        """Retention: replace the personal data of every entry older than ``before_ms`` (see
        :func:`anonymised`), ``chunk`` entries per transaction. Entries anonymised earlier are
        left alone. Returns how many were changed."""
        changed = 0
        conn = self._write_connection()
        try:
            last = 0
            while True:
                rows = conn.execute(
                    "SELECT seq, kind, payload FROM events WHERE time_ms < ? AND seq > ?"
                    " AND json_extract(payload, '$.anonymised') IS NULL ORDER BY seq LIMIT ?",
                    (before_ms, last, chunk)).fetchall()
                if not rows:
                    return changed
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for row in rows:
                        text, payload = anonymised(row["kind"], json.loads(row["payload"]))
                        conn.execute("UPDATE events SET text = ?, payload = ? WHERE seq = ?",
                                     (text, json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
                                      row["seq"]))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                changed += len(rows)
                last = rows[-1]["seq"]
        finally:
            conn.close()


#: Payload keys that hold personal data: names, patient and staff references, IP addresses, user
#: agents. Anonymisation removes them at every nesting level.
PERSONAL_KEYS: Final = frozenset({
    "name", "patient_name", "clinician_name", "display_name", "user", "user_name",
    "patient", "patient_ref", "clinician", "sender", "by", "author", "admitted_by", "added_by", "sub",
    "ip", "client_ip", "remote_ip", "address", "remote_address", "forwarded_for",
    "user_agent", "userAgent", "ua",
})


def _without_personal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_personal(v) for k, v in value.items() if k not in PERSONAL_KEYS}
    if isinstance(value, list):
        return [_without_personal(v) for v in value]
    return value


def anonymised(kind: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An entry's text and payload without personal data: the text (a sentence that names people)
    becomes a neutral one naming the kind; personal payload keys (:data:`PERSONAL_KEYS`) go; what
    support and statistics need (times, durations, reasons, figures, random ids) stays, and the
    payload is marked ``"anonymised": true``."""
    kept = _without_personal(payload)
    return f"{kind} entry (personal data removed by the retention policy).", {**kept, "anonymised": True}
