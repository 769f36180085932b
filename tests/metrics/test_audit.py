"""The audit log, the back-office log search, CSV export and event/audit log retention, against real
SQLite files: append-only enforced by the database, group commit, exact cut-offs, formula
injection neutralised, role filters."""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from metrics.audit import (
    DAY_MS,
    AuditEntry,
    AuditKind,
    AuditLog,
    LogQuery,
    LogType,
    csv_cell,
    search,
    to_csv,
)
from metrics.eventlog import PERSONAL_KEYS, EventLog, EventStore, anonymised
from metrics.eventlog_pg import PgEventLog
from metrics.events import EventKind, LogEntry, now_ms, token_rejected
from rooms.chat import Retention, RetentionKind
from rooms.service import WorkflowConfig, WorkflowService
from rooms.sqlite_store import SqliteStore
from signalling.config import RetentionSettings
from signalling.workflow import DataRetention, RetentionJob
from tests.metrics.conftest import LogFactory


def lookup(time_ms: int, target: str = "s_1", name: str = "Sue", kind: AuditKind = AuditKind.LOOKUP) -> AuditEntry:
    return AuditEntry(time_ms=time_ms, kind=kind, sub="sue", name=name, role="support",
                      what="session" if kind is AuditKind.LOOKUP else "sign-in",
                      target=target if kind is AuditKind.LOOKUP else "", ip="10.0.0.7")


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.sqlite3")
    yield log
    log.close()


@pytest.fixture
def eventlog(logs: LogFactory) -> EventStore:
    """An event log on each backend (SQLite, PostgreSQL): the search and retention contract."""
    return logs.open()


def find(eventlog: EventStore, audit: AuditLog, query: LogQuery) -> list[dict[str, Any]]:
    """The back-office log search as the back office runs it for this backend."""
    if isinstance(eventlog, PgEventLog):
        return eventlog.backoffice_search(audit.path, query)
    assert isinstance(eventlog, EventLog)
    return search(eventlog.path, audit.path, query)


# --- append-only ------------------------------------------------------------------------------


def test_the_audit_table_refuses_update_and_delete(audit: AuditLog) -> None:
    now = now_ms()
    old = audit.append_sync(lookup(now - 10 * DAY_MS))
    audit.append_sync(lookup(now))
    conn = sqlite3.connect(audit.path)
    try:
        for sql in ("UPDATE audit SET target = 'forged' WHERE seq = ?", "DELETE FROM audit WHERE seq = ?"):
            with pytest.raises(sqlite3.IntegrityError, match="the audit log is append-only"):
                conn.execute(sql, (old,))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit")
        # The purge record cannot be forged to cover recent entries, nor altered or removed.
        with pytest.raises(sqlite3.IntegrityError, match="keep at least the last day"):
            conn.execute("INSERT INTO audit_purges (run_ms, before_ms, deleted) VALUES (?, ?, 0)", (now, now))
        conn.commit()
    finally:
        conn.close()
    assert [e["target"] for e in audit.entries_sync()] == ["s_1", "s_1"]
    assert audit.purge_sync(now - 5 * DAY_MS, now) == 1
    conn = sqlite3.connect(audit.path)
    try:
        for sql in ("UPDATE audit_purges SET before_ms = 0", "DELETE FROM audit_purges"):
            with pytest.raises(sqlite3.IntegrityError, match="audit_purges is append-only"):
                conn.execute(sql)
        # Past the recorded cut-off, still nothing newer may go.
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit")
    finally:
        conn.close()
    assert [e["time_ms"] for e in audit.entries_sync()] == [now]


def test_audit_retention_deletes_exactly_what_is_older_than_the_cut_off(audit: AuditLog) -> None:
    now = now_ms()
    cut = now - 30 * DAY_MS
    for t in (cut - 1, cut, cut + 1, now):
        audit.append_sync(lookup(t))
    assert audit.purge_sync(cut, now) == 1
    assert [e["time_ms"] for e in audit.entries_sync()] == [cut, cut + 1, now]
    conn = sqlite3.connect(audit.path)
    try:
        assert conn.execute("SELECT run_ms, before_ms, deleted FROM audit_purges").fetchall() == [(now, cut, 1)]
    finally:
        conn.close()


async def test_concurrent_appends_share_commits_and_are_all_durable(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite3")
    seqs = await asyncio.gather(*(log.append(lookup(1_000 + i, target=f"s_{i}")) for i in range(200)))
    assert sorted(seqs) == list(range(1, 201))
    # Committed before append() returned: a fresh read-only connection sees every entry.
    assert [e["target"] for e in log.entries_sync()] == [f"s_{i}" for i in range(200)]
    await log.aclose()


def test_hostile_text_is_made_safe(audit: AuditLog) -> None:
    audit.append_sync(lookup(1_000, target="q=\ud800\x1b[31m" + "x" * 2_000, name="Eve\x00"))
    [row] = audit.entries_sync()
    assert "\ud800" not in row["target"] and "\x1b" not in row["target"] and len(row["target"]) < 600
    assert row["name"] == "Eve\ufffd"
    assert row["text"].startswith("Eve\ufffd (sue, support) looked up session q=\ufffd\ufffd[31m")


# --- CSV ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1+1", "'+1+1"), ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "'\t=1"), ("\r=1", "'\r=1"), ("Anna", "Anna"), ("", ""), (None, ""),
    ("a=b", "a=b"), (1_000, "1000"),
])
def test_csv_cells_never_start_a_formula(value: object, shown: str) -> None:
    assert csv_cell(value) == shown


def test_csv_round_trips_the_rows() -> None:
    rows = [{"id": "e1", "time_ms": 1_656_494_100_000, "type": "Consultation", "session_id": "s_1",
             "text": "Booked, \"quoted\"\nnext line", "staff": "=cmd|' /C calc'!A0 (x)", "role": "", "ip": ""}]
    text = to_csv(rows)
    assert text.startswith("time_utc,time_ms,type,session_id,text,staff,role,ip,id\r\n")
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed[1] == ["2022-06-29 09:15:00.000 UTC", "1656494100000", "Consultation", "s_1",
                         "Booked, \"quoted\"\nnext line", "'=cmd|' /C calc'!A0 (x)", "", "", "e1"]


# --- the back-office log search -----------------------------------------------------------------


def seed(eventlog: EventStore, audit: AuditLog) -> None:
    e = LogEntry
    eventlog.extend([
        e(time_ms=1_000, session_id="s_a", kind=EventKind.CONSULTATION, text="Booked a consultation for Anna."),
        e(time_ms=2_000, session_id="s_a", kind=EventKind.CHAT, text="Chat message sent by patient (5 characters).",
          payload={"sender": "p1", "text": "hello", "chars": 5}),
        e(time_ms=3_000, session_id="s_b", kind=EventKind.CALL_ENDED, text="Call ended for Bo."),
        e(time_ms=4_000, session_id="s_b", kind=EventKind.SUCCESSFULLY_JOINED, text="Successfully joined: Bo"),
        e(time_ms=5_000, session_id="room:r1", kind=EventKind.QUEUE, text="Waiting room r1 opened."),
        e(time_ms=3_000, session_id="s_c", kind=EventKind.PUBLISH_FAILURE, text="Publish failed for Cy."),
        token_rejected("eyJhbGciOi", "token expired", room="s_c"),
    ])
    assert eventlog.flush_sync(10)
    audit.append_sync(lookup(2_500, target="s_a"))
    audit.append_sync(lookup(6_000, kind=AuditKind.LOGIN))


def q(**kw: Any) -> LogQuery:
    base: dict[str, Any] = {"since_ms": 0, "until_ms": 10_000, "types": frozenset(LogType)}
    return LogQuery(**{**base, **kw})


def test_search_merges_event_and_audit_entries_newest_first(eventlog: EventStore, audit: AuditLog) -> None:
    seed(eventlog, audit)
    rows = find(eventlog, audit, q(until_ms=7_000))
    assert [(r["time_ms"], r["type"], r["session_id"]) for r in rows] == [
        (6_000, "Login", ""), (5_000, "Queue", "room:r1"), (3_000, "Error", "s_c"), (3_000, "CallEnded", "s_b"),
        (2_500, "LookUp", "s_a"), (2_000, "Chat", "s_a"), (1_000, "Consultation", "s_a")]
    # Not a back-office type: successfullyJoined is the inspector's, not the log's.
    assert all(r["text"] != "Successfully joined: Bo" for r in rows)
    # Equal times: the later insertion first.
    login = rows[0]
    assert (login["staff"], login["role"], login["ip"], login["id"][0]) == ("Sue (sue)", "support", "10.0.0.7", "a")
    # The token rejected now (real clock) is an Error too.
    assert [r["type"] for r in find(eventlog, audit, q(until_ms=now_ms() + 1, since_ms=7_000))] == ["Error"]


def test_search_filters_and_pages(eventlog: EventStore, audit: AuditLog) -> None:
    seed(eventlog, audit)
    assert [r["type"] for r in find(eventlog, audit, q(types=frozenset({LogType.LOOKUP,
                                                                                   LogType.CALL_ENDED})))] \
        == ["CallEnded", "LookUp"]
    assert [r["session_id"] for r in find(eventlog, audit, q(text="BO."))] == ["s_b"]  # case-insensitive
    assert [r["type"] for r in find(eventlog, audit, q(text="s_a"))] == ["LookUp", "Chat", "Consultation"]
    assert find(eventlog, audit, q(text="100%_")) == []  # LIKE wildcards are literal
    assert [r["time_ms"] for r in find(eventlog, audit, q(since_ms=2_000, until_ms=3_000))] \
        == [2_500, 2_000]  # since inclusive, until exclusive
    full = find(eventlog, audit, q(until_ms=7_000))
    pages = [find(eventlog, audit, q(until_ms=7_000, limit=3, offset=o)) for o in (0, 3, 6)]
    assert [r["id"] for page in pages for r in page] == [r["id"] for r in full]


def test_role_filters(eventlog: EventStore, audit: AuditLog) -> None:
    seed(eventlog, audit)
    # A department admin: only their sessions, never audit entries.
    rows = find(eventlog, audit, q(sessions=frozenset({"s_a", "room:r1"}), include_audit=False))
    assert [(r["type"], r["session_id"]) for r in rows] == [("Queue", "room:r1"), ("Chat", "s_a"),
                                                            ("Consultation", "s_a")]
    # Support: a chat entry's content keys are never shown (only who and how long).
    [chat] = find(eventlog, audit, q(types=frozenset({LogType.CHAT}), hide_chat_content=True))
    assert chat["payload"] == {"sender": "p1", "chars": 5}
    [chat] = find(eventlog, audit, q(types=frozenset({LogType.CHAT})))
    assert chat["payload"]["text"] == "hello"
    # Free text matches payloads too (a patient reference), but never chat content for support.
    assert [r["type"] for r in find(eventlog, audit, q(text="hello"))] == ["Chat"]
    assert find(eventlog, audit, q(text="hello", hide_chat_content=True)) == []
    assert [r["type"] for r in find(eventlog, audit, q(text="p1", hide_chat_content=True))] == []
    assert [r["type"] for r in find(eventlog, audit, q(text="p1"))] == ["Chat"]


# --- event-log retention ----------------------------------------------------------------------


def personal(time_ms: int, session: str = "s_1") -> LogEntry:
    return LogEntry(time_ms=time_ms, session_id=session, kind=EventKind.SERVER_DETECTED_CONNECT,
                    connection_id="c_1", text="Server detected connect: Anna Berg (patient)",
                    payload={"name": "Anna Berg", "role": "patient", "user_agent": "Mozilla/5.0", "ip": "192.0.2.7",
                             "patient_ref": "p-123", "nested": {"patient": "p-123", "width": 640},
                             "duration_ms": 65_080})


def test_anonymised_keeps_figures_and_drops_personal_data() -> None:
    text, payload = anonymised("serverDetectedConnect", dict(personal(1).payload))
    assert text == "serverDetectedConnect entry (personal data removed by the retention policy)."
    assert payload == {"role": "patient", "nested": {"width": 640}, "duration_ms": 65_080, "anonymised": True}
    assert not PERSONAL_KEYS & set(payload)


def test_event_log_retention_is_exact_at_the_cut_off(eventlog: EventStore) -> None:
    cut = 1_700_000_000_000
    eventlog.extend([personal(cut - 1), personal(cut), personal(cut + 1)])
    eventlog.extend([LogEntry(time_ms=cut - 5, session_id="s_1", kind=EventKind.QUALITY_SAMPLE, text="sample"),
                     LogEntry(time_ms=cut - 5, session_id="s_1", kind=EventKind.CLIENT_STATS, text="stats",
                              payload={"user_agent": "UA", "framesDecoded": 10})])
    assert eventlog.flush_sync(10)
    assert eventlog.anonymise_before_sync(cut, chunk=2) == 3
    rows = eventlog.events_sync("s_1")
    by_time = {(r["time_ms"], r["kind"]): r for r in rows}
    old = by_time[(cut - 1, "serverDetectedConnect")]
    assert "Anna" not in old["text"] and "Anna" not in str(old["payload"]) and old["payload"]["anonymised"]
    assert by_time[(cut - 5, "clientStats")]["payload"] == {"framesDecoded": 10, "anonymised": True}
    for t in (cut, cut + 1):  # at and after the cut-off: untouched
        assert by_time[(t, "serverDetectedConnect")]["payload"] == personal(t).payload
        assert by_time[(t, "serverDetectedConnect")]["text"] == "Server detected connect: Anna Berg (patient)"
    assert eventlog.anonymise_before_sync(cut) == 0  # already done: left alone
    assert eventlog.delete_before_sync(cut) == 3
    assert [r["time_ms"] for r in eventlog.events_sync("s_1")] == [cut, cut + 1]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "workflow.sqlite3")
    yield store
    await store.close()


async def _nothing(result: object) -> None:
    return None


async def test_the_retention_job_runs_every_policy_and_the_audit_log_survives(
        tmp_path: Path, store: SqliteStore, logs: LogFactory) -> None:
    eventlog = logs.open()
    audit = AuditLog(tmp_path / "audit.sqlite3")
    now = now_ms()
    eventlog.extend([personal(now - 40 * DAY_MS), personal(now - 20 * DAY_MS), personal(now)])
    for t in (now - 400 * DAY_MS, now - 40 * DAY_MS, now):
        audit.append_sync(lookup(t))
    svc = WorkflowService(store, WorkflowConfig(retention=Retention(RetentionKind.KEEP, 0)))

    # Event log deleted after 30 days; the audit log kept (audit_days = 0).
    job = RetentionJob(svc, _nothing, 3600, clock=lambda: now,
                       data=DataRetention(eventlog, audit, RetentionSettings(eventlog_days=30)))
    assert job.enabled and not job.chat_enabled
    run = await job.run_once()
    assert run.ok, run.error
    assert run.eventlog == {"policy": "delete", "before_ms": now - 30 * DAY_MS, "deleted": 1} and run.audit is None
    assert [r["time_ms"] for r in eventlog.events_sync("s_1")] == [now - 20 * DAY_MS, now]
    assert len(audit.entries_sync()) == 3  # survives the event log's retention

    # Anonymise after 10 days; audit entries older than a year deleted.
    job2 = RetentionJob(svc, _nothing, 3600, clock=lambda: now, data=DataRetention(
        eventlog, audit, RetentionSettings(eventlog_days=10, eventlog_policy="anonymise", audit_days=365)))
    run2 = await job2.run_once()
    assert run2.ok, run2.error
    assert run2.eventlog == {"policy": "anonymise", "before_ms": now - 10 * DAY_MS, "anonymised": 1}
    assert run2.audit == {"policy": "delete", "before_ms": now - 365 * DAY_MS, "deleted": 1}
    assert [e["time_ms"] for e in audit.entries_sync()] == [now - 40 * DAY_MS, now]
    status = job2.status()
    assert status["data_policy"] == {"eventlog_days": 10, "eventlog_policy": "anonymise", "audit_days": 365}
    assert status["runs"][0]["eventlog"]["anonymised"] == 1 and status["runs"][0]["deleted"] == 0
    eventlog.close()
    await audit.aclose()


# --- sign-ins and config ------------------------------------------------------------------------


def test_a_token_signs_in_on_first_use_and_again_after_the_window() -> None:
    from signalling.audit import SignIns, token_digest

    t = [0.0]
    sign_ins = SignIns(600, max_tokens=2, clock=lambda: t[0])
    a, b, c = (token_digest(x) for x in ("a", "b", "c"))
    seen = []
    for now, digest in [(0, a), (1, a), (599, a), (1_199, a), (1_200, b), (1_201, c), (1_202, a), (1_203, c)]:
        t[0] = now
        seen.append(sign_ins.first_use(digest))
    # a: first use, then used within 600 s each time (599 - 1 < 600, 1199 - 599 = 600: signs in
    # again); b, c new; a was forgotten (only two kept), so it signs in again; c was kept.
    assert seen == [True, False, False, True, True, True, True, False]


@pytest.mark.parametrize("overrides, message", [
    ({"retention": {"eventlog_days": -1}}, "retention.eventlog_days must be 0-36500"),
    ({"retention": {"eventlog_policy": "shred"}}, "retention.eventlog_policy must be one of delete, anonymise"),
    ({"retention": {"audit_days": 36501}}, "retention.audit_days must be 0-36500"),
    ({"audit": {"sign_in_window_min": 0}}, "audit.sign_in_window_min must be 1-10080"),
    ({"retention": {"keep_forever": True}}, 'unknown config key "retention.keep_forever"'),
])
def test_retention_config_is_checked(overrides: dict[str, Any], message: str) -> None:
    from signalling.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(".", "\\.")):
        load_config(env={}, overrides=overrides)


async def test_who_started_the_call_and_when_it_ended_are_logged(store: SqliteStore) -> None:
    from rooms.backoffice import LogKind
    from rooms.model import Role
    from rooms.permissions import Actor

    svc = WorkflowService(store)
    org = Actor(Role.ORGANISATION_ADMIN, "olga")
    doctor = Actor(Role.CLINICIAN, "dr-who", frozenset({"cardio"}))
    await svc.create_waiting_room(org, room_id="cardio", name="Cardiology", department="cardio", clinician=None,
                                  now_ms=1_000)
    walk_in = await svc.walk_in(Actor(Role.PATIENT, "p-walk"), room_id="cardio", now_ms=2_000, patient_ref="p-walk")
    admitted = await svc.admit(doctor, walk_in.value.session_id, now_ms=3_000, video_session_id="v1")
    ended = await svc.end(doctor, walk_in.value.session_id, now_ms=68_080)
    calls = [(e.kind, e.text) for e in (*admitted.entries, *ended.entries)
             if e.kind in (LogKind.PATIENT_TO_DOCTOR_CALL, LogKind.DOCTOR_TO_PATIENT_CALL, LogKind.CALL_ENDED)]
    assert calls == [
        (LogKind.PATIENT_TO_DOCTOR_CALL, "Patient p-walk called without a booking and was answered by clinician dr-who."),
        (LogKind.CALL_ENDED, "Call ended at 1970-01-01 00:01:08 UTC and lasted 65.08 seconds. Patient: p-walk "
                             "Clinician: dr-who."),
    ]
