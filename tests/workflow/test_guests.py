"""Guests (a relative, an interpreter) added to a consultation, over the wire and the HTTP API,
against a real server: the guest's link joins the consultation's own session id, the guest reads
nothing of the workflow, and removing them revokes the link and takes them out of the call
(``forceDisconnected``); refused actors change nothing; every step is in the event log."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from loadtest.client import RequestFailed, SignallingClient
from rooms.model import Role
from tests.helpers import wait_until
from tests.media.peers import Subscriber, publisher_offer
from tests.server import ServerProcess, start_server
from tests.workflow.helpers import Clinic, now_ms, refused, wait_event

WORKFLOW_EVENTS = {"queueUpdated", "positionChanged", "admitted", "consultationChanged", "chatMessage",
                   "announcement", "removedFromQueue"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("guests"))
    yield server
    server.stop()


_n = iter(range(1_000_000))


async def in_call(clinic: Clinic) -> dict[str, Any]:
    """A department, a booked patient admitted by the clinician: both joined the consultation's room."""
    n = next(_n)
    dept, room = f"g{n}", f"gw{n}"
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", dept)
    await clinic.waiting_room(admin, room, "Room G", dept)
    booking = await clinic.book(admin, department=dept, room_id=room, patient=f"pg{n}", clinician="dr-who",
                                appointment_ms=now_ms())
    sid = booking["consultation"]["session_id"]
    patient = await clinic.connect(booking["patient_token"])
    await patient.request("waiting_room.enter")
    desk = await clinic.connect(clinic.staff(Role.CLINICIAN, "dr-who", dept))
    admitted = await desk.request("consultation.admit", session_id=sid)
    doctor = await clinic.connect(admitted["token"])
    return {"dept": dept, "sid": sid, "admin": admin, "patient": patient, "desk": desk, "doctor": doctor,
            "other_doctor": clinic.staff(Role.CLINICIAN, "dr-x", "elsewhere"),
            "support": clinic.staff(Role.SUPPORT, "sue")}


async def join_refused(clinic: Clinic, token: str) -> str:
    client = await SignallingClient(clinic.server.ws_url).connect()
    try:
        await client.join(token)
    except RequestFailed as exc:
        return exc.code
    finally:
        await client.close()
    raise AssertionError("the join succeeded")


async def test_a_guest_joins_the_consultations_session_reads_nothing_and_is_removed(clinic: Clinic) -> None:
    c = await in_call(clinic)
    sid, desk, doctor, patient = c["sid"], c["desk"], c["doctor"], c["patient"]
    assert doctor.joined["session_id"] == patient.joined["session_id"] == sid

    # Only the consultation's clinicians (and admins) add guests; refused actors change nothing.
    before = (await clinic.consultation(c["admin"], sid))["consultation"]
    others = [await clinic.connect(c[name]) for name in ("other_doctor", "support")]
    for client in (patient, *others):
        assert await refused(client, "consultation.invite_guest", session_id=sid, name="Eve") == "forbidden"
    assert (await clinic.consultation(c["admin"], sid))["consultation"] == before
    assert await refused(desk, "consultation.invite_guest", session_id=sid, name="") == "invalid_message"
    assert await refused(desk, "consultation.invite_guest", session_id=sid) == "invalid_message"
    assert await refused(desk, "consultation.invite_guest", session_id="s_none", name="Eve") == "not_found"

    invited = await doctor.request("consultation.invite_guest", session_id=sid, name="  Ida Interpreter ")
    guest_info = invited["guest"]
    assert guest_info["name"] == "Ida Interpreter" and guest_info["invited_by"] == "dr-who"
    assert guest_info["removed_ms"] is None and invited["guest_link"].endswith(f"/#token={invited['guest_token']}")
    assert [g["guest_id"] for g in invited["consultation"]["guests"]] == [guest_info["guest_id"]]
    claims = clinic.tokens.verify(invited["guest_token"])
    assert (claims.role, claims.room, claims.consultation, claims.link) == (Role.GUEST, sid, sid, guest_info["guest_id"])

    # The guest joins the consultation's own session and is seen by the others.
    guest = await clinic.connect(invited["guest_token"])
    assert (guest.joined["session_id"], guest.joined["role"]) == (sid, "guest")
    assert {x["role"] for x in guest.joined["connections"]} == {"patient", "clinician"}
    created = await wait_event(patient, "connectionCreated", lambda e: e["connection"]["role"] == "guest")
    assert created["data"]["connection"]["name"] == "Ida Interpreter"

    # A guest reads nothing of the workflow, over the wire or HTTP.
    channel = invited["consultation"]["channel_id"]
    for type_, fields in [("consultation.get", {"session_id": sid}), ("consultation.get", {}),
                          ("chat.history", {"channel_id": channel}), ("chat.send", {"channel_id": channel, "text": "hi"}),
                          ("consultation.end", {"session_id": sid}), ("queue.watch", {"room_id": "gw0"}),
                          ("consultation.invite_guest", {"session_id": sid, "name": "Mallory"}),
                          ("consultation.remove_guest", {"session_id": sid, "guest_id": guest_info["guest_id"]})]:
        assert await refused(guest, type_, **fields) == "forbidden", type_
    status, body = await clinic.call("GET", f"/api/consultations/{sid}", invited["guest_token"])
    assert (status, body["error"]["code"]) == (403, "forbidden")
    await patient.request("chat.send", channel_id=channel, text="only for the two of us")
    await wait_event(doctor, "chatMessage", lambda e: e["message"]["text"] == "only for the two of us")
    assert [e["event"] for e in guest.events if e["event"] in WORKFLOW_EVENTS] == []

    # A hand-made guest token for the room (a guest id never issued) is refused at the door.
    forged = clinic.tokens.mint(sid, Role.GUEST, "Mallory", sub="g_forged", consultation=sid, link="g_forged")
    assert await join_refused(clinic, forged) == "forbidden"

    # Removed: told why, the others see a forced disconnect, the socket closes, the link is dead.
    removed = await doctor.request("consultation.remove_guest", session_id=sid, guest_id=guest_info["guest_id"])
    assert removed["guest"]["removed_by"] == "dr-who" and removed["guest"]["removed_ms"] is not None
    told = await wait_event(guest, "removedFromCall", lambda e: True)
    assert told["data"]["session_id"] == sid and told["data"]["reason"] == "forceDisconnected"
    gone = await wait_event(patient, "connectionDestroyed", lambda e: e["connection"]["role"] == "guest")
    assert gone["data"]["reason"] == "forceDisconnected"
    await asyncio.wait_for(guest.closed.wait(), 30)
    assert await join_refused(clinic, invited["guest_token"]) == "forbidden"
    assert await refused(doctor, "consultation.remove_guest", session_id=sid,
                         guest_id=guest_info["guest_id"]) == "invalid_state"
    assert await refused(doctor, "consultation.remove_guest", session_id=sid, guest_id="g_none") == "not_found"
    assert await refused(doctor, "consultation.remove_guest", session_id=sid, guest_id="bad id") == "invalid_message"

    events = await clinic.events(sid)
    texts = [e["text"] for e in events]
    gid = guest_info["guest_id"]
    assert f"Guest Ida Interpreter ({gid}) was added by clinician dr-who." in texts
    assert f"Guest Ida Interpreter ({gid}) was removed by clinician dr-who." in texts
    joined = [e for e in events if e["kind"] == "serverDetectedConnect" and e["payload"].get("role") == "guest"]
    assert [e["payload"]["name"] for e in joined] == ["Ida Interpreter"]
    left = [e for e in events if e["kind"] == "disconnect" and e["connection_id"] == guest.joined["connection_id"]]
    assert [e["payload"]["reason"] for e in left] == ["forceDisconnected"]
    refusals = [e["text"] for e in events if e["kind"] == "tokenRejected"]
    assert any("was not issued" in t for t in refusals) and any("was revoked" in t for t in refusals), refusals
    for client in (desk, doctor, patient, *others):
        await client.close()


async def test_the_booking_api_adds_and_removes_guests_within_the_consultations_window(clinic: Clinic) -> None:
    n = next(_n)
    dept, room = f"h{n}", f"hw{n}"
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", dept)
    await clinic.waiting_room(admin, room, "Room H", dept)
    booking = await clinic.book(admin, department=dept, room_id=room, patient=f"ph{n}", clinician="dr-who",
                                appointment_ms=now_ms())
    sid = booking["consultation"]["session_id"]
    path = f"/api/consultations/{sid}/guests"
    for token in (clinic.staff(Role.SUPPORT, "sue"), clinic.staff(Role.CLINICIAN, "dr-x", "elsewhere"),
                  booking["patient_token"]):
        status, body = await clinic.call("POST", path, token, {"name": "Eve"})
        assert (status, body["error"]["code"]) == (403, "forbidden")
    for bad in ({}, {"name": ""}, {"name": 5}, {"name": "x" * 81}):
        status, body = await clinic.call("POST", path, admin, bad)
        assert (status, body["error"]["code"]) == (400, "invalid_message"), bad

    made = await clinic.ok("POST", path, admin, {"name": "Rolf (son)"})
    assert made["guest_link"] == f"{clinic.server.url}/#token={made['guest_token']}"
    # The guest link works in the consultation's window, as the patient's does.
    assert (made["valid_from_ms"], made["valid_until_ms"]) == (booking["links_valid_from_ms"],
                                                                 booking["links_valid_until_ms"])
    guest = await clinic.connect(made["guest_token"])
    assert guest.joined["session_id"] == sid
    gid = made["guest"]["guest_id"]
    status, body = await clinic.call("DELETE", f"{path}/{gid}", clinic.staff(Role.SUPPORT, "sue"))
    assert (status, body["error"]["code"]) == (403, "forbidden")
    out = await clinic.ok("DELETE", f"{path}/{gid}", admin)
    assert out["guest"]["removed_by"] == "dana"
    await asyncio.wait_for(guest.closed.wait(), 30)
    assert await join_refused(clinic, made["guest_token"]) == "forbidden"
    status, body = await clinic.call("DELETE", f"{path}/g_none", admin)
    assert (status, body["error"]["code"]) == (404, "not_found")

    # Once the consultation is over, no guest link works and none can be added.
    second = await clinic.ok("POST", path, admin, {"name": "Ines"})
    await clinic.ok("POST", f"/api/consultations/{sid}/cancel", admin)
    assert await join_refused(clinic, second["guest_token"]) == "forbidden"
    status, body = await clinic.call("POST", path, admin, {"name": "Late"})
    assert (status, body["error"]["code"]) == (409, "invalid_state")
    await guest.close()


async def test_a_guest_shares_a_screen_that_the_patient_decodes_until_removed(clinic: Clinic) -> None:
    """Real aiortc peers: the guest publishes camera and screen (two streams of one connection);
    the patient decodes the screen; the event log says who started and stopped screen sharing;
    removing the guest ends both streams with ``forceDisconnected``."""
    c = await in_call(clinic)
    sid, doctor, patient = c["sid"], c["doctor"], c["patient"]
    invited = await doctor.request("consultation.invite_guest", session_id=sid, name="Rolf")
    guest = await clinic.connect(invited["guest_token"])
    peers: list[RTCPeerConnection] = []
    streams: dict[str, str] = {}
    for source in ("camera", "screen"):
        pc = await publisher_offer(video=True, audio=source == "camera")
        peers.append(pc)
        out = await guest.request("publish", offer={"type": "offer", "sdp": pc.localDescription.sdp},
                                  video_source=source)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=out["answer"]["sdp"], type="answer"))
        streams[source] = out["stream_id"]
    created = await wait_event(patient, "streamCreated", lambda e: e["stream"]["stream_id"] == streams["screen"])
    assert created["data"]["stream"]["video_source"] == "screen"
    await wait_event(patient, "streamCreated", lambda e: e["stream"]["stream_id"] == streams["camera"])
    data = await patient.request("subscribe", stream_id=streams["screen"])
    viewer = Subscriber()
    answer = await viewer.answer(data["offer"]["sdp"])
    await patient.request("answer", subscription_id=data["subscription_id"], answer={"type": "answer", "sdp": answer})
    await wait_until(lambda: len(viewer.received.frames) >= 5, timeout=60, message="screen frames decoded")

    await doctor.request("consultation.remove_guest", session_id=sid, guest_id=invited["guest"]["guest_id"])
    for stream_id in streams.values():
        gone = await wait_event(patient, "streamDestroyed", lambda e, s=stream_id: e["stream"]["stream_id"] == s)
        assert gone["data"]["reason"] == "forceDisconnected"
    await wait_event(patient, "subscriptionEnded", lambda e: e["stream_id"] == streams["screen"])
    events = await clinic.events(sid)
    screen = [(e["kind"], e["text"]) for e in events if e.get("stream_id") == streams["screen"]
              and e["kind"] in ("streamCreated", "streamDestroyed")]
    assert screen == [("streamCreated", "Stream created: Rolf started screen sharing (video)"),
                      ("streamDestroyed", "Stream destroyed: Rolf stopped screen sharing. Reason: forceDisconnected")]
    for pc in peers:
        await pc.close()
    await viewer.close()
    for client in (guest, doctor, patient, c["desk"]):
        await client.close()
