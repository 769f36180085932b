"""Audit and the back-office log against a real ``openconsult serve``: each staff look-up is one
LookUp entry in the audit file (and a token's first use one Login), committed before the reply;
refused requests audit nothing; the CSV holds exactly the rows the search pages through, with
formula injection neutralised; department admins see their departments only; the retention job
deletes the old event-log entries on its schedule and the audit log survives it.
(Who is refused each route — patients, clinicians, demo tokens — is tests/test_http_authz.py's
matrix over docs/openapi.yaml.)"""

from __future__ import annotations

import csv
import io
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from metrics.audit import DAY_MS, AuditEntry, AuditKind, AuditLog, csv_cell
from metrics.eventlog import EventLog
from metrics.events import EventKind, LogEntry
from rooms.model import Role
from tests.call_helpers import authority
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server
from tests.workflow.helpers import Clinic, now_ms

CARDIO, DERMA = "cardiology", "dermatology"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("audit"))
    yield server
    server.stop()


@pytest.fixture
async def clinic(server: ServerProcess) -> AsyncIterator[Clinic]:
    clinic = Clinic.open(server)
    yield clinic
    await clinic.close()


def audit_rows(server: ServerProcess, sub: str) -> list[tuple[str, str, str, str, str]]:
    """(kind, role, what, target, ip) of ``sub``'s audit entries, oldest first, read from the file."""
    conn = sqlite3.connect(f"{(server.data_dir / 'audit.sqlite3').resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(
            "SELECT kind, role, what, target, ip FROM audit WHERE sub = ? ORDER BY seq", (sub,))]
    finally:
        conn.close()


async def get(clinic: Clinic, path: str, token: str | None) -> tuple[int, Any, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with clinic.http.get(clinic.server.url + path, headers=headers) as response:
        text = await response.text()
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, text


async def booked(clinic: Clinic, department: str, room: str, patient: str, name: str = "Anna") -> str:
    org = clinic.staff(Role.ORGANISATION_ADMIN, "olga")
    status, _ = await clinic.call("POST", "/api/waiting-rooms", org,
                                  {"room_id": room, "name": room.title(), "department": department})
    assert status in (201, 409)
    data = await clinic.book(org, department=department, room_id=room, patient=patient, clinician="dr-who",
                             appointment_ms=now_ms() + 3_600_000, patient_name=name)
    return str(data["consultation"]["session_id"])


async def test_each_lookup_is_audited_exactly_once(clinic: Clinic) -> None:
    sid = await booked(clinic, CARDIO, "cardio-main", "p-audit")
    sue = clinic.tokens.mint("support", Role.SUPPORT, "Sue Support", sub="sue-audit")
    calls = [
        (f"/api/sessions/{sid}/events", ("LookUp", "support", "session", sid)),
        (f"/api/sessions/{sid}/quality", ("LookUp", "support", "session", sid)),
        (f"/api/sessions/{sid}/summary", ("LookUp", "support", "session", sid)),
        (f"/api/sessions/{sid}/diagnosis", ("LookUp", "support", "session", sid)),
        ("/api/sessions?q=p-audit&since_ms=1&until_ms=2", ("LookUp", "support", "query",
                                                          "sessions q=p-audit since_ms=1 until_ms=2")),
        ("/api/backoffice/log?q=p-audit&type=Consultation&since_ms=1&until_ms=2", (
            "LookUp", "support", "query",
            "backoffice log q=p-audit type=Consultation since_ms=1 until_ms=2 offset=0 limit=100")),
        ("/api/backoffice/log.csv?q=p-audit&since_ms=1&until_ms=2&limit=5", (
            "LookUp", "support", "query",
            "export backoffice log q=p-audit type=all since_ms=1 until_ms=2 offset=0 limit=5")),
    ]
    expected: list[tuple[str, str, str, str, str]] = [("Login", "support", "sign-in", "", "127.0.0.1")]
    for path, want in calls:
        status, body, text = await get(clinic, path, sue)
        assert status == 200, (path, text)
        expected.append((*want, "127.0.0.1"))
        # Durable before the reply: the entry is in the file when the answer arrives.
        assert audit_rows(clinic.server, "sue-audit") == expected, path
    # Refused look-ups (patient, clinician; support with a call room's token at the inspector)
    # audit nothing and sign nobody in.
    refused = [(clinic.tokens.mint(sid, Role.PATIENT, "Anna", sub="p-audit"), calls, "forbidden"),
               (clinic.tokens.mint("staff", Role.CLINICIAN, "Dr Who", sub="dr-who", departments=(CARDIO,)), calls,
                "forbidden"),
               (clinic.tokens.mint("cardio-main", Role.SUPPORT, "Sue Support", sub="sue-room"), calls[:3],
                "room_mismatch")]
    for token, paths, code in refused:
        for path, _ in paths:
            status, body, _ = await get(clinic, path, token)
            assert status == 403 and body["error"]["code"] == code, (path, body)
    assert audit_rows(clinic.server, "p-audit") == []
    assert [r[0] for r in audit_rows(clinic.server, "sue-room")] == []
    assert audit_rows(clinic.server, "dr-who") == []
    # The clinician's token signs in where it is accepted (the staff API), and looks nothing up.
    doctor = refused[1][0]
    for _ in range(2):
        assert (await get(clinic, f"/api/consultations/{sid}", doctor))[0] == 200
    assert audit_rows(clinic.server, "dr-who") == [("Login", "clinician", "sign-in", "", "127.0.0.1")]
    # A second token of the same person is a second sign-in; reusing a token is not.
    sue2 = clinic.tokens.mint("support", Role.SUPPORT, "Sue Support", sub="sue-audit", ttl_s=7200)
    for token in (sue2, sue2, sue):
        assert (await get(clinic, f"/api/sessions/{sid}/events", token))[0] == 200
    kinds = [r[0] for r in audit_rows(clinic.server, "sue-audit")]
    assert kinds == ["Login"] + ["LookUp"] * len(calls) + ["Login"] + ["LookUp"] * 3
    # Support sees its own look-ups in the back-office log (the search is itself one more).
    # An explicit end after now: by default a search's window ends at its own request, so whether
    # the search's own look-up (written just after) is in it would depend on the millisecond.
    status, body, _ = await get(clinic, f"/api/backoffice/log?type=LookUp&q=sue-audit&limit=1000"
                                        f"&until_ms={now_ms() + 60_000}", sue)
    assert status == 200
    assert len([e for e in body["entries"] if e["staff"] == "Sue Support (sue-audit)"]) == len(calls) + 3 + 1


async def test_a_staff_join_over_the_websocket_is_a_sign_in(clinic: Clinic) -> None:
    doctor = clinic.tokens.mint("desk-ws", Role.CLINICIAN, "Dr Ws", sub="dr-ws", departments=(CARDIO,))
    patient = clinic.tokens.mint("desk-ws", Role.PATIENT, "Pat", sub="p-ws")
    for token in (doctor, doctor, patient):
        client = await clinic.connect(token)
        await client.close()
    assert audit_rows(clinic.server, "dr-ws") == [("Login", "clinician", "sign-in", "", "127.0.0.1")]
    assert audit_rows(clinic.server, "p-ws") == []


async def test_the_csv_holds_what_the_search_pages_through(clinic: Clinic) -> None:
    since = now_ms()
    # A staff name a spreadsheet would run as a formula: its Login entry's staff cell.
    evil = clinic.tokens.mint("support", Role.SUPPORT, "=HYPERLINK(\"http://x\",\"y\")", sub="@evil")
    assert (await get(clinic, "/api/backoffice/log?limit=1", evil))[0] == 200
    sids = [await booked(clinic, CARDIO, "cardio-main", f"p-csv{i}", name=f"-Csv {i}") for i in range(3)]
    until = now_ms() + 1  # fixed: the searches below (LookUps themselves) stay out of the window
    sue = clinic.tokens.mint("support", Role.SUPPORT, "Sue", sub="sue-csv")
    base = f"since_ms={since}&until_ms={until}"
    pages: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        status, body, _ = await get(clinic, f"/api/backoffice/log?{base}&limit=2&offset={offset}", sue)
        assert status == 200 and len(body["entries"]) <= 2
        pages.extend(body["entries"])
        offset = body["next_offset"]
    assert {e["session_id"] for e in pages if e["type"] == "Consultation"} == set(sids)
    assert [e["time_ms"] for e in pages] == sorted((e["time_ms"] for e in pages), reverse=True)
    status, _, text = await get(clinic, f"/api/backoffice/log.csv?{base}", sue)
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    # The same rows, cell for cell (as text: a cell that would start a formula is quoted).
    assert [(r["id"], r["type"], r["session_id"], r["text"], r["staff"], r["ip"]) for r in rows] == [
        tuple(csv_cell(e[k]) for k in ("id", "type", "session_id", "text", "staff", "ip")) for e in pages]
    assert [r["time_ms"] for r in rows] == [str(e["time_ms"]) for e in pages]
    # No cell starts a formula; the evil name is shown as text, quote first.
    evil_rows = [r for r in rows if "@evil" in r["staff"]]
    assert [(r["type"], r["staff"]) for r in evil_rows] == [
        ("LookUp", "'=HYPERLINK(\"http://x\",\"y\") (@evil)"), ("Login", "'=HYPERLINK(\"http://x\",\"y\") (@evil)")]
    assert [r["text"][:12] for r in evil_rows] == ["'=HYPERLINK(", "Staff sign-i"]
    for row in rows:
        assert not any(v.startswith(("=", "+", "-", "@", "\t", "\r")) for v in row.values()), row
    # The same filters narrow both alike.
    status, body, _ = await get(clinic, f"/api/backoffice/log?{base}&type=Consultation&q=p-csv1", sue)
    status, _, text = await get(clinic, f"/api/backoffice/log.csv?{base}&type=Consultation&q=p-csv1", sue)
    narrowed = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["id"] for r in narrowed] == [e["id"] for e in body["entries"]] and len(narrowed) >= 1
    assert {r["session_id"] for r in narrowed} == {sids[1]}


async def test_department_admins_see_their_departments_only(clinic: Clinic) -> None:
    since = now_ms()
    cardio = await booked(clinic, CARDIO, "cardio-main", "p-dept-c")
    derma = await booked(clinic, DERMA, "derma-main", "p-dept-d")
    da = clinic.tokens.mint("staff", Role.DEPARTMENT_ADMIN, "Dana", sub="dana", departments=(CARDIO,))
    status, body, _ = await get(clinic, f"/api/backoffice/log?since_ms={since}&limit=1000", da)
    assert status == 200
    seen = {e["session_id"] for e in body["entries"]}
    assert cardio in seen and derma not in seen
    assert not any(e["type"] in ("Login", "LookUp") for e in body["entries"])
    org = clinic.staff(Role.ORGANISATION_ADMIN, "olga")
    status, body, _ = await get(clinic, f"/api/backoffice/log?since_ms={since}&limit=1000", org)
    seen = {e["session_id"] for e in body["entries"]}
    assert {cardio, derma} <= seen and any(e["type"] == "LookUp" for e in body["entries"])


@pytest.mark.parametrize("query, named", [
    ("limit=0", '"limit"'), ("limit=1001", '"limit"'), ("offset=-1", '"offset"'), ("offset=100001", '"offset"'),
    ("type=Nonsense", '"type"'), ("type=Login,lookup", '"type"'), ("q=" + "x" * 201, '"q"'),
    ("q=%00x", '"q"'), ("since_ms=abc", '"since_ms"'),
])
async def test_bad_parameters_get_a_coded_error_naming_them(clinic: Clinic, query: str, named: str) -> None:
    # A sub of its own per case: the server is shared by the cases, and a token minted in another
    # second is another sign-in (a Login of its own).
    sub = f"sue-bad-{uuid.uuid4().hex[:8]}"
    sue = clinic.tokens.mint("support", Role.SUPPORT, "Sue", sub=sub)
    for path in ("/api/backoffice/log", "/api/backoffice/log.csv"):
        status, body, _ = await get(clinic, f"{path}?{query}", sue)
        if path.endswith(".csv") and query == "limit=1001":
            assert status == 200  # the CSV takes up to 100000
            continue
        assert status == 400 and body["error"]["code"] == "invalid_message", (path, body)
        assert named in body["error"]["message"], body
    assert [r[0] for r in audit_rows(clinic.server, sub)] in ([], ["Login"], ["Login", "LookUp"])


async def test_the_backoffice_page_is_served(clinic: Clinic) -> None:
    status, _, html = await get(clinic, "/backoffice", None)
    assert status == 200 and '<script src="/static/backoffice.js" defer></script>' in html
    assert (await get(clinic, "/static/backoffice.js", None))[0] == 200


async def test_the_server_runs_retention_and_the_audit_log_survives(tmp_path: Path) -> None:
    """Entries written 40 days ago (by an earlier run of the node) go on the first sweep with
    eventlog_days = 30; recent ones stay; the audit log (audit_days = 0) keeps everything."""
    data = tmp_path / "node" / "data"
    data.mkdir(parents=True)
    now = now_ms()
    eventlog = EventLog(data / "events.sqlite3")
    for t in (now - 40 * DAY_MS, now - 31 * DAY_MS, now - 29 * DAY_MS):
        eventlog.extend([LogEntry(time_ms=t, session_id="s_old", kind=EventKind.CONSULTATION, text=f"at {t}"),
                         LogEntry(time_ms=t, session_id="s_old", kind=EventKind.QUALITY_SAMPLE, text="sample")])
    assert eventlog.flush_sync(10)
    eventlog.close()
    audit = AuditLog(data / "audit.sqlite3")
    audit.append_sync(AuditEntry(time_ms=now - 40 * DAY_MS, kind=AuditKind.LOOKUP, sub="sue", name="Sue",
                                 role="support", what="session", target="s_old", ip="10.0.0.1"))
    audit.close()
    server = start_server(tmp_path / "node", "[workflow]\nretention_sweep_s = 0.5\n"
                                              "[retention]\neventlog_days = 30\neventlog_policy = \"delete\"\n")
    try:
        async with aiohttp.ClientSession() as http:
            clinic = Clinic(server, authority(server.data_dir), http)
            admin = clinic.staff(Role.ORGANISATION_ADMIN, "olga")
            runs: list[dict[str, Any]] = []

            async def swept() -> bool:
                runs[:] = (await clinic.ok("GET", "/api/jobs/retention", admin))["runs"]
                return any(r["eventlog"] and r["eventlog"]["deleted"] for r in runs)

            await wait_until(swept, timeout=30, message="a retention run that deleted event-log entries")
            first = [r for r in runs if r["eventlog"]["deleted"]][-1]
            assert first["ok"] and first["eventlog"]["deleted"] == 4 and first["audit"] is None
            assert now - 30 * DAY_MS - 60_000 < first["eventlog"]["before_ms"] < now_ms() - 30 * DAY_MS + 1
            support = clinic.tokens.mint("support", Role.SUPPORT, "Sue", sub="sue")
            left = (await clinic.ok("GET", "/api/sessions/s_old/events", support))["events"]
            assert [e["time_ms"] for e in left] == [now - 29 * DAY_MS]
            conn = sqlite3.connect(f"{(data / 'audit.sqlite3').resolve().as_uri()}?mode=ro", uri=True)
            try:
                kept = conn.execute("SELECT time_ms, target FROM audit WHERE time_ms < ?", (now,)).fetchall()
            finally:
                conn.close()
            assert kept == [(now - 40 * DAY_MS, "s_old")]
    finally:
        server.stop()
    assert "event/audit log retention" in server.log_path.read_text()
