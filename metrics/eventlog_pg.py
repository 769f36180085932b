"""The event log in PostgreSQL (``[eventlog] url``): one log for nodes on several hosts.

Same contract as :class:`metrics.eventlog.EventLog` (the writer machinery is
:class:`metrics.eventlog.EventStore`'s: bounded queue, batches, group commit, a bad entry
isolated by halving): only the storage differs.

- Writes: the writer thread holds one sync psycopg 3 connection and commits each batch with one
  ``COPY`` (and its roll-ups) in one transaction. A connection found broken (PostgreSQL restarted) is reopened and
  the batch tried again at once; while PostgreSQL cannot be reached, batches are refused without
  a connect attempt for :data:`RECONNECT_INTERVAL_S` after each failed one, and their entries are
  dropped and counted as ``write_failed``.
- Order across nodes: every row carries ``node_id`` and ``seq`` (a shared sequence, so unique and
  increasing per node); a session reads ordered by ``(time_ms, node_id, seq)``, the same complete
  order from any node, whatever node wrote each entry.
- Partitions: ``events`` is partitioned by range of ``time_ms``, one partition per UTC day
  (``events_dYYYYMMDD``), created by the writer on first use. Retention drops the partitions that
  end before the cut-off and deletes the rest of the boundary day.
- Roll-ups: the same tables as in SQLite (metrics.rollup; PostgreSQL's types), folded by the
  shared writer machinery in the transaction of the batch, whose seqs are taken from
  ``events_seq`` before the ``COPY``; retention deletes them with the entries (they are not
  partitioned). The summary, the diagnosis and the charts read them as on SQLite.
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

from metrics import rollup
from metrics.audit import (
    AUDIT_TYPES,
    CHAT_CONTENT_KEYS,
    ERROR_EVENT_KINDS,
    LogQuery,
    LogType,
    search,
)
from metrics.eventlog import (
    _BUCKET_KEY,
    _BUCKET_VALUES,
    _FREEZE_COLUMNS,
    _MARK_COLUMNS,
    _POINT_KEYS,
    _ROLLED_KINDS,
    _ROLLUP_RETENTION,
    _SAMPLE_KINDS_SQL,
    _TALLY_COLUMNS,
    _TRACK_KEY,
    _TRACK_VALUES,
    DEFAULT_ANALYSIS_LIMIT,
    DEFAULT_BATCH_INTERVAL_S,
    DEFAULT_BATCH_MAX,
    DEFAULT_MAX_QUEUE,
    DEFAULT_QUERY_LIMIT,
    POSTGRES_DIALECT,
    fit_resolution,
    Analysis,
    EventStore,
    _bucket_row,
    _freeze_of,
    _freeze_row,
    _like_escape,
    _mark_row,
    _point_columns,
    _replace,
    _row,
    _tally_of,
    _tally_row,
    _track_of,
    _track_row,
    _upsert,
    anonymised,
    sessions_query,
)
from metrics.eventlog import (
    _SCHEMA as _SQLITE_SCHEMA,
)
from metrics.events import LogEntry

DAY_MS: Final = 86_400_000
#: After a failed connect, the writer refuses batches without trying for this long.
RECONNECT_INTERVAL_S: Final = 1.0

_SCHEMA: tuple[str, ...] = (
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




def _rollup_schema() -> tuple[str, ...]:
    """The roll-up tables and indexes of the SQLite schema in PostgreSQL's types: the same
    columns, so the same roll-ups (metrics.rollup) are stored and read the same way."""
    text = _SQLITE_SCHEMA[_SQLITE_SCHEMA.index("CREATE TABLE IF NOT EXISTS rollups"):]
    text = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    text = (text.replace("WITHOUT ROWID", "").replace("INTEGER PRIMARY KEY", "BIGINT PRIMARY KEY")
            .replace(" INTEGER", " BIGINT").replace(" REAL", " DOUBLE PRECISION"))
    return tuple(statement.strip() for statement in text.split(";") if statement.strip())


_SCHEMA += (
    # What the summary and the diagnosis read besides the roll-ups: a few hundred entries a call.
    f"CREATE INDEX IF NOT EXISTS events_notes ON events (session_id, time_ms, node_id, seq) WHERE {_SAMPLE_KINDS_SQL}",
    *_rollup_schema(),
)

_COPY: Final = ("COPY events (time_ms, session_id, connection_id, stream_id, kind, component, text, payload, node_id,"
                " seq) FROM STDIN")
_NEXT_SEQS: Final = "SELECT nextval('events_seq') FROM generate_series(1, %s) ORDER BY 1"
# The roll-up writes (metrics.eventlog's, in PostgreSQL's spelling).
_UPSERT_BUCKET: Final = _upsert("rollups", _BUCKET_KEY, _BUCKET_VALUES, "last_seq", pg=True)
_UPSERT_TRACK: Final = _upsert("rollup_tracks", _TRACK_KEY, _TRACK_VALUES, "last_ms", pg=True)
_UPSERT_QUALITY: Final = ("INSERT INTO quality_rollups AS cur (session_id, connection_id, bucket_ms, q_min)"
                          " VALUES (%s, %s, %s, %s) ON CONFLICT (session_id, connection_id, bucket_ms) DO UPDATE SET"
                          " q_min = LEAST(cur.q_min, excluded.q_min)")
_INSERT_MARK: Final = _replace("sample_marks", ("seq",), _MARK_COLUMNS)
_UPSERT_FREEZE: Final = _replace("freeze_tracks", _FREEZE_COLUMNS[:3], _FREEZE_COLUMNS)
_UPSERT_TALLY: Final = _replace("bad_tallies", _TALLY_COLUMNS[:5], _TALLY_COLUMNS)
# Text compares and sorts byte-wise, as in SQLite.
_C: Final = ' COLLATE "C"'
_POINTS_OF_BUCKETS: Final = (
    f"SELECT connection_id, peer_id, stream_id, direction, kind, {_point_columns(False, pg=True)} FROM rollups"
    f" WHERE session_id = %s AND span_ms = %s AND bucket_ms >= %s ORDER BY bucket_ms, track{_C}, direction{_C},"
    f" kind{_C}")
_POINTS_GROUPED: Final = (
    f"SELECT MIN(connection_id{_C}), MIN(peer_id{_C}), MIN(stream_id{_C}), direction, kind,"
    f" {_point_columns(True, pg=True)} FROM rollups WHERE session_id = %s AND span_ms = %s AND bucket_ms >= %s"
    f" GROUP BY track, direction, kind, 6 ORDER BY 6, track{_C}, direction{_C}, kind{_C}")
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

    def _insert(self, conn: Any, rows: list[tuple[Any, ...]], entries: list[LogEntry]) -> None:
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
                    # The seqs are taken first, so the roll-ups name each sample by its entry.
                    seqs = [int(r[0]) for r in pg.execute(_NEXT_SEQS, (len(rows),)).fetchall()]
                    with pg.cursor() as cur, cur.copy(_COPY) as copy:
                        for row, seq in zip(rows, seqs, strict=True):
                            copy.write_row((*row, seq))
                    if any(e.kind in _ROLLED_KINDS for e in entries):
                        self._roll_up(pg, entries, seqs)
                return
            except psycopg.OperationalError:
                self._roller.forget()  # its state may hold what was just rolled back
                self._days = frozenset()
                broken = pg.broken
                pg.close()  # reopened on the next attempt
                if attempt == 2 or not broken:
                    raise
            except BaseException:
                self._roller.forget()
                self._days = frozenset()  # a partition may have been dropped meanwhile: look again
                raise

    def _write_drained(self, conn: Any, drained: rollup.Drained) -> None:
        with conn.cursor() as cur:
            for statement, rows in (
                (_UPSERT_BUCKET, [_bucket_row(sid, b) for sid, b in drained.buckets]),
                (_UPSERT_TRACK, [_track_row(sid, t) for sid, t in drained.tracks]),
                (_UPSERT_QUALITY, drained.quality),
                (_INSERT_MARK, [_mark_row(sid, m) for sid, m in drained.marks]),
                (_UPSERT_FREEZE, [_freeze_row(sid, f) for sid, f in drained.freezes]),
                (_UPSERT_TALLY, [_tally_row(sid, key, t) for sid, key, t in drained.tallies]),
            ):
                if rows:
                    cur.executemany(statement, rows)

    def _fetch_one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        row = self._roller_conn.execute(query.replace("?", "%s").encode(), params).fetchone()
        return None if row is None else tuple(row)

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

    def analysis_sync(self, session_id: str, limit: int = DEFAULT_ANALYSIS_LIMIT, *, marks: bool = True) -> Analysis:
        """As :meth:`metrics.eventlog.EventLog.analysis_sync`: one snapshot (REPEATABLE READ)."""
        with self._connect() as conn:
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():
                with conn.cursor(row_factory=dict_row) as cur:
                    rows = cur.execute(
                        f"SELECT {_COLUMNS} FROM events WHERE session_id = %s AND {_SAMPLE_KINDS_SQL}"
                        f" ORDER BY {_ORDER} LIMIT %s".encode(), (session_id, limit)).fetchall()
                entries = [{**row, "payload": json.loads(row["payload"])} for row in rows]
                first = conn.execute("SELECT time_ms FROM events WHERE session_id = %s ORDER BY time_ms LIMIT 1",
                                     (session_id,)).fetchone()
                last = conn.execute("SELECT time_ms FROM events WHERE session_id = %s ORDER BY time_ms DESC LIMIT 1",
                                    (session_id,)).fetchone()
                tracks = {}
                for r in conn.execute(f"SELECT {', '.join(_TRACK_KEY[1:] + _TRACK_VALUES)} FROM rollup_tracks"
                                      " WHERE session_id = %s".encode(), (session_id,)):
                    track = _track_of(tuple(r))
                    tracks[(track.track, track.direction, track.kind)] = track
                quality = [(str(c), int(b), float(q)) for c, b, q in conn.execute(
                    "SELECT connection_id, bucket_ms, q_min FROM quality_rollups WHERE session_id = %s"
                    f" ORDER BY bucket_ms, connection_id{_C}".encode(), (session_id,))]
                mark_list = [rollup.Mark(*r) for r in conn.execute(
                    f"SELECT {', '.join(c for c in _MARK_COLUMNS if c != 'session_id')} FROM sample_marks"
                    " WHERE session_id = %s ORDER BY time_ms, seq".encode(), (session_id,))] if marks else []
                freezes = [_freeze_of(tuple(r)) for r in conn.execute(
                    f"SELECT {', '.join(_FREEZE_COLUMNS[1:])} FROM freeze_tracks WHERE session_id = %s"
                    " ORDER BY first_ms, first_seq".encode(), (session_id,))]
                tallies = {(r[0], r[1], r[2], r[3]): _tally_of(*r[4:]) for r in conn.execute(
                    "SELECT track, direction, kind, type, count, first_ms, first_seq, last_ms, last_seq, bins"
                    " FROM bad_tallies WHERE session_id = %s", (session_id,))} if marks else {}
        span = (None if first is None else int(first[0]), None if last is None else int(last[0]))
        return Analysis(entries, rollup.SessionRollup(tracks, quality, mark_list, freezes, tallies), span)

    def sample_count_sync(self, session_id: str) -> int:
        """How many quality samples the session has (from its roll-ups)."""
        with self._connect(autocommit=True) as conn:
            row = conn.execute("SELECT COALESCE(SUM(n), 0) FROM rollup_tracks WHERE session_id = %s",
                               (session_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def quality_points_sync(self, session_id: str, resolution_ms: int, since_ms: int | None = None,
                            max_points: int | None = None) -> tuple[int, list[dict[str, Any]]]:
        """As :meth:`metrics.eventlog.EventLog.quality_points_sync`."""
        resolution_ms = fit_resolution(resolution_ms)
        since = 0 if since_ms is None else since_ms
        with self._connect() as conn:
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():
                if max_points is not None:
                    spans = conn.execute("SELECT GREATEST(first_ms, %s), last_ms FROM rollup_tracks"
                                         " WHERE session_id = %s AND last_ms >= %s", (since, session_id, since)).fetchall()
                    resolution_ms = fit_resolution(resolution_ms, spans, max_points)
                span = max(w for w in rollup.SPANS_MS if resolution_ms % w == 0)
                start = since - since % resolution_ms
                if span == resolution_ms:
                    rows = conn.execute(_POINTS_OF_BUCKETS.encode(), (resolution_ms, session_id, span, start)).fetchall()
                else:
                    rows = conn.execute(_POINTS_GROUPED.encode(), (resolution_ms, resolution_ms, resolution_ms,
                                                                   session_id, span, start)).fetchall()
        return resolution_ms, [dict(zip(_POINT_KEYS, r, strict=True)) for r in rows]

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
        query, params = sessions_query(POSTGRES_DIALECT, since_ms, until_ms, text, limit, room, name, session_id)
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
                # Their roll-ups go with them, as in SQLite.
                for statement in _ROLLUP_RETENTION:
                    conn.execute(statement.replace("?", "%s").encode(), (before_ms,))
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
