"""The audit log: who among the staff looked up what, and when they signed in.

Support staff read other people's consultations; data-protection law wants a record of every such
look-up that the readers themselves cannot alter. This is it: its own SQLite file
(``<data_dir>/audit.sqlite3``), apart from the event log, with two kinds of entries:

- ``LookUp``: one per staff look-up (the inspector's session, quality and search routes, the
  back-office log search and its CSV export): who (``sub``, name, role), what (``session``,
  ``patient`` or ``query``) and which (the session id, patient reference or query text), when,
  and from which IP address;
- ``Login``: a staff sign-in (see ``signalling.audit``: a staff token's first request within the
  sign-in window).

Append-only, enforced by the database, not only by the API (which has no update or delete path):
triggers refuse every ``UPDATE`` and every ``DELETE`` of an entry, except a retention run's
delete of entries older than its cut-off, which must first be recorded in ``audit_purges`` — itself
append-only, and refusing a cut-off less than one day in the past. So even a purge leaves a trace,
and nothing recent can be removed.

Durable before the reply: :meth:`AuditLog.append` returns once the entry is committed. Appends
that arrive while a commit is under way are committed together in the next one (group commit,
as in :class:`metrics.eventlog.EventLog`), in a worker thread so the event loop never waits on
the disk.

The back-office log search (:func:`search`) reads the event log and this file in one SQLite
query (the audit file attached read-only), newest first, paginated.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from metrics.events import EventKind, safe_name, safe_text

MINUTE_MS: Final = 60_000
DAY_MS: Final = 86_400_000
#: The most recent span no retention run may delete (the ``audit_purges`` trigger enforces it).
MIN_AUDIT_KEEP_MS: Final = DAY_MS


class AuditKind(StrEnum):
    LOGIN = "Login"
    LOOKUP = "LookUp"


class LookUpWhat(StrEnum):
    """What a staff member looked up."""

    SESSION = "session"
    PATIENT = "patient"
    QUERY = "query"


_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS audit (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms  INTEGER NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('Login', 'LookUp')),
    sub      TEXT NOT NULL,
    name     TEXT NOT NULL,
    role     TEXT NOT NULL,
    what     TEXT NOT NULL,
    target   TEXT NOT NULL,
    ip       TEXT NOT NULL,
    text     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (time_ms);
CREATE TABLE IF NOT EXISTS audit_purges (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_ms     INTEGER NOT NULL,
    before_ms  INTEGER NOT NULL,
    deleted    INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
WHEN OLD.time_ms >= (SELECT COALESCE(MAX(before_ms), 0) FROM audit_purges)
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: DELETE refused (retention deletes only entries older than a cut-off recorded in audit_purges)'); END;
CREATE TRIGGER IF NOT EXISTS audit_purges_no_update BEFORE UPDATE ON audit_purges
BEGIN SELECT RAISE(ABORT, 'audit_purges is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS audit_purges_no_delete BEFORE DELETE ON audit_purges
BEGIN SELECT RAISE(ABORT, 'audit_purges is append-only: DELETE refused'); END;
CREATE TRIGGER IF NOT EXISTS audit_purges_keep_recent BEFORE INSERT ON audit_purges
WHEN NEW.before_ms > CAST(strftime('%s', 'now') AS INTEGER) * 1000 - {MIN_AUDIT_KEEP_MS}
BEGIN SELECT RAISE(ABORT, 'audit retention must keep at least the last day'); END;
"""

_INSERT: Final = ("INSERT INTO audit (time_ms, kind, sub, name, role, what, target, ip, text)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One audit entry. Every text field may hold what a client sent (a query): the log stores
    :meth:`made_safe` of it."""

    time_ms: int
    kind: AuditKind
    sub: str
    name: str
    role: str
    what: str  # a LookUpWhat value, or "sign-in" for a Login
    target: str  # the session id, patient reference or query looked up ("" for a Login)
    ip: str

    @property
    def text(self) -> str:
        """The sentence support and data-protection officers read."""
        who = f"{self.name} ({self.sub}, {self.role})"
        where = f" from {self.ip}" if self.ip else ""
        if self.kind is AuditKind.LOGIN:
            return f"Staff sign-in: {who}{where}."
        return f"{who} looked up {self.what} {self.target}{where}."

    def made_safe(self) -> AuditEntry:
        return AuditEntry(time_ms=self.time_ms, kind=AuditKind(self.kind), sub=safe_name(self.sub),
                          name=safe_name(self.name), role=safe_name(self.role), what=safe_name(self.what),
                          target=safe_text(self.target, 512), ip=safe_name(self.ip))

    def row(self) -> tuple[Any, ...]:
        safe = self.made_safe()
        return (safe.time_ms, str(safe.kind), safe.sub, safe.name, safe.role, safe.what, safe.target, safe.ip,
                safe.text)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class AuditLog:
    """The append-only audit log in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = _connect(self.path)  # used by one worker thread at a time (the committer)
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[int]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False

    # --- writing ---------------------------------------------------------------------------

    async def append(self, entry: AuditEntry) -> int:
        """Write ``entry``; return its sequence number once it is committed (raises if it could
        not be: a look-up that cannot be audited must not be answered)."""
        if self._closed:
            raise RuntimeError("the audit log is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((entry.row(), future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_pending())
        return await asyncio.shield(future)

    async def _commit_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                seqs = await asyncio.to_thread(self._write, [row for row, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), seq in zip(batch, seqs, strict=True):
                if not future.done():
                    future.set_result(seq)

    def _write(self, rows: Sequence[tuple[Any, ...]]) -> list[int]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                seqs = [int(conn.execute(_INSERT, row).lastrowid or 0) for row in rows]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return seqs

    def append_sync(self, entry: AuditEntry) -> int:
        """:meth:`append` without an event loop (tools, tests)."""
        return self._write([entry.row()])[0]

    async def aclose(self) -> None:
        """Close once the commits under way are done (later appends raise)."""
        self._closed = True
        if self._committer is not None:
            await self._committer
        self.close()

    def close(self) -> None:
        """Close at once (use :meth:`aclose` while appends may be pending)."""
        self._closed = True
        with self._lock:
            self._conn.close()

    # --- retention -------------------------------------------------------------------------

    def purge_sync(self, before_ms: int, now_ms: int) -> int:
        """Delete the entries older than ``before_ms`` (retention); the run is recorded in
        ``audit_purges`` in the same transaction. Returns how many were deleted."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                count = conn.execute("SELECT COUNT(*) FROM audit WHERE time_ms < ?", (before_ms,)).fetchone()[0]
                conn.execute("INSERT INTO audit_purges (run_ms, before_ms, deleted) VALUES (?, ?, ?)",
                             (now_ms, before_ms, count))
                conn.execute("DELETE FROM audit WHERE time_ms < ?", (before_ms,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return int(count)

    # --- reading ---------------------------------------------------------------------------

    def entries_sync(self, kind: AuditKind | None = None) -> list[dict[str, Any]]:
        """Every entry (of ``kind``), oldest first."""
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        conn.row_factory = sqlite3.Row
        try:
            if kind is None:
                rows = conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()
            else:
                rows = conn.execute("SELECT * FROM audit WHERE kind = ? ORDER BY seq", (str(kind),)).fetchall()
        finally:
            conn.close()
        return [dict(row) for row in rows]


# --- the back-office log ------------------------------------------------------------------------


class LogType(StrEnum):
    """The back-office log's types (the ones support teams know), and where each comes from."""

    CONSULTATION = "Consultation"
    VIDEO_SESSION = "VideoSession"
    QUEUE = "Queue"
    CALL_ENDED = "CallEnded"
    LOGIN = "Login"
    LOOKUP = "LookUp"
    PATIENT_TO_DOCTOR_CALL = "PatientToDoctorCall"
    DOCTOR_TO_PATIENT_CALL = "DoctorToPatientCall"
    CHAT = "Chat"
    ERROR = "Error"


#: Event-log kinds shown as ``Error``: what failed for someone (a refused link, a failed publish or
#: subscription).
ERROR_EVENT_KINDS: Final = (EventKind.TOKEN_REJECTED, EventKind.PUBLISH_FAILURE, EventKind.SUBSCRIBE_FAILURE)
AUDIT_TYPES: Final = frozenset({LogType.LOGIN, LogType.LOOKUP})
#: Payload keys that may hold a chat message's content: never shown to support.
CHAT_CONTENT_KEYS: Final = frozenset({"text", "message", "body", "content"})
SEARCH_LIMIT_MAX: Final = 1_000
SEARCH_OFFSET_MAX: Final = 100_000
CSV_ROWS_MAX: Final = 100_000
CSV_COLUMNS: Final = ("time_utc", "time_ms", "type", "session_id", "text", "staff", "role", "ip", "id")


@dataclass(frozen=True, slots=True)
class LogQuery:
    """One back-office log search. ``sessions``: only entries of these session ids (department
    separation); ``include_audit``: whether Login/LookUp entries may be shown to the caller."""

    since_ms: int
    until_ms: int
    types: frozenset[LogType]
    text: str | None = None
    limit: int = 100
    offset: int = 0
    sessions: frozenset[str] | None = None
    include_audit: bool = True
    hide_chat_content: bool = False


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search(events_db: Path | None, audit_db: Path, query: LogQuery) -> list[dict[str, Any]]:
    """The back-office log: entries of ``query.types`` in ``[since_ms, until_ms)``, newest first
    (ties: event log before audit, newer insertion first), ``limit`` from ``offset``.

    ``text`` (case-insensitive for ASCII letters) matches an event-log entry's text, session id
    or payload (patient references, clinician ids), an audit entry's text or target.

    Each row: ``id`` (``e<seq>`` for an event-log entry, ``a<seq>`` for an audit entry),
    ``time_ms``, ``type``, ``session_id``, ``text``, ``staff``/``role``/``ip`` (audit entries),
    ``payload`` (event-log entries; chat content keys removed when ``hide_chat_content``).
    """
    parts: list[str] = []
    params: list[Any] = []
    event_types = [t for t in query.types if t not in AUDIT_TYPES and t is not LogType.ERROR]
    kinds = [str(t) for t in event_types] + ([str(k) for k in ERROR_EVENT_KINDS] if LogType.ERROR in query.types
                                              else [])
    if kinds:
        where = ["time_ms >= ?", "time_ms < ?", f"kind IN ({', '.join('?' * len(kinds))})"]
        params.extend([query.since_ms, query.until_ms, *kinds])
        if query.sessions is not None:
            where.append("session_id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(sorted(query.sessions)))
        if query.text:
            # A caller who may not read chat content may not search it either.
            chat = " AND kind != 'Chat'" if query.hide_chat_content else ""
            where.append("(text LIKE ? ESCAPE '\\' OR session_id LIKE ? ESCAPE '\\'"
                         f" OR (payload LIKE ? ESCAPE '\\'{chat}))")
            params.extend([_like(query.text)] * 3)
        error_kinds = ", ".join(f"'{k}'" for k in ERROR_EVENT_KINDS)
        # Each side sorted and cut on its own first: newest first walks the time index backwards
        # and stops after offset + limit rows, instead of sorting every match in the range.
        parts.append(
            "SELECT * FROM (SELECT 0 AS src, seq, time_ms,"
            f" CASE WHEN kind IN ({error_kinds}) THEN 'Error' ELSE kind END AS type,"
            " session_id, text, '' AS staff, '' AS role, '' AS ip, payload"
            f" FROM main.events WHERE {' AND '.join(where)} ORDER BY time_ms DESC, seq DESC LIMIT ?)")
        params.append(query.offset + query.limit)
    audit_kinds = [str(t) for t in query.types if t in AUDIT_TYPES] if query.include_audit else []
    if audit_kinds:
        where = ["time_ms >= ?", "time_ms < ?", f"kind IN ({', '.join('?' * len(audit_kinds))})"]
        params.extend([query.since_ms, query.until_ms, *audit_kinds])
        if query.text:
            where.append("(text LIKE ? ESCAPE '\\' OR target LIKE ? ESCAPE '\\')")
            params.extend([_like(query.text)] * 2)
        parts.append(
            "SELECT * FROM (SELECT 1 AS src, seq, time_ms, kind AS type,"
            " CASE WHEN what = 'session' THEN target ELSE '' END AS session_id, text,"
            " name || ' (' || sub || ')' AS staff, role, ip, '{}' AS payload"
            f" FROM audit.audit WHERE {' AND '.join(where)} ORDER BY time_ms DESC, seq DESC LIMIT ?)")
        params.append(query.offset + query.limit)
    if not parts:
        return []
    sql = (f"SELECT * FROM ({' UNION ALL '.join(parts)})"
           " ORDER BY time_ms DESC, src, seq DESC LIMIT ? OFFSET ?")
    params.extend([query.limit, query.offset])
    # events_db None: the event log is elsewhere (PostgreSQL) and only audit entries are asked for.
    conn = sqlite3.connect(f"{events_db.resolve().as_uri()}?mode=ro" if events_db else ":memory:", uri=True,
                           timeout=30.0)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("ATTACH DATABASE ? AS audit", (f"{audit_db.resolve().as_uri()}?mode=ro",))
        rows = conn.execute(sql, params).fetchall()
    finally:
        conn.close()
    out: list[dict[str, Any]] = []
    for row in rows:
        payload = json.loads(row["payload"])
        if query.hide_chat_content and row["type"] == LogType.CHAT:
            payload = {k: v for k, v in payload.items() if k not in CHAT_CONTENT_KEYS}
        out.append({"id": f"{'a' if row['src'] else 'e'}{row['seq']}", "time_ms": row["time_ms"],
                    "type": row["type"], "session_id": row["session_id"], "text": row["text"],
                    "staff": row["staff"], "role": row["role"], "ip": row["ip"], "payload": payload})
    return out


#: A cell starting with one of these is read as a formula by spreadsheet programs.
FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: a leading ``= + - @``, tab or CR gets a ``'``
    in front (OWASP's advice against CSV/formula injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def to_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    """The back-office log rows as CSV (RFC 4180, CRLF line ends), one header line first."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        when = datetime.fromtimestamp(row["time_ms"] / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
        writer.writerow([csv_cell(v) for v in (when, row["time_ms"], row["type"], row["session_id"], row["text"],
                                               row["staff"], row["role"], row["ip"], row["id"])])
    return buffer.getvalue()
