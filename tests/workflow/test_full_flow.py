"""The whole consultation over the wire with real clients and real media: book → patient joins
early (sees "early" and the announcement) → the clinician's queue updates live → admit → both in
the media room receiving each other → chat during the call → end → complete; the session's event
log tells each step in order, in support staff's words, next to the media entries."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from media import aiortc_internals
from rooms.model import Role
from tests.call_helpers import Participant
from tests.helpers import wait_until
from tests.server import start_server
from tests.workflow.helpers import MINUTE_MS, Clinic, now_ms, wait_event


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


@pytest.fixture
async def clinic(tmp_path: Path) -> AsyncIterator[Clinic]:
    server = start_server(tmp_path)
    clinic = Clinic.open(server)
    yield clinic
    await clinic.close()
    server.stop()


async def test_full_consultation_over_the_wire(clinic: Clinic) -> None:
    server = clinic.server
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")
    desk_token = clinic.staff(Role.CLINICIAN, "dr-who", "cardio")
    await clinic.waiting_room(admin, "wr-cardio", "Cardiology", "cardio")
    booking = await clinic.book(admin, department="cardio", room_id="wr-cardio", patient="p-anna",
                                clinician="dr-who", appointment_ms=now_ms() + 30 * MINUTE_MS)
    sid = booking["consultation"]["session_id"]
    assert booking["patient_link"].endswith(f"/#token={booking['patient_token']}")
    await clinic.ok("POST", "/api/waiting-rooms/wr-cardio/announcements", admin,
                    {"text": "Running 10 minutes late", "expires_in_s": 600})

    desk = await clinic.connect(desk_token)
    patient, doctor = Participant(server.ws_url, "Anna"), Participant(server.ws_url, "Dr Who")
    try:
        watched = await desk.request("queue.watch", room_id="wr-cardio")
        assert watched["queue"] == []

        # The patient opens the link 30 minutes early: they wait in their consultation's room.
        await patient.client.connect()
        joined = await patient.client.join(booking["patient_token"])
        assert joined["session_id"] == sid and joined["room"] == sid
        entered = await patient.client.request("waiting_room.enter", device_check_passed=True)
        assert (entered["arrival"], entered["position"], entered["room_id"]) == ("early", 1, "wr-cardio")
        assert [a["text"] for a in entered["announcements"]] == ["Running 10 minutes late"]

        # The clinician's queue updates live.
        update = await wait_event(desk, "queueUpdated", lambda d: len(d["queue"]) == 1)
        line = update["data"]["queue"][0]
        assert (line["session_id"], line["patient_ref"], line["arrival"], line["position"]) == \
            (sid, "p-anna", "early", 1)

        admitted = await desk.request("consultation.admit", session_id=sid)
        assert admitted["room"] == sid and admitted["consultation"]["state"] == "in_progress"
        await wait_event(patient.client, "admitted", lambda d: d == {"session_id": sid, "room": sid})
        await wait_event(desk, "queueUpdated", lambda d: d["queue"] == [])

        # Both in the media room, each receiving the other's media.
        await doctor.client.connect()
        assert (await doctor.client.join(admitted["token"]))["session_id"] == sid
        stream_p = await patient.publish()
        stream_d = await doctor.publish()
        await patient.client.wait_event("streamCreated", stream__stream_id=stream_d)
        await doctor.client.wait_event("streamCreated", stream__stream_id=stream_p)
        sub_d = await doctor.subscribe(stream_p)
        sub_p = await patient.subscribe(stream_d)
        await wait_until(lambda: len(sub_d.received.frames) > 5 and len(sub_p.received.frames) > 5
                         and sub_d.received.audio_frames > 10 and sub_p.received.audio_frames > 10,
                         timeout=60, message="video and audio both ways")

        # Chat during the call: HTML is text, stored and delivered verbatim.
        channel = entered["channel_id"]
        hello = "<script>alert('x')</script> Hello & <b>welcome</b>"
        sent = await patient.client.request("chat.send", channel_id=channel, text=hello)
        assert sent["message"]["text"] == hello and sent["message"]["phase"] == "in_call"
        got = await doctor.client.wait_event("chatMessage", message__message_id=sent["message"]["message_id"])
        assert got["data"]["message"]["text"] == hello
        reply = await doctor.client.request("chat.send", channel_id=channel, text="Hi Anna")
        await patient.client.wait_event("chatMessage", message__message_id=reply["message"]["message_id"])
        history = await doctor.client.request("chat.history", channel_id=channel)
        assert [(m["sender"], m["text"]) for m in history["messages"]] == [("p-anna", hello), ("dr-who", "Hi Anna")]

        ended = await doctor.client.request("consultation.end", session_id=sid)
        assert ended["consultation"]["state"] == "ended" and ended["consultation"]["duration_ms"] >= 0
        await wait_event(patient.client, "consultationChanged", lambda d: d["consultation"]["state"] == "ended")
        completed = await desk.request("consultation.complete", session_id=sid)
        assert completed["consultation"]["state"] == "completed"
    finally:
        for p in (doctor, patient):
            await p.close()
        await desk.close()

    # The event log of the one session id support staff paste, oldest first.
    log = await clinic.backoffice(sid)
    expected = [
        ("VideoSession", rf"Video session id \({sid}\) has been created for room \"{sid}\""),
        ("Consultation", r"Patient logged in via link\."),
        ("Consultation", r"Patient is ready\. The patient has clicked the link and is now logged in\."),
        ("Queue", r"Patient was added to the queue by patient\. Booked consultation \(early\)\."),
        ("Queue", r"Patient was admitted from Cardiology by clinician dr-who after waiting \d+\.\d\d seconds\."),
        ("VideoSession", (rf"Video session id \({sid}\) has been created for video consultation between "
                         r"patient p-anna and clinician dr-who\.")),
        ("Consultation", r"Video consultation is in progress between patient p-anna and clinician dr-who\."),
        ("Chat", r"Chat message sent by patient during the call \(\d+ characters\)\."),
        ("Chat", r"Chat message sent by clinician during the call \(7 characters\)\."),
        ("Consultation", (r"Video consultation between patient and clinician has ended and lasted \d+\.\d\d seconds\. "
                         r"Patient: p-anna Clinician: dr-who\.")),
        ("Consultation", r"Consultation completed, waiting for journal\."),
    ]
    # Booking and the link happened first (and are in the log too).
    assert log[0][0] == "Consultation" and log[0][1].startswith("Booked a consultation at ")
    assert log[1][0] == "Consultation" and log[1][1].startswith("Join link sent to patient p-anna with token ")
    rest = log[2:]
    assert len(rest) == len(expected), rest
    for (kind, text), (want_kind, pattern) in zip(rest, expected, strict=True):
        assert kind == want_kind and re.fullmatch(pattern, text), (kind, text, pattern)
    # Media entries share the session: both connected, and the chat text never reached the log.
    events = await clinic.events(sid)
    connects = [e["text"] for e in events if e["kind"] == "serverDetectedConnect"]
    assert connects == ["Server detected connect: Anna (patient)", "Server detected connect: dr-who (clinician)"]
    assert not any("<script>" in e["text"] or "<script>" in str(e["payload"]) for e in events)
    times = [e["time_ms"] for e in events]
    assert times == sorted(times)
