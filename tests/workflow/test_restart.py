"""Restart with patients waiting and chat history present: stop the server (SIGTERM, and
separately SIGKILL) and start it on the same data dir; queues, positions and chat are intact.

The workflow store commits synchronously, so even a SIGKILL loses nothing it acknowledged
(the event log's side of that promise is checked in tests/test_durability.py).
A dropped connection keeps the patient's place: they come back with the same link."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from rooms.model import Role
from tests.server import start_server
from tests.workflow.helpers import MINUTE_MS, Clinic, now_ms


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_queues_positions_and_chat_survive_a_restart(tmp_path: Path, stop_signal: int) -> None:
    server = start_server(tmp_path)
    clinic = Clinic.open(server)
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")
    await clinic.waiting_room(admin, "wr-a", "Cardiology", "cardio")
    patients = []
    for name in ("p-one", "p-two", "p-three"):
        booking = await clinic.book(admin, department="cardio", room_id="wr-a", patient=name, clinician="dr-who",
                                    appointment_ms=now_ms() + 10 * MINUTE_MS)
        client = await clinic.connect(booking["patient_token"])
        await client.request("waiting_room.enter")
        patients.append((booking, client))
    texts = ["Is the doctor running late?", "<img src=x onerror=alert(1)>", "Thanks"]
    first_booking, first = patients[0]
    channel = f"consultation:{first_booking['consultation']['session_id']}"
    for text in texts:
        await first.request("chat.send", channel_id=channel, text=text)
    # The second patient gives up: only two remain waiting.
    await patients[1][1].request("waiting_room.leave")
    queue_before = await clinic.queue(admin, "wr-a")
    assert [q["patient_ref"] for q in queue_before] == ["p-one", "p-three"]
    for _, client in patients:
        await client.close()
    await clinic.close()
    server.stop(stop_signal)

    restarted = start_server(tmp_path, data_dir=server.data_dir)
    clinic = Clinic.open(restarted)
    try:
        queue_after = await clinic.queue(admin, "wr-a")
        assert [(q["position"], q["session_id"], q["arrival"], q["entered_ms"]) for q in queue_after] == \
            [(q["position"], q["session_id"], q["arrival"], q["entered_ms"]) for q in queue_before]
        # The patient reconnects with the same link: still in line, same place, chat intact.
        again = await clinic.connect(first_booking["patient_token"])
        entered = await again.request("waiting_room.enter")
        assert (entered["position"], entered["entered_ms"]) == (1, queue_before[0]["entered_ms"])
        history = await again.request("chat.history", channel_id=channel)
        assert [m["text"] for m in history["messages"]] == texts
        doctor = await clinic.connect(clinic.staff(Role.CLINICIAN, "dr-who", "cardio"))
        assert [m["text"] for m in (await doctor.request("chat.history", channel_id=channel))["messages"]] == texts
        # The queue still works: admitting the first moves the other up.
        third = await clinic.connect(patients[2][0]["patient_token"])
        await doctor.request("consultation.admit", session_id=queue_after[0]["session_id"])
        assert (await third.request("waiting_room.enter"))["position"] == 1
        for client in (again, doctor, third):
            await client.close()
    finally:
        await clinic.close()
        restarted.stop()
