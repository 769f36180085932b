"""Abandon, transfer, no-show and phone fallback over the wire and the HTTP API, each with its
recorded times in the consultation/queue records and its entries in the session's event log."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rooms.model import Role
from tests.helpers import wait_until
from tests.server import start_server
from tests.workflow.helpers import MINUTE_MS, Clinic, now_ms, refused, wait_event


@pytest.fixture
async def clinic(tmp_path: Path) -> AsyncIterator[Clinic]:
    server = start_server(tmp_path)
    clinic = Clinic.open(server)
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")
    await clinic.waiting_room(admin, "wr-a", "Cardiology A", "cardio")
    await clinic.waiting_room(admin, "wr-b", "Cardiology B", "cardio")
    yield clinic
    await clinic.close()
    server.stop()


def admin_of(clinic: Clinic) -> str:
    return clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")


def doctor_of(clinic: Clinic) -> str:
    return clinic.staff(Role.CLINICIAN, "dr-who", "cardio")


async def waiting_patient(clinic: Clinic, patient: str, room_id: str = "wr-a",
                          appointment_ms: int | None = None) -> tuple[dict[str, Any], Any]:
    booking = await clinic.book(admin_of(clinic), department="cardio", room_id=room_id, patient=patient,
                                clinician="dr-who", appointment_ms=appointment_ms or now_ms())
    client = await clinic.connect(booking["patient_token"])
    await client.request("waiting_room.enter")
    return booking, client


def kinds_and_texts(log: list[tuple[str, str]], kind: str) -> list[str]:
    return [text for k, text in log if k == kind]


async def test_abandon_records_when_and_how_long(clinic: Clinic) -> None:
    desk = await clinic.connect(doctor_of(clinic))
    await desk.request("queue.watch", room_id="wr-a")
    booking, patient = await waiting_patient(clinic, "p-abe")
    sid = booking["consultation"]["session_id"]
    await wait_event(desk, "queueUpdated", lambda d: [q["session_id"] for q in d["queue"]] == [sid])
    before = now_ms()
    left = await patient.request("waiting_room.leave")
    assert left["session_id"] == sid and left["waited_ms"] >= 0
    assert before <= left["abandoned_ms"] <= now_ms()
    await wait_event(desk, "queueUpdated", lambda d: d["queue"] == [])

    record = await clinic.consultation(doctor_of(clinic), sid)
    entry = record["queue_entry"]
    assert entry["state"] == "abandoned" and entry["abandoned_ms"] == left["abandoned_ms"]
    segment = entry["segments"][-1]
    assert (segment["outcome"], segment["left_ms"]) == ("abandoned", left["abandoned_ms"])
    assert segment["left_ms"] - segment["entered_ms"] == left["waited_ms"]
    # A booked patient may come back through the link.
    assert record["consultation"]["state"] == "invited"
    assert await refused(patient, "waiting_room.leave") == "invalid_state"
    log = await clinic.backoffice(sid)
    assert re.fullmatch(r"Patient left the queue Cardiology A before being admitted, after waiting \d+\.\d\d seconds\.",
                        kinds_and_texts(log, "Queue")[-1])
    back = await patient.request("waiting_room.enter")
    assert back["position"] == 1
    await patient.close()
    await desk.close()


async def test_transfer_keeps_the_session_and_starts_a_segment(clinic: Clinic) -> None:
    desk = await clinic.connect(doctor_of(clinic))
    await desk.request("queue.watch", room_id="wr-b")
    _, first = await waiting_patient(clinic, "p-first", room_id="wr-b")
    booking, patient = await waiting_patient(clinic, "p-tom")
    sid = booking["consultation"]["session_id"]
    moved = await desk.request("consultation.transfer", session_id=sid, to_room_id="wr-b")
    assert (moved["session_id"], moved["room_id"], moved["segment"], moved["position"]) == (sid, "wr-b", 2, 2)
    await wait_event(patient, "positionChanged", lambda d: d == {"session_id": sid, "room_id": "wr-b", "position": 2})
    await wait_event(desk, "queueUpdated", lambda d: [q["patient_ref"] for q in d["queue"]] == ["p-first", "p-tom"])
    assert await clinic.queue(admin_of(clinic), "wr-a") == []

    entry = (await clinic.consultation(admin_of(clinic), sid))["queue_entry"]
    first_seg, second_seg = entry["segments"]
    assert (first_seg["room_id"], first_seg["outcome"], first_seg["by"]) == ("wr-a", "transferred", "dr-who")
    assert second_seg["room_id"] == "wr-b" and second_seg["entered_ms"] == first_seg["left_ms"]
    assert second_seg["left_ms"] is None
    assert await refused(desk, "consultation.transfer", session_id=sid, to_room_id="wr-b") == "invalid_input"
    log = await clinic.backoffice(sid)
    assert kinds_and_texts(log, "Queue")[-1] == "Patient was transferred from Cardiology A to Cardiology B by clinician."

    # Admitted from the second room: the whole wait is kept per segment.
    admitted = await desk.request("consultation.admit", session_id=sid)
    assert admitted["consultation"]["state"] == "in_progress"
    await wait_event(patient, "admitted", lambda d: d["session_id"] == sid)
    await wait_event(first, "positionChanged", lambda d: d["position"] == 1)
    for client in (patient, first, desk):
        await client.close()


async def test_no_show_after_the_grace_period_only(clinic: Clinic) -> None:
    admin = admin_of(clinic)
    late = await clinic.book(admin, department="cardio", room_id="wr-a", patient="p-gone", clinician="dr-who",
                             appointment_ms=now_ms() - 20 * MINUTE_MS)
    soon = await clinic.book(admin, department="cardio", room_id="wr-a", patient="p-soon", clinician="dr-who",
                             appointment_ms=now_ms() + 30 * MINUTE_MS)
    sid_soon = soon["consultation"]["session_id"]
    status, body = await clinic.call("POST", f"/api/consultations/{sid_soon}/no-show", admin)
    assert (status, body["error"]["code"]) == (409, "too_early")
    assert (await clinic.consultation(admin, sid_soon))["consultation"]["state"] == "invited"

    sid = late["consultation"]["session_id"]
    before = now_ms()
    data = await clinic.ok("POST", f"/api/consultations/{sid}/no-show", admin)
    assert data["consultation"]["state"] == "no_show"
    assert before <= data["consultation"]["no_show_ms"] <= now_ms()
    assert (await clinic.backoffice(sid))[-1] == \
        ("Consultation", "Patient did not show up for the consultation (no-show).")
    # The patient's link no longer leads anywhere.
    client = await clinic.connect(late["patient_token"])
    assert await refused(client, "waiting_room.enter") == "invalid_state"
    await client.close()


async def test_phone_fallback_from_the_queue_and_from_a_call(clinic: Clinic) -> None:
    desk = await clinic.connect(doctor_of(clinic))
    await desk.request("queue.watch", room_id="wr-a")
    # 1. Video never attempted: the patient is taken out of the queue, the video session id is empty.
    booking, patient = await waiting_patient(clinic, "p-phone")
    sid = booking["consultation"]["session_id"]
    before = now_ms()
    phoned = (await desk.request("consultation.phone_fallback", session_id=sid))["consultation"]
    assert (phoned["state"], phoned["phone"], phoned["duration_ms"]) == ("phone", True, None)
    assert before <= phoned["ended_ms"] <= now_ms()
    await wait_event(patient, "consultationChanged", lambda d: d["consultation"]["state"] == "phone")
    await wait_event(desk, "queueUpdated", lambda d: d["queue"] == [])
    log = await clinic.backoffice(sid)
    assert log[-2][0] == "Queue" and "taken out of the queue Cardiology A" in log[-2][1]
    assert log[-1] == ("VideoSession", ("Video consultation ended as phone consultation. Clinician: dr-who "
                                       "Patient: p-phone VideoSessionId: "))
    assert (await desk.request("consultation.complete", session_id=sid))["consultation"]["state"] == "completed"

    # 2. During a call: the duration is kept and the video session id names the media room.
    booking2, patient2 = await waiting_patient(clinic, "p-call")
    sid2 = booking2["consultation"]["session_id"]
    await desk.request("consultation.admit", session_id=sid2)
    phoned2 = (await desk.request("consultation.phone_fallback", session_id=sid2))["consultation"]
    assert phoned2["duration_ms"] == phoned2["ended_ms"] - phoned2["started_ms"] >= 0
    assert (await clinic.backoffice(sid2))[-1] == (
        "VideoSession", (f"Video consultation ended as phone consultation. Clinician: dr-who Patient: p-call "
                        f"VideoSessionId: {sid2}"))
    await wait_until(lambda: any(e["event"] == "consultationChanged" for e in patient2.events), timeout=30)
    for client in (patient, patient2, desk):
        await client.close()
