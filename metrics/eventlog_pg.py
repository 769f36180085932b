"""The event log in PostgreSQL (``[eventlog] url``): one log for nodes on several hosts.

Same contract as :class:`metrics.eventlog.EventLog` (the writer machinery is
:class:`metrics.eventlog.EventStore`'s: bounded queue, batches, group commit, a bad entry
isolated by halving): only the storage differs.

- Writes: the writer thread holds one sync psycopg 3 connection and commits each batch with one
  ``COPY`` in one transaction. A connection found broken (PostgreSQL restarted) is reopened and
  the batch tried again at once; while PostgreSQL cannot be reached, batches are refused without
  a connect attempt for :data:`RECONNECT_INTERVAL_S` after each failed one, and their entries are
  dropped and counted as ``write_failed``.
- Order across nodes: every row carries ``node_id`` and ``seq`` (a shared sequence, so unique and
  increasing per node); a session reads ordered by ``(time_ms, node_id, seq)``, the same complete
  order from any node, whatever node wrote each entry.
- Partitions: ``events`` is partitioned by range of ``time_ms``, one partition per UTC day
  (``events_dYYYYMMDD``), created by the writer on first use. Retention drops the partitions that
  end before the cut-off and deletes the rest of the boundary day.
- Payloads are stored as the same JSON text as in SQLite; the queries that look inside a payload
  cast it to ``jsonb`` (entries are made safe before writing, so the text is always valid JSON
  without NUL characters).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from metrics.audit import AUDIT_TYPES, CHAT_CONTENT_KEYS, ERROR_EVENT_KINDS, LogQuery, LogType, search
from metrics.eventlog import (
    DEFAULT_BATCH_INTERVAL_S,
    DEFAULT_BATCH_MAX,
    DEFAULT_MAX_QUEUE,
    DEFAULT_QUERY_LIMIT,
    EventStore,
    _like_escape,
    _row,
    anonymised,
)
from metrics.events import LogEntry

DAY_MS: Final = 86_400_000
#: After a failed connect, the writer refuses batches without trying for this long.
RECONNECT_INTERVAL_S: Final = 1.0

_SCHEMA: Final = (
    "CREATE SEQUENCE IF NOT EXISTS events_seq",
    """CREATE TABLE IF NOT EXISTS events (
        time_ms       BIGINT NOT NULL,
        node_id       TEXT NOT NULL,
        seq           BIGINT NOT NULL DEFAULT nextval('events_seq'),
        session_id    TEXT NOT NULL,
        connection_id TEXT,
        stream_id     TEXT,
        kind          TEXT NOT NULL,
        component     TEXT NOT NULL,
        text          TEXT NOT NULL,
        payload       TEXT NOT NULL         -- JSON object, as in SQLite
    ) PARTITION BY RANGE (time_ms)""",
    "CREATE INDEX IF NOT EXISTS events_by_session ON events (session_id, time_ms, node_id, seq)",
    "CREATE INDEX IF NOT EXISTS events_by_time ON events (time_ms)",
)

_COPY: Final = ("COPY events (time_ms, session_id, connection_id, stream_id, kind, component, text, payload, node_id)"
                " FROM STDIN")
_COLUMNS: Final = "seq, time_ms, session_id, connection_id, stream_id, kind, component, text, payload"
_ORDER: Final = "time_ms, node_id, seq"
_PARTITION_PREFIX: Final = "events_d"


def default_node_id() -> str:
    """This process's name in the log when none is configured: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def day_of(time_ms: int) -> int:
    """The UTC day (days since 1970-01-01) that holds ``time_ms``."""
    return time_ms // DAY_MS


def partition_name(day: int) -> str:
    """``events_dYYYYMMDD`` for a day number (days before year 1 or after 9999 get the number)."""
    try:
        return _PARTITION_PREFIX + datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y%m%d")
    except (OverflowError, OSError, ValueError):
        return f"{_PARTITION_PREFIX}n{-day}" if day < 0 else f"{_PARTITION_PREFIX}x{day}"


def _redacted(url: str) -> str:
    """``url`` without its password, for log lines and thread names."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql"
    return f"postgresql://{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"


class PgEventLog(EventStore):
    """Append-only, durable event log in PostgreSQL, shared by every node of a cluster.

    :param url: a libpq connection string (``postgresql://user:pass@host:5432/db``); the schema
        is created on first use. A database that cannot be reached fails the constructor.
    :param node_id: this node's name, stored with each entry (the tie-break after time).
    The other parameters are :class:`metrics.eventlog.EventStore`'s.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_interval_s: float = DEFAULT_BATCH_INTERVAL_S,
        before_write: Callable[[Sequence[LogEntry]], object] | None = None,
        connect_timeout_s: int = 10,
    ) -> None:
        self.url = url
        self.node_id = node_id or default_node_id()
        self._connect_timeout_s = connect_timeout_s
        super().__init__(_redacted(url), max_queue=max_queue, batch_max=batch_max,
                         batch_interval_s=batch_interval_s, before_write=before_write)
        self._days: frozenset[int] = frozenset()  # partitions known to exist (replaced, never changed)
        self._down_until = 0.0  # writer thread: no connect attempt before this (monotonic)
        with self._connect() as conn:
            # One node at a time creates the schema (CREATE ... IF NOT EXISTS races otherwise).
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('openconsult.events.schema'))")
            for statement in _SCHEMA:
                conn.execute(statement)
        self._start_writer()

    def _connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=autocommit, connect_timeout=self._connect_timeout_s,
                               application_name="openconsult-eventlog")

    # --- the writer thread -----------------------------------------------------------------

    def _open_writer(self) -> list[psycopg.Connection[Any] | None]:
        # A holder, so a broken connection can be replaced on the next batch.
        return [None]

    def _close_writer(self, conn: Any) -> None:
        if conn[0] is not None:
            conn[0].close()

    def _row(self, entry: LogEntry) -> tuple[Any, ...]:
        return (*_row(entry), self.node_id)

    def _insert(self, conn: Any, rows: list[tuple[Any, ...]]) -> None:
        # A connection found broken (PostgreSQL restarted, a failover) is replaced and the
        # batch tried once more on the new one; a server that is down fails fast for a while
        # instead of costing a connect timeout per half batch.
        for attempt in (1, 2):
            if conn[0] is None or conn[0].closed or conn[0].broken:
                conn[0] = self._reconnect()
            pg: psycopg.Connection[Any] = conn[0]
            try:
                with pg.transaction():
                    self._ensure_partitions(pg, {day_of(row[0]) for row in rows})
                    with pg.cursor() as cur, cur.copy(_COPY) as copy:
                        for row in rows:
                            copy.write_row(row)
                return
            except psycopg.OperationalError:
                self._days = frozenset()
                broken = pg.broken
                pg.close()  # reopened on the next attempt
                if attempt == 2 or not broken:
                    raise
            except psycopg.Error:
                self._days = frozenset()  # a partition may have been dropped meanwhile: look again
                raise

    def _reconnect(self) -> psycopg.Connection[Any]:
        now = time.monotonic()
        if now < self._down_until:
            raise psycopg.OperationalError("PostgreSQL was unreachable less than "
                                           f"{RECONNECT_INTERVAL_S:g} s ago; not trying again yet")
        try:
            return self._connect()
        except psycopg.OperationalError:
            self._down_until = now + RECONNECT_INTERVAL_S
            raise

    def _ensure_partitions(self, pg: psycopg.Connection[Any], days: set[int]) -> None:
        for day in sorted(days - self._days):
            # Another node may create the same partition at the same time: serialise on a lock.
            pg.execute("SELECT pg_advisory_xact_lock(hashtext('openconsult.events.partition'))")
            pg.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF events FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(partition_name(day)), sql.Literal(day * DAY_MS), sql.Literal((day + 1) * DAY_MS)))
        self._days = self._days | days

    # --- queries ---------------------------------------------------------------------------

    def events_sync(
        self,
        session_id: str,
        kinds: Iterable[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """Committed entries of one session, oldest first by ``(time_ms, node_id, seq)``: the
        same order from every node. Each dict as :meth:`EventLog.events_sync`'s."""
        where = ["session_id = %s"]
        params: list[Any] = [session_id]
        if kinds is not None:
            kind_list = [str(k) for k in kinds]
            if not kind_list:
                return []
            where.append("kind = ANY(%s)")
            params.append(kind_list)
        if since_ms is not None:
            where.append("time_ms >= %s")
            params.append(since_ms)
        if until_ms is not None:
            where.append("time_ms < %s")
            params.append(until_ms)
        params.append(limit)
        query = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY {_ORDER} LIMIT %s"
        with self._connect(autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query.encode(), params).fetchall()
        return [{**row, "payload": json.loads(row["payload"])} for row in rows]

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
        """As :meth:`metrics.eventlog.EventLog.sessions_sync` (substring filters are
        case-insensitive)."""
        params: list[Any] = [since_ms, until_ms]
        text_filter = ""
        if text:
            pattern = f"%{_like_escape(text)}%"
            text_filter = (
                " AND session_id IN (SELECT DISTINCT session_id FROM events"
                " WHERE time_ms >= %s AND time_ms < %s AND ("
                " session_id ILIKE %s OR connection_id ILIKE %s OR stream_id ILIKE %s OR text ILIKE %s))"
            )
            params.extend([since_ms, until_ms, pattern, pattern, pattern, pattern])
        if room:
            text_filter += (
                " AND (session_id = %s OR session_id IN (SELECT DISTINCT session_id FROM events"
                " WHERE time_ms >= %s AND time_ms < %s AND kind = 'VideoSession'"
                " AND payload::jsonb ->> 'room' = %s))"
            )
            params.extend([room, since_ms, until_ms, room])
        if name:
            text_filter += (
                " AND session_id IN (SELECT DISTINCT session_id FROM events"
                " WHERE time_ms >= %s AND time_ms < %s AND kind = 'serverDetectedConnect'"
                " AND payload::jsonb ->> 'name' ILIKE %s)"
            )
            params.extend([since_ms, until_ms, f"%{_like_escape(name)}%"])
        if session_id:
            text_filter += " AND session_id ILIKE %s"
            params.append(f"%{_like_escape(session_id)}%")
        params.append(limit)
        query = (
            "SELECT session_id, MIN(time_ms) AS first_ms, MAX(time_ms) AS last_ms, COUNT(*) AS count"
            f" FROM events WHERE time_ms >= %s AND time_ms < %s{text_filter}"
            " GROUP BY session_id ORDER BY last_ms DESC, session_id LIMIT %s"
        )
        with self._connect(autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
            return list(cur.execute(query.encode(), params).fetchall())

    def backoffice_search(self, audit_db: Path, query: LogQuery) -> list[dict[str, Any]]:
        """The back-office log (:func:`metrics.audit.search`) with the event log in PostgreSQL:
        each side newest first and cut at ``offset + limit``, then merged (ties: event log first)."""
        audit_query = replace(query, types=frozenset(t for t in query.types if t in AUDIT_TYPES), offset=0,
                              limit=query.offset + query.limit)
        audit_rows = search(None, audit_db, audit_query) if audit_query.types and query.include_audit else []
        merged = sorted([*self._backoffice_events(query), *audit_rows],
                        key=lambda row: (-row["time_ms"], row["id"].startswith("a")))  # stable: keeps each side's order
        return merged[query.offset:query.offset + query.limit]

    def _backoffice_events(self, query: LogQuery) -> list[dict[str, Any]]:
        kinds = [str(t) for t in query.types if t not in AUDIT_TYPES and t is not LogType.ERROR]
        if LogType.ERROR in query.types:
            kinds += [str(k) for k in ERROR_EVENT_KINDS]
        if not kinds:
            return []
        # The first parameter is the CASE's (error kinds shown as the type Error).
        params: list[Any] = [[str(k) for k in ERROR_EVENT_KINDS], query.since_ms, query.until_ms, kinds]
        where = ["time_ms >= %s", "time_ms < %s", "kind = ANY(%s)"]
        if query.sessions is not None:
            where.append("session_id = ANY(%s)")
            params.append(sorted(query.sessions))
        if query.text:
            # A caller who may not read chat content may not search it either.
            chat = " AND kind != 'Chat'" if query.hide_chat_content else ""
            where.append(f"(text ILIKE %s OR session_id ILIKE %s OR (payload ILIKE %s{chat}))")
            params.extend([f"%{_like_escape(query.text)}%"] * 3)
        params.append(query.offset + query.limit)
        statement = (
            "SELECT seq, time_ms, CASE WHEN kind = ANY(%s) THEN 'Error' ELSE kind END AS kind, session_id, text,"
            f" payload FROM events WHERE {' AND '.join(where)} ORDER BY time_ms DESC, node_id DESC, seq DESC LIMIT %s")
        with self._connect(autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(statement.encode(), params).fetchall()
        out = []
        for row in rows:
            payload = json.loads(row["payload"])
            if query.hide_chat_content and row["kind"] == LogType.CHAT:
                payload = {k: v for k, v in payload.items() if k not in CHAT_CONTENT_KEYS}
            out.append({"id": f"e{row['seq']}", "time_ms": row["time_ms"], "type": row["kind"],
                        "session_id": row["session_id"], "text": row["text"], "staff": "", "role": "", "ip": "",
                        "payload": payload})
        return out

    # --- retention -------------------------------------------------------------------------

    def _partitions(self, conn: psycopg.Connection[Any]) -> list[tuple[str, int, int]]:
        """Every partition of ``events`` with its bounds ``[from_ms, to_ms)``."""
        rows = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass").fetchall()
        out = []
        for relname, bound in rows:
            if "FROM" not in bound:
                continue  # a DEFAULT partition an administrator added: retention leaves it to DELETE
            # FOR VALUES FROM ('1764374400000') TO ('1764460800000')
            numbers = [int(part.strip(" '()")) for part in bound.split("FROM", 1)[1].split("TO")]
            out.append((str(relname), numbers[0], numbers[1]))
        return out

    def delete_before_sync(self, before_ms: int) -> int:
        """Retention: drop every partition that ends before ``before_ms`` and delete the older
        entries of the boundary day. Returns how many entries went."""
        deleted = 0
        with self._connect() as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('openconsult.events.partition'))")
                for relname, _, to_ms in self._partitions(conn):
                    if to_ms <= before_ms:
                        table = sql.Identifier(relname)
                        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
                        deleted += int(row[0]) if row else 0
                        conn.execute(sql.SQL("DROP TABLE {}").format(table))
                cur = conn.execute("DELETE FROM events WHERE time_ms < %s", (before_ms,))
                deleted += cur.rowcount
        self._days = frozenset(day for day in self._days if (day + 1) * DAY_MS > before_ms)
        return deleted

    def anonymise_before_sync(self, before_ms: int, chunk: int = 1_000) -> int:
        """Retention: as :meth:`metrics.eventlog.EventLog.anonymise_before_sync`."""
        changed = 0
        last = (-(2**63), "", -(2**63))
        with self._connect() as conn:
            while True:
                rows = conn.execute(
                    "SELECT time_ms, node_id, seq, kind, payload FROM events WHERE time_ms < %s"
                    " AND (time_ms, node_id, seq) > (%s, %s, %s)"
                    " AND (payload::jsonb -> 'anonymised') IS NULL ORDER BY time_ms, node_id, seq LIMIT %s",
                    (before_ms, *last, chunk)).fetchall()
                conn.commit()
                if not rows:
                    return changed
                with conn.transaction():
                    for time_ms, node_id, seq, kind, payload in rows:
                        text, safe = anonymised(kind, json.loads(payload))
                        conn.execute(
                            "UPDATE events SET text = %s, payload = %s WHERE time_ms = %s AND node_id = %s AND seq = %s",
                            (text, json.dumps(safe, separators=(",", ":"), ensure_ascii=False), time_ms, node_id, seq))
                changed += len(rows)
                last = (rows[-1][0], rows[-1][1], rows[-1][2])
