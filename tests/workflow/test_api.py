"""The permission matrix and bad input over the HTTP API and the wire: a refused or bad request
gets a coded error and changes nothing (the same records, the same event log)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.client import RequestFailed, SignallingClient
from rooms.model import Role
from signalling.app import create_app
from signalling.config import load_config
from tests.server import ServerProcess, start_server
from tests.workflow.helpers import MINUTE_MS, Clinic, now_ms, refused

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("api"), extra_config="[workflow]\nchat_max_bytes = 64\n")
    yield server
    server.stop()


_rooms = iter(range(1_000_000))


async def setup(clinic: Clinic) -> dict[str, Any]:
    """A fresh department with a waiting room and one booked, waiting patient."""
    n = next(_rooms)
    dept, room = f"dept{n}", f"wr{n}"
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", dept)
    await clinic.waiting_room(admin, room, "Room", dept)
    booking = await clinic.book(admin, department=dept, room_id=room, patient=f"p{n}", clinician="dr-who",
                                appointment_ms=now_ms())
    patient = await clinic.connect(booking["patient_token"])
    await patient.request("waiting_room.enter")
    return {"dept": dept, "room": room, "admin": admin, "sid": booking["consultation"]["session_id"],
            "booking": booking, "patient": patient, "doctor": clinic.staff(Role.CLINICIAN, "dr-who", dept)}


async def snapshot(clinic: Clinic, s: dict[str, Any]) -> Any:
    """Everything a refused request must leave alone."""
    org = clinic.staff(Role.ORGANISATION_ADMIN, "olga")
    queues = await clinic.ok("GET", f"/api/departments/{s['dept']}/queue", org)
    for room in queues["waiting_rooms"]:
        for line in room["queue"]:
            del line["waiting_ms"]  # grows with the clock
    return (await clinic.ok("GET", f"/api/consultations/{s['sid']}", org),
            await clinic.ok("GET", f"/api/departments/{s['dept']}/consultations", org),
            queues, await clinic.backoffice(s["sid"]))


async def test_http_permission_matrix(clinic: Clinic) -> None:
    s = await setup(clinic)
    sid, dept, room = s["sid"], s["dept"], s["room"]
    book = {"department": dept, "waiting_room": room, "patient_ref": "px", "appointment_ms": now_ms()}
    t = clinic.staff
    patient_token = s["booking"]["patient_token"]
    other_clinician, other_admin = t(Role.CLINICIAN, "dr-x", "elsewhere"), t(Role.DEPARTMENT_ADMIN, "ed", "elsewhere")
    support = t(Role.SUPPORT, "sue")
    before = await snapshot(clinic, s)
    forbidden: list[tuple[str, str, str | None, Any]] = [
        ("POST", "/api/consultations", patient_token, book),
        ("POST", "/api/consultations", other_clinician, book),
        ("POST", "/api/consultations", support, book),
        ("POST", f"/api/consultations/{sid}/cancel", support, None),
        ("POST", f"/api/consultations/{sid}/cancel", other_admin, None),
        ("POST", f"/api/consultations/{sid}/cancel", patient_token, None),
        ("POST", f"/api/consultations/{sid}/no-show", other_clinician, None),
        ("GET", f"/api/consultations/{sid}", other_clinician, None),
        ("GET", f"/api/departments/{dept}/consultations", other_admin, None),
        ("GET", f"/api/departments/{dept}/queue", other_clinician, None),
        ("GET", f"/api/waiting-rooms/{room}/queue", other_clinician, None),
        ("POST", "/api/waiting-rooms", s["doctor"], {"room_id": "wr-new", "name": "New", "department": dept}),
        ("POST", "/api/waiting-rooms", other_admin, {"room_id": "wr-new", "name": "New", "department": dept}),
        ("POST", f"/api/waiting-rooms/{room}/announcements", support, {"text": "hello"}),
        ("POST", f"/api/waiting-rooms/{room}/announcements", other_clinician, {"text": "hello"}),
    ]
    for method, path, token, body in forbidden:
        status, data = await clinic.call(method, path, token, body)
        assert (status, data["error"]["code"]) == (403, "forbidden"), (method, path, data)
    status, data = await clinic.call("GET", f"/api/consultations/{sid}", None)
    assert (status, data["error"]["code"]) == (401, "unauthorized")
    assert await snapshot(clinic, s) == before
    # What the table allows: support sees queues and metadata; the clinician of the department books.
    assert [q["session_id"] for q in await clinic.queue(support, room)] == [sid]
    assert (await clinic.consultation(support, sid))["consultation"]["state"] == "patient_ready"
    await clinic.ok("POST", "/api/consultations", s["doctor"], book)
    await s["patient"].close()


async def test_wire_permission_matrix(clinic: Clinic) -> None:
    s = await setup(clinic)
    sid, room, channel = s["sid"], s["room"], f"consultation:{s['sid']}"
    t = clinic.staff
    clients = {name: await clinic.connect(token) for name, token in {
        "dept_admin": t(Role.DEPARTMENT_ADMIN, "dana", s["dept"]),
        "other_clinician": t(Role.CLINICIAN, "dr-x", "elsewhere"),
        "support": t(Role.SUPPORT, "sue"),
        "org_admin": t(Role.ORGANISATION_ADMIN, "olga"),
    }.items()}
    await s["patient"].request("chat.send", channel_id=channel, text="hello")
    before = await snapshot(clinic, s)
    cases: list[tuple[SignallingClient, str, dict[str, Any]]] = [
        (clients["dept_admin"], "consultation.admit", {"session_id": sid}),  # clinical acts: clinicians only
        (clients["org_admin"], "consultation.admit", {"session_id": sid}),
        (clients["other_clinician"], "consultation.admit", {"session_id": sid}),
        (clients["other_clinician"], "consultation.transfer", {"session_id": sid, "to_room_id": room}),
        (clients["support"], "consultation.phone_fallback", {"session_id": sid}),
        (clients["other_clinician"], "queue.watch", {"room_id": room}),
        (s["patient"], "queue.watch", {"room_id": room}),
        (s["patient"], "consultation.admit", {"session_id": sid}),
        (s["patient"], "announcement.post", {"room_id": room, "text": "free coffee"}),
        (clients["support"], "chat.history", {"channel_id": channel}),  # support never reads chat content
        (clients["support"], "chat.send", {"channel_id": channel, "text": "hi"}),
        (clients["dept_admin"], "chat.send", {"channel_id": channel, "text": "hi"}),
        (clients["other_clinician"], "chat.history", {"channel_id": channel}),
        (clients["dept_admin"], "waiting_room.enter", {}),
        (clients["dept_admin"], "waiting_room.leave", {}),
    ]
    for client, type_, fields in cases:
        assert await refused(client, type_, **fields) == "forbidden", (type_, fields)
    assert await snapshot(clinic, s) == before
    for client in (*clients.values(), s["patient"]):
        await client.close()


async def test_bad_input_gets_coded_errors_and_changes_nothing(clinic: Clinic) -> None:
    s = await setup(clinic)
    sid, channel = s["sid"], f"consultation:{s['sid']}"
    doctor = await clinic.connect(s["doctor"])
    patient = s["patient"]
    hostile = "<script>document.cookie</script><img src=x onerror=alert(1)>"  # 61 bytes: under the limit
    await patient.request("chat.send", channel_id=channel, text=hostile)
    before = await snapshot(clinic, s)
    wire_cases = [
        (doctor, "consultation.admit", {"session_id": "s_unknown"}, "not_found"),
        (doctor, "consultation.end", {"session_id": sid}, "invalid_state"),  # waiting, not in a call
        (doctor, "consultation.complete", {"session_id": sid}, "invalid_state"),
        (doctor, "consultation.transfer", {"session_id": sid, "to_room_id": "wr-nowhere"}, "not_found"),
        (doctor, "queue.watch", {"room_id": "wr-nowhere"}, "not_found"),
        (doctor, "chat.history", {"channel_id": "consultation:s_unknown"}, "not_found"),
        (patient, "chat.send", {"channel_id": channel, "text": "x" * 65}, "invalid_input"),  # over 64 bytes
        (patient, "chat.send", {"channel_id": channel, "text": "é" * 33}, "invalid_input"),  # 66 bytes
        (patient, "chat.send", {"channel_id": channel, "text": "   "}, "invalid_input"),
        (patient, "chat.send", {"channel_id": channel, "text": "bell\u0007"}, "invalid_input"),
        (patient, "chat.send", {"channel_id": channel, "text": 5}, "invalid_message"),
        (patient, "consultation.admit", {"session_id": "no spaces allowed"}, "invalid_message"),
        (doctor, "announcement.post", {"room_id": s["room"], "text": "x", "expires_in_s": 0}, "invalid_message"),
    ]
    for client, type_, fields, code in wire_cases:
        assert await refused(client, type_, **fields) == code, (type_, fields)
    org = clinic.staff(Role.ORGANISATION_ADMIN, "olga")
    book = {"department": s["dept"], "waiting_room": s["room"], "patient_ref": "px", "appointment_ms": now_ms()}
    http_cases: list[tuple[str, str, Any, int, str]] = [
        ("GET", "/api/consultations/s_unknown", None, 404, "not_found"),
        ("POST", "/api/consultations/s_unknown/cancel", None, 404, "not_found"),
        ("GET", "/api/waiting-rooms/wr-nowhere/queue", None, 404, "not_found"),
        ("POST", "/api/consultations", {**book, "waiting_room": "wr-nowhere"}, 404, "not_found"),
        ("POST", "/api/consultations", {**book, "department": "other"}, 400, "invalid_input"),
        ("POST", "/api/consultations", {k: v for k, v in book.items() if k != "appointment_ms"}, 400,
         "invalid_message"),
        ("POST", "/api/consultations", {**book, "appointment": "tomorrow"}, 400, "invalid_message"),
        ("POST", "/api/consultations", {**book, "appointment_ms": None, "appointment": "2026-01-01T09:00:00"}, 400,
         "invalid_message"),
        ("POST", "/api/consultations", [1, 2], 400, "invalid_message"),
        ("POST", "/api/waiting-rooms", {"room_id": s["room"], "name": "Again", "department": s["dept"]}, 409,
         "conflict"),
        ("POST", f"/api/consultations/{sid}/no-show", None, 409, "invalid_state"),  # patient is here
    ]
    for method, path, body, status, code in http_cases:
        got_status, data = await clinic.call(method, path, org, body)
        assert (got_status, data["error"]["code"]) == (status, code), (method, path, body, data)
    assert await snapshot(clinic, s) == before

    # Duplicate admits: one winner, even when concurrent.
    doctor2 = await clinic.connect(s["doctor"])
    results = await asyncio.gather(doctor.request("consultation.admit", session_id=sid),
                                   doctor2.request("consultation.admit", session_id=sid), return_exceptions=True)
    errors = [r for r in results if isinstance(r, RequestFailed)]
    assert len(errors) == 1 and errors[0].code == "invalid_state", results
    assert await refused(doctor, "consultation.admit", session_id=sid) == "invalid_state"
    log = await clinic.backoffice(sid)
    assert sum(1 for kind, text in log if kind == "Queue" and text.startswith("Patient was admitted")) == 1
    # The hostile text is stored and returned verbatim, as text; the log never holds it.
    history = await doctor.request("chat.history", channel_id=channel)
    assert [m["text"] for m in history["messages"]] == [hostile]
    assert not any("<script>" in text for _, text in log)
    for client in (doctor, doctor2, patient):
        await client.close()


async def test_join_links_work_only_inside_their_window(clinic: Clinic) -> None:
    n = next(_rooms)
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", f"dept{n}")
    await clinic.waiting_room(admin, f"wr{n}", "Room", f"dept{n}")
    for offset, code in ((3 * 60 * MINUTE_MS, "token_not_yet_valid"), (-3 * 60 * MINUTE_MS, "token_expired")):
        appointment = now_ms() + offset
        booking = await clinic.book(admin, department=f"dept{n}", room_id=f"wr{n}", patient=f"p{n}{code}",
                                    clinician="dr-who", appointment_ms=appointment)
        # Valid from one hour before to one hour after the appointment (the default).
        assert booking["links_valid_from_ms"] == (appointment - 60 * MINUTE_MS) // 1000 * 1000
        assert booking["links_valid_until_ms"] == (appointment + 60 * MINUTE_MS) // 1000 * 1000
        claims = clinic.tokens.verify(booking["clinician_token"], now=appointment / 1000)
        assert (claims.role, claims.room, claims.departments) == \
            (Role.CLINICIAN, booking["consultation"]["session_id"], (f"dept{n}",))
        client = await SignallingClient(clinic.server.ws_url).connect()
        with pytest.raises(RequestFailed) as info:
            await client.join(booking["patient_token"])
        assert info.value.code == code
        await client.close()


def test_openapi_describes_every_route(tmp_path: Path) -> None:
    text = (REPO / "docs" / "openapi.yaml").read_text()
    assert text.startswith("openapi: 3.1")
    documented = set(re.findall(r"^  (/[^:\s]*):\s*$", text, flags=re.MULTILINE))
    app = create_app(load_config(env={}, overrides={"server": {"data_dir": str(tmp_path)}}))
    # The JSON endpoints; the pages (/, /inspector, /static/) and /ws are not HTTP API.
    served = {r.resource.canonical for r in app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith(("/api/", "/healthz", "/metrics"))}
    assert served <= documented, served - documented
    assert "/api/consultations" in served
