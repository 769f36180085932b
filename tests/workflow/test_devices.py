"""The device check advises, never blocks: a patient whose camera was denied, or who has no
devices at all, still enters the waiting room; the clinician's queue (pushed and over HTTP) says
which devices work and why not; entering again while waiting updates it; the session's event log
keeps it in the queue entry's words. Unknown device states are refused at the edge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rooms.model import Role
from tests.server import start_server
from tests.workflow.helpers import MINUTE_MS, Clinic, now_ms, refused, wait_event


@pytest.fixture
async def clinic(tmp_path: Path) -> AsyncIterator[Clinic]:
    server = start_server(tmp_path)
    clinic = Clinic.open(server)
    yield clinic
    await clinic.close()
    server.stop()


async def test_patients_without_camera_enter_and_the_queue_says_why(clinic: Clinic) -> None:
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")
    await clinic.waiting_room(admin, "wr-cardio", "Cardiology", "cardio")
    desk = await clinic.connect(clinic.staff(Role.CLINICIAN, "dr-who", "cardio"))
    bookings = [await clinic.book(admin, department="cardio", room_id="wr-cardio", patient=ref, clinician=None,
                                  appointment_ms=now_ms() + 5 * MINUTE_MS) for ref in ("p-1", "p-2", "p-3")]
    patients = []
    try:
        await desk.request("queue.watch", room_id="wr-cardio")
        for booking in bookings:
            patients.append(await clinic.connect(booking["patient_token"]))
        denied, missing, old = patients
        # A failed check (the old flag) no longer keeps anyone out.
        await denied.request("waiting_room.enter", device_check_passed=False,
                             devices={"camera": "denied", "microphone": "ok"})
        await missing.request("waiting_room.enter", devices={"camera": "not_found", "microphone": "not_found"})
        await old.request("waiting_room.enter", device_check_passed=True)
        update = await wait_event(desk, "queueUpdated", lambda d: len(d["queue"]) == 3)
        lines = {q["patient_ref"]: q["devices"] for q in update["data"]["queue"]}
        assert lines == {
            "p-1": {"camera": "denied", "microphone": "ok", "media": "audio_only", "problems": ["camera denied"]},
            "p-2": {"camera": "not_found", "microphone": "not_found", "media": "none",
                    "problems": ["no camera", "no microphone"]},
            "p-3": {"camera": "unknown", "microphone": "unknown", "media": "unknown", "problems": []},
        }
        # The camera allowed after a reload: entering again while waiting updates the queue.
        await denied.request("waiting_room.enter", devices={"camera": "ok", "microphone": "ok"})
        update = await wait_event(desk, "queueUpdated", lambda d: d["queue"][0]["devices"]["camera"] == "ok")
        assert update["data"]["queue"][0]["devices"]["media"] == "audio_video"
        http_lines = {q["patient_ref"]: q["devices"]["problems"] for q in await clinic.queue(admin, "wr-cardio")}
        assert http_lines == {"p-1": [], "p-2": ["no camera", "no microphone"], "p-3": []}
        # Hostile or mistyped input is refused at the edge, costing nothing else.
        assert await refused(missing, "waiting_room.enter", devices={"camera": "exploded"}) == "invalid_message"
        assert await refused(missing, "waiting_room.enter", devices={"camera": "ok", "x": 1}) == "invalid_message"
    finally:
        for client in (*patients, desk):
            await client.close()
    texts = [text for _, text in await clinic.backoffice(bookings[0]["consultation"]["session_id"])]
    assert any("Device check: camera denied." in t for t in texts), texts
    assert "Patient's device check again: camera and microphone working." in texts
