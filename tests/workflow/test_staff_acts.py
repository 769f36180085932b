"""Removed by staff, journal done, withdrawn announcements, walk-ins and re-sent join links over
the wire and the HTTP API: the happy path with the entries recorded in the event log (kinds and
texts in order), refused actors (``forbidden``, nothing changed), wrong states and unknown ids."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from loadtest.client import SignallingClient
from rooms.model import Role
from tests.server import ServerProcess, start_server
from tests.workflow.helpers import Clinic, now_ms, refused, wait_event


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("acts"))
    yield server
    server.stop()


_n = iter(range(1_000_000))


async def department(clinic: Clinic) -> dict[str, Any]:
    """A fresh department with two waiting rooms and its staff."""
    n = next(_n)
    dept = f"d{n}"
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", dept)
    await clinic.waiting_room(admin, f"wa{n}", "Room A", dept)
    await clinic.waiting_room(admin, f"wb{n}", "Room B", dept)
    t = clinic.staff
    return {"dept": dept, "room": f"wa{n}", "room_b": f"wb{n}", "admin": admin,
            "doctor": t(Role.CLINICIAN, "dr-who", dept), "org": t(Role.ORGANISATION_ADMIN, "olga"),
            "support": t(Role.SUPPORT, "sue"), "other_doctor": t(Role.CLINICIAN, "dr-x", "elsewhere"),
            "other_admin": t(Role.DEPARTMENT_ADMIN, "ed", "elsewhere"), "n": n}


async def waiting(clinic: Clinic, d: dict[str, Any], patient: str) -> tuple[str, dict[str, Any], SignallingClient]:
    booking = await clinic.book(d["admin"], department=d["dept"], room_id=d["room"], patient=f"{patient}{d['n']}",
                                clinician="dr-who", appointment_ms=now_ms())
    client = await clinic.connect(booking["patient_token"])
    await client.request("waiting_room.enter")
    return booking["consultation"]["session_id"], booking, client


async def state(clinic: Clinic, d: dict[str, Any], sid: str) -> Any:
    """What a refused request must leave alone: the records and the session's event log."""
    record = await clinic.ok("GET", f"/api/consultations/{sid}", d["org"])
    queue = [(q["session_id"], q["position"]) for q in await clinic.queue(d["org"], d["room"])]
    return record, queue, await clinic.backoffice(sid)


async def room_log(clinic: Clinic, room_id: str) -> list[tuple[str, str]]:
    return await clinic.backoffice(f"room:{room_id}")


# --- queue.remove --------------------------------------------------------------------------


async def test_staff_remove_a_waiting_patient_over_the_wire(clinic: Clinic) -> None:
    d = await department(clinic)
    desk = await clinic.connect(d["doctor"])
    await desk.request("queue.watch", room_id=d["room"])
    sid, _, patient = await waiting(clinic, d, "p-rem")
    sid2, _, patient2 = await waiting(clinic, d, "p-next")
    await wait_event(patient2, "positionChanged", lambda e: e["position"] == 2)

    # Refused actors change nothing.
    before = await state(clinic, d, sid)
    others = {name: await clinic.connect(d[name]) for name in ("support", "other_doctor", "other_admin")}
    for client in (*others.values(), patient2, patient):
        assert await refused(client, "queue.remove", session_id=sid) == "forbidden"
    assert await state(clinic, d, sid) == before

    before_ms = now_ms()
    out = await desk.request("queue.remove", session_id=sid)
    assert (out["session_id"], out["room_id"]) == (sid, d["room"])
    assert before_ms <= out["removed_ms"] <= now_ms() and out["waited_ms"] >= 0
    pushed = await wait_event(patient, "removedFromQueue", lambda e: e["session_id"] == sid)
    assert pushed["data"] == {"session_id": sid, "room_id": d["room"], "removed_ms": out["removed_ms"]}
    await wait_event(desk, "queueUpdated", lambda e: [q["session_id"] for q in e["queue"]] == [sid2])
    await wait_event(patient2, "positionChanged", lambda e: e["position"] == 1)

    record = await clinic.consultation(d["admin"], sid)
    entry = record["queue_entry"]
    assert (entry["state"], entry["removed_ms"], entry["room_id"]) == ("removed", out["removed_ms"], None)
    assert (entry["segments"][-1]["outcome"], entry["segments"][-1]["by"]) == ("removed", "dr-who")
    assert record["consultation"]["state"] == "invited"  # a booked patient's link still works
    log = await clinic.backoffice(sid)
    assert [k for k, _ in log] == ["Consultation", "Consultation", "VideoSession", "Consultation", "Consultation",
                                   "Queue", "Queue"]
    assert [t for _, t in log[-4:]] == [
        "Patient logged in via link.", "Patient is ready. The patient has clicked the link and is now logged in.",
        "Patient was added to the queue by patient. Booked consultation (on time).",
        "Patient was removed from the queue Room A by clinician.",
    ]

    # Wrong state and unknown ids.
    assert await refused(desk, "queue.remove", session_id=sid) == "invalid_state"
    assert await refused(desk, "queue.remove", session_id="s_unknown") == "not_found"
    assert await refused(desk, "queue.remove", session_id="bad id") == "invalid_message"
    for client in (desk, patient, patient2, *others.values()):
        await client.close()


async def test_staff_remove_over_http_and_a_removed_walk_in_is_over(clinic: Clinic) -> None:
    d = await department(clinic)
    sid, _, patient = await waiting(clinic, d, "p-http")
    room, path = d["room"], f"/api/waiting-rooms/{d['room']}/queue/{sid}/remove"
    before = await state(clinic, d, sid)
    for token in (d["support"], d["other_doctor"], d["other_admin"]):
        status, body = await clinic.call("POST", path, token)
        assert (status, body["error"]["code"]) == (403, "forbidden")
    cases = [(f"/api/waiting-rooms/{d['room_b']}/queue/{sid}/remove", 404, "not_found"),  # waits in room A
             (f"/api/waiting-rooms/wr-nowhere/queue/{sid}/remove", 404, "not_found"),
             (f"/api/waiting-rooms/{room}/queue/s_unknown/remove", 404, "not_found")]
    for bad_path, code, error in cases:
        status, body = await clinic.call("POST", bad_path, d["admin"])
        assert (status, body["error"]["code"]) == (code, error), bad_path
    assert await state(clinic, d, sid) == before

    data = await clinic.ok("POST", path, d["admin"])
    assert data["queue_entry"]["state"] == "removed"
    await wait_event(patient, "removedFromQueue", lambda e: e["session_id"] == sid)
    assert (await clinic.backoffice(sid))[-1] == ("Queue", "Patient was removed from the queue Room A by department admin.")
    status, body = await clinic.call("POST", path, d["admin"])
    assert (status, body["error"]["code"]) == (409, "invalid_state")

    # A walk-in removed by staff: nothing to come back to, the consultation is cancelled.
    link = await clinic.ok("POST", f"/api/waiting-rooms/{room}/walk-in-link", d["admin"])
    walked = await clinic.ok("POST", "/api/walk-in", link["walk_in_token"], {"name": "Eva"})
    wsid = walked["consultation"]["session_id"]
    await clinic.ok("POST", f"/api/waiting-rooms/{room}/queue/{wsid}/remove", d["admin"])
    assert (await clinic.consultation(d["admin"], wsid))["consultation"]["state"] == "cancelled"
    await patient.close()


# --- consultation.journal ------------------------------------------------------------------


async def test_journal_closes_a_completed_consultation(clinic: Clinic) -> None:
    d = await department(clinic)
    sid, _, patient = await waiting(clinic, d, "p-jour")
    desk = await clinic.connect(d["doctor"])
    admin = await clinic.connect(d["admin"])
    other = await clinic.connect(d["other_doctor"])
    await desk.request("consultation.admit", session_id=sid)
    assert await refused(desk, "consultation.journal", session_id=sid) == "invalid_state"  # in progress
    await desk.request("consultation.end", session_id=sid)
    await desk.request("consultation.complete", session_id=sid)

    before = await state(clinic, d, sid)
    for client in (admin, other, patient):  # a clinical act: the department's clinicians only
        assert await refused(client, "consultation.journal", session_id=sid) == "forbidden"
    assert await state(clinic, d, sid) == before

    done = (await desk.request("consultation.journal", session_id=sid))["consultation"]
    assert done["state"] == "journal_done" and done["journal_ms"] >= done["completed_ms"]
    await wait_event(patient, "consultationChanged", lambda e: e["consultation"]["state"] == "journal_done")
    texts = [t for k, t in await clinic.backoffice(sid) if k == "Consultation"]
    assert re.fullmatch(r"Video consultation between patient and clinician has ended and lasted \d+\.\d\d seconds\. "
                        r"Patient: p-jour\d+ Clinician: dr-who\.", texts[-3])
    assert texts[-2:] == ["Consultation completed, waiting for journal.", "Journal note written, consultation closed."]
    assert await refused(desk, "consultation.journal", session_id=sid) == "invalid_state"
    assert await refused(desk, "consultation.journal", session_id="s_unknown") == "not_found"

    # Over HTTP (staff tools): a phone consultation, completed, then journal done.
    sid2, _, patient2 = await waiting(clinic, d, "p-jhttp")
    await desk.request("consultation.phone_fallback", session_id=sid2)
    status, body = await clinic.call("POST", f"/api/consultations/{sid2}/journal", d["doctor"])
    assert (status, body["error"]["code"]) == (409, "invalid_state")  # not completed yet
    await desk.request("consultation.complete", session_id=sid2)
    for token in (d["admin"], d["other_doctor"], d["support"]):
        status, body = await clinic.call("POST", f"/api/consultations/{sid2}/journal", token)
        assert (status, body["error"]["code"]) == (403, "forbidden")
    data = await clinic.ok("POST", f"/api/consultations/{sid2}/journal", d["doctor"])
    assert data["consultation"]["state"] == "journal_done"
    assert (await clinic.backoffice(sid2))[-1] == ("Consultation", "Journal note written, consultation closed.")
    status, body = await clinic.call("POST", "/api/consultations/s_unknown/journal", d["doctor"])
    assert (status, body["error"]["code"]) == (404, "not_found")
    for client in (patient, patient2, desk, admin, other):
        await client.close()


# --- announcement.withdraw -----------------------------------------------------------------


async def test_withdraw_an_announcement(clinic: Clinic) -> None:
    d = await department(clinic)
    room = d["room"]
    _, _, patient = await waiting(clinic, d, "p-ann")
    posted = (await clinic.ok("POST", f"/api/waiting-rooms/{room}/announcements", d["admin"],
                              {"text": "Running 10 minutes late", "expires_in_s": 600}))["announcement"]
    aid = posted["announcement_id"]
    await wait_event(patient, "announcement", lambda e: e["announcement"]["state"] == "active")
    desk = await clinic.connect(d["doctor"])
    await desk.request("queue.watch", room_id=room)
    others = [await clinic.connect(d[name]) for name in ("support", "other_doctor")]
    for client in (*others, patient):
        assert await refused(client, "announcement.withdraw", room_id=room, announcement_id=aid) == "forbidden"
    for token in (d["support"], d["other_admin"]):
        status, body = await clinic.call("DELETE", f"/api/waiting-rooms/{room}/announcements/{aid}", token)
        assert (status, body["error"]["code"]) == (403, "forbidden")
    assert [a["announcement_id"] for a in (await patient.request("waiting_room.enter"))["announcements"]] == [aid]

    out = (await desk.request("announcement.withdraw", room_id=room, announcement_id=aid))["announcement"]
    assert (out["announcement_id"], out["state"], out["text"]) == (aid, "withdrawn", "Running 10 minutes late")
    await wait_event(patient, "announcement", lambda e: e["announcement"] == out)
    await wait_event(desk, "announcement", lambda e: e["announcement"] == out)
    assert (await patient.request("waiting_room.enter"))["announcements"] == []
    log = await room_log(clinic, room)
    assert log[-2][0] == "Queue" and log[-2][1].startswith("Service announcement posted in Room A until ")
    assert log[-1] == ("Queue", "Service announcement withdrawn in Room A.")

    # Wrong state and unknown ids, on the wire and over HTTP.
    assert await refused(desk, "announcement.withdraw", room_id=room, announcement_id=aid) == "invalid_state"
    assert await refused(desk, "announcement.withdraw", room_id=room, announcement_id="a_unknown") == "not_found"
    assert await refused(desk, "announcement.withdraw", room_id="wr-nowhere", announcement_id=aid) == "not_found"
    second = (await clinic.ok("POST", f"/api/waiting-rooms/{room}/announcements", d["admin"],
                              {"text": "Coffee machine fixed"}))["announcement"]
    path = f"/api/waiting-rooms/{room}/announcements/{second['announcement_id']}"
    assert (await clinic.ok("DELETE", path, d["admin"]))["announcement"]["state"] == "withdrawn"
    status, body = await clinic.call("DELETE", path, d["admin"])
    assert (status, body["error"]["code"]) == (409, "invalid_state")
    status, body = await clinic.call("DELETE", f"/api/waiting-rooms/{room}/announcements/a_unknown", d["admin"])
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert (await room_log(clinic, room))[-1] == ("Queue", "Service announcement withdrawn in Room A.")
    for client in (patient, desk, *others):
        await client.close()


# --- walk-in ---------------------------------------------------------------------------------


async def test_walk_in_link_and_walk_in(clinic: Clinic) -> None:
    d = await department(clinic)
    room = d["room"]
    desk = await clinic.connect(d["doctor"])
    await desk.request("queue.watch", room_id=room)
    for token in (d["support"], d["other_admin"], d["other_doctor"]):
        status, body = await clinic.call("POST", f"/api/waiting-rooms/{room}/walk-in-link", token)
        assert (status, body["error"]["code"]) == (403, "forbidden")
    for path, body_in, code, error in ((f"/api/waiting-rooms/{room}/walk-in-link", {"valid_for_min": 0}, 400,
                                        "invalid_message"),
                                       ("/api/waiting-rooms/wr-nowhere/walk-in-link", None, 404, "not_found")):
        status, body = await clinic.call("POST", path, d["admin"], body_in)
        assert (status, body["error"]["code"]) == (code, error)
    assert await room_log(clinic, room) == [("Queue", "Waiting room Room A was opened by department admin.")]

    before = now_ms()
    link = await clinic.ok("POST", f"/api/waiting-rooms/{room}/walk-in-link", d["admin"], {"valid_for_min": 90})
    assert link["walk_in_link"].endswith(f"/#walk_in={link['walk_in_token']}")
    assert before // 1000 * 1000 <= link["valid_from_ms"] and link["valid_until_ms"] - link["valid_from_ms"] == 90 * 60_000
    default = await clinic.ok("POST", f"/api/waiting-rooms/{room}/walk-in-link", d["doctor"])
    assert default["valid_until_ms"] - default["valid_from_ms"] == 480 * 60_000
    issued = (await room_log(clinic, room))[-2]
    assert re.fullmatch(r"Walk-in link for waiting room Room A issued by dana with token \S+…\(truncated\), "
                        r"valid until .+\.", issued[1])
    assert link["walk_in_token"] not in issued[1]
    # The shared link itself is no ticket into a media room.
    lurker = await SignallingClient(clinic.server.ws_url).connect()
    try:
        joined = await lurker.request_raw({"type": "join", "token": link["walk_in_token"]})
        assert (joined["ok"], joined["error"]["code"]) == (False, "forbidden")
    finally:
        await lurker.close()

    # Two patients use the same link: two consultations without a booking, in line in order.
    first = await clinic.ok("POST", "/api/walk-in", link["walk_in_token"], {"name": "Eva"})
    second = await clinic.ok("POST", "/api/walk-in", link["walk_in_token"])
    c1, c2 = first["consultation"], second["consultation"]
    assert (c1["appointment_ms"], c1["state"], c1["department"], first["position"]) == \
        (None, "patient_ready", d["dept"], 1)
    assert second["position"] == 2 and c1["patient_ref"] != c2["patient_ref"]
    assert first["queue_entry"]["segments"][0]["arrival"] == "walk_in"
    await wait_event(desk, "queueUpdated", lambda e: [(q["session_id"], q["arrival"]) for q in e["queue"]] ==
                     [(c1["session_id"], "walk_in"), (c2["session_id"], "walk_in")])
    log = await clinic.backoffice(c1["session_id"])
    assert log == [
        ("Consultation", (f"Walk-in consultation (no booking) started by patient {c1['patient_ref']} (Eva) "
                          "in waiting room Room A.")),
        ("Queue", "Patient was added to the queue by patient (walk-in)."),
    ]

    # The walk-in's own token joins the consultation's room; entering returns the place in line.
    patient = await clinic.connect(first["patient_token"])
    entered = await patient.request("waiting_room.enter")
    assert (entered["session_id"], entered["room_id"], entered["arrival"], entered["position"]) == \
        (c1["session_id"], room, "walk_in", 1)
    admitted = await desk.request("consultation.admit", session_id=c1["session_id"])
    assert admitted["consultation"]["state"] == "in_progress"
    await wait_event(patient, "admitted", lambda e: e["session_id"] == c1["session_id"])

    # Only a walk-in link walks in: not a staff token, not a booking's link, not an expired link.
    booking = await clinic.book(d["admin"], department=d["dept"], room_id=room, patient=f"p-b{d['n']}",
                                clinician=None, appointment_ms=now_ms())
    expired = clinic.tokens.mint(room, Role.PATIENT, "Walk-in patient", sub="walk-in", not_before=1,
                                 expires=2, waiting_room=room)
    nowhere = clinic.tokens.mint("wr-gone", Role.PATIENT, "Walk-in patient", sub="walk-in", waiting_room="wr-gone")
    for token, status_code, error in ((d["admin"], 403, "forbidden"), (booking["patient_token"], 403, "forbidden"),
                                      (expired, 401, "token_expired"), (None, 401, "unauthorized"),
                                      (nowhere, 404, "not_found")):
        status, body = await clinic.call("POST", "/api/walk-in", token)
        assert (status, body["error"]["code"]) == (status_code, error)
    assert [q["session_id"] for q in await clinic.queue(d["admin"], room)] == [c2["session_id"]]

    # A walk-in who leaves is over (cancelled): the link makes a new consultation next time.
    third = await clinic.connect(second["patient_token"])
    await third.request("waiting_room.leave")
    assert (await clinic.consultation(d["admin"], c2["session_id"]))["consultation"]["state"] == "cancelled"
    for client in (desk, patient, third):
        await client.close()


# --- resend-link -----------------------------------------------------------------------------


async def test_resend_link_replaces_the_patients_link(clinic: Clinic) -> None:
    d = await department(clinic)
    room = d["room"]
    booking = await clinic.book(d["admin"], department=d["dept"], room_id=room, patient=f"p-sms{d['n']}",
                                clinician="dr-who", appointment_ms=now_ms())
    sid = booking["consultation"]["session_id"]
    path = f"/api/consultations/{sid}/resend-link"
    before = await state(clinic, d, sid)
    for token in (d["support"], d["other_admin"], d["other_doctor"], booking["patient_token"]):
        status, body = await clinic.call("POST", path, token, {"waiting_room": room})
        assert (status, body["error"]["code"]) == (403, "forbidden")
    bad: list[tuple[str, Any, int, str]] = [
        ("/api/consultations/s_unknown/resend-link", {"waiting_room": room}, 404, "not_found"),
        (path, {"waiting_room": "wr-nowhere"}, 404, "not_found"),
        (path, None, 400, "invalid_message"),  # never in a waiting room: which one?
    ]
    for bad_path, body_in, code, error in bad:
        status, body = await clinic.call("POST", bad_path, d["admin"], body_in)
        assert (status, body["error"]["code"]) == (code, error), (bad_path, body_in, body)
    assert await state(clinic, d, sid) == before

    sent = await clinic.ok("POST", path, d["doctor"], {"waiting_room": room, "patient_name": "Anna"})
    assert sent["consultation"]["state"] == "invited" and sent["waiting_room"] == room
    assert sent["patient_token"] != booking["patient_token"]
    assert sent["links_valid_from_ms"] == booking["links_valid_from_ms"]
    log = await clinic.backoffice(sid)
    sent_texts = [t for k, t in log if k == "Consultation" and t.startswith("Join link sent")]
    assert len(sent_texts) == 2
    for text in sent_texts:
        assert re.fullmatch(rf"Join link sent to patient p-sms{d['n']} with token \S{{6}}… to start the consultation\.",
                            text)
    assert sent_texts[0] != sent_texts[1]
    assert not any(sent["patient_token"] in t or booking["patient_token"] in t for _, t in log)

    # The old link no longer gets the patient in; the new one does.
    old = await clinic.connect(booking["patient_token"])
    assert await refused(old, "waiting_room.enter") == "unauthorized"
    new = await clinic.connect(sent["patient_token"])
    assert (await new.request("waiting_room.enter"))["position"] == 1
    # Waiting: no new link now (wrong state); after leaving, the room is known without a body.
    status, body = await clinic.call("POST", path, d["admin"])
    assert (status, body["error"]["code"]) == (409, "invalid_state")
    await new.request("waiting_room.leave")
    again = await clinic.ok("POST", path, d["admin"])
    assert again["waiting_room"] == room
    # A walk-in has no join link to resend.
    link = await clinic.ok("POST", f"/api/waiting-rooms/{room}/walk-in-link", d["admin"])
    walked = await clinic.ok("POST", "/api/walk-in", link["walk_in_token"])
    status, body = await clinic.call("POST", f"/api/consultations/{walked['consultation']['session_id']}/resend-link",
                                     d["admin"])
    assert (status, body["error"]["code"]) == (409, "invalid_state")
    for client in (old, new):
        await client.close()

