"""What the consultation pages need from the server: patient names in queue entries, the
appointment in ``waiting_room.enter``, ``consultation.get`` for a reloaded page (a patient reads
only their own consultation), a room's current announcements with its queue, and a rate limit on
``POST /api/walk-in`` per walk-in link (429 ``rate_limited``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from rooms.model import Role
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server
from tests.workflow.helpers import MINUTE_MS, Clinic, now_ms, refused, wait_event

RATE = 3  # walk-ins per link per minute in this module's server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("gaps"),
                          extra_config=f"[workflow]\nwalk_in_per_link_per_min = {RATE}\n")
    yield server
    server.stop()


_n = iter(range(1_000_000))


async def department(clinic: Clinic) -> dict[str, Any]:
    n = next(_n)
    dept, room = f"g{n}", f"wg{n}"
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", dept)
    await clinic.waiting_room(admin, room, "Room G", dept)
    t = clinic.staff
    return {"n": n, "dept": dept, "room": room, "admin": admin, "doctor": t(Role.CLINICIAN, "dr-who", dept),
            "other_doctor": t(Role.CLINICIAN, "dr-x", "elsewhere"), "support": t(Role.SUPPORT, "sue"),
            "org": t(Role.ORGANISATION_ADMIN, "olga")}


def names(queue: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(q["session_id"], q["patient_name"]) for q in queue]


async def test_queue_entries_carry_the_patients_name(clinic: Clinic) -> None:
    d = await department(clinic)
    room = d["room"]
    desk = await clinic.connect(d["doctor"])
    assert (await desk.request("queue.watch", room_id=room))["queue"] == []

    booking = await clinic.book(d["admin"], department=d["dept"], room_id=room, patient=f"p-anna{d['n']}",
                                clinician=None, appointment_ms=now_ms(), patient_name="Anna Berg")
    unnamed = await clinic.ok("POST", "/api/consultations", d["admin"], {
        "department": d["dept"], "waiting_room": room, "patient_ref": f"p-anon{d['n']}", "appointment_ms": now_ms()})
    sid, sid2 = booking["consultation"]["session_id"], unnamed["consultation"]["session_id"]
    assert booking["consultation"]["patient_name"] == "Anna Berg"
    assert unnamed["consultation"]["patient_name"] is None
    for token in (booking["patient_token"], unnamed["patient_token"]):
        patient = await clinic.connect(token)
        await patient.request("waiting_room.enter")
        await patient.close()  # the place in line is kept
    link = await clinic.ok("POST", f"/api/waiting-rooms/{room}/walk-in-link", d["admin"])
    walked = await clinic.ok("POST", "/api/walk-in", link["walk_in_token"], {"name": "  Eva Lund "})
    wsid = walked["consultation"]["session_id"]
    assert walked["consultation"]["patient_name"] == "Eva Lund"

    expected = [(sid, "Anna Berg"), (sid2, None), (wsid, "Eva Lund")]
    pushed = await wait_event(desk, "queueUpdated", lambda e: names(e["queue"]) == expected)
    assert [q["arrival"] for q in pushed["data"]["queue"]][-1] == "walk_in"
    assert names(await clinic.queue(d["doctor"], room)) == expected
    assert names((await desk.request("queue.watch", room_id=room))["queue"]) == expected
    department_view = await clinic.ok("GET", f"/api/departments/{d['dept']}/queue", d["admin"])
    assert names(department_view["waiting_rooms"][0]["queue"]) == expected
    # The stored name, not the token's, is what a re-sent link carries by default; the record keeps it.
    assert (await clinic.consultation(d["org"], sid))["consultation"]["patient_name"] == "Anna Berg"
    await desk.close()


async def test_enter_returns_the_appointment_and_null_for_a_walk_in(clinic: Clinic) -> None:
    d = await department(clinic)
    appointment = now_ms() + 20 * MINUTE_MS
    booking = await clinic.book(d["admin"], department=d["dept"], room_id=d["room"], patient=f"p-early{d['n']}",
                                clinician="dr-who", appointment_ms=appointment)
    patient = await clinic.connect(booking["patient_token"])
    entered = await patient.request("waiting_room.enter")
    assert (entered["arrival"], entered["appointment_ms"]) == ("early", appointment)
    again = await patient.request("waiting_room.enter")  # a reload: the same place, the appointment again
    assert (again["position"], again["appointment_ms"]) == (1, appointment)

    link = await clinic.ok("POST", f"/api/waiting-rooms/{d['room']}/walk-in-link", d["admin"])
    walked = await clinic.ok("POST", "/api/walk-in", link["walk_in_token"], {"name": "Eva"})
    walker = await clinic.connect(walked["patient_token"])
    entered = await walker.request("waiting_room.enter")
    assert (entered["arrival"], entered["appointment_ms"], entered["position"]) == ("walk_in", None, 2)
    for client in (patient, walker):
        await client.close()


async def test_consultation_get_for_the_patient_and_staff(clinic: Clinic) -> None:
    d = await department(clinic)
    appointment = now_ms()
    mine = await clinic.book(d["admin"], department=d["dept"], room_id=d["room"], patient=f"p-me{d['n']}",
                             clinician="dr-who", appointment_ms=appointment, patient_name="Anna")
    theirs = await clinic.book(d["admin"], department=d["dept"], room_id=d["room"], patient=f"p-you{d['n']}",
                               clinician="dr-who", appointment_ms=appointment)
    sid, other_sid = mine["consultation"]["session_id"], theirs["consultation"]["session_id"]
    patient = await clinic.connect(mine["patient_token"])

    # The patient reads their own consultation: by default the one of their link, or by its id.
    got = (await patient.request("consultation.get"))["consultation"]
    assert (got["session_id"], got["state"], got["appointment_ms"], got["patient_name"]) == \
        (sid, "invited", appointment, "Anna")
    assert got["channel_id"] == f"consultation:{sid}" and "link_token" not in got
    assert (await patient.request("consultation.get", session_id=sid))["consultation"] == got
    # Never another one, whether it exists or not.
    assert await refused(patient, "consultation.get", session_id=other_sid) == "forbidden"
    assert await refused(patient, "consultation.get", session_id="s_unknown") == "forbidden"
    assert await refused(patient, "consultation.get", session_id="bad id") == "invalid_message"

    # Mid-call (what a reloaded patient page asks): in progress, with the start time.
    await patient.request("waiting_room.enter")
    desk = await clinic.connect(d["doctor"])
    await desk.request("consultation.admit", session_id=sid)
    got = (await patient.request("consultation.get"))["consultation"]
    assert got["state"] == "in_progress" and got["started_ms"] >= got["ready_ms"]

    # Staff per the permission table: the department's staff, support (metadata) and organisation admins.
    staff = {name: await clinic.connect(d[name]) for name in ("admin", "support", "org", "other_doctor")}
    for client in (desk, staff["admin"], staff["support"], staff["org"]):
        assert (await client.request("consultation.get", session_id=sid))["consultation"]["state"] == "in_progress"
    assert await refused(staff["other_doctor"], "consultation.get", session_id=sid) == "forbidden"
    assert await refused(desk, "consultation.get") == "invalid_message"  # a desk token names no consultation
    assert await refused(desk, "consultation.get", session_id="s_unknown") == "not_found"
    # A clinician's consultation link names its consultation: no id needed.
    assert mine["clinician_token"]
    linked = await clinic.connect(mine["clinician_token"])
    assert (await linked.request("consultation.get"))["consultation"]["session_id"] == sid

    await desk.request("consultation.end", session_id=sid)
    assert (await patient.request("consultation.get"))["consultation"]["state"] == "ended"
    for client in (patient, desk, linked, *staff.values()):
        await client.close()


async def test_queue_watch_and_the_queue_endpoint_list_current_announcements(clinic: Clinic) -> None:
    d = await department(clinic)
    room = d["room"]
    posted = [(await clinic.ok("POST", f"/api/waiting-rooms/{room}/announcements", d["admin"],
                               {"text": text, "expires_in_s": 600}))["announcement"]
              for text in ("Running 10 minutes late", "Coffee machine fixed")]
    await clinic.ok("DELETE", f"/api/waiting-rooms/{room}/announcements/{posted[1]['announcement_id']}", d["admin"])
    short = (await clinic.ok("POST", f"/api/waiting-rooms/{room}/announcements", d["admin"],
                             {"text": "Back in a second", "expires_in_s": 1}))["announcement"]

    def current(watched: dict[str, Any]) -> bool:
        return [a["announcement_id"] for a in watched["announcements"]] == [posted[0]["announcement_id"]]

    desk = await clinic.connect(d["doctor"])
    support = await clinic.connect(d["support"])
    # Withdrawn and expired ones are not shown (the short one expires within a second).

    async def only_the_first() -> bool:
        return current(await desk.request("queue.watch", room_id=room))

    await wait_until(only_the_first, timeout=30, interval=0.2, message="the short announcement to expire")
    watched = await desk.request("queue.watch", room_id=room)
    assert watched["announcements"][0] == {**posted[0], "state": "active"}
    assert current(await support.request("queue.watch", room_id=room))  # support may watch
    assert current(await clinic.ok("GET", f"/api/waiting-rooms/{room}/queue", d["doctor"]))
    assert short["announcement_id"] not in {a["announcement_id"] for a in watched["announcements"]}
    other = await clinic.connect(d["other_doctor"])
    assert await refused(other, "queue.watch", room_id=room) == "forbidden"
    for client in (desk, support, other):
        await client.close()


async def test_walk_in_is_rate_limited_per_link(clinic: Clinic) -> None:
    d = await department(clinic)
    room = d["room"]
    link = (await clinic.ok("POST", f"/api/waiting-rooms/{room}/walk-in-link", d["admin"]))["walk_in_token"]
    other_link = (await clinic.ok("POST", f"/api/waiting-rooms/{room}/walk-in-link", d["doctor"],
                                  {"valid_for_min": 60}))["walk_in_token"]
    assert link != other_link
    for i in range(RATE):
        await clinic.ok("POST", "/api/walk-in", link, {"name": f"Walker {i}"})
    before = await clinic.queue(d["admin"], room)

    headers = {"Authorization": f"Bearer {link}"}
    async with clinic.http.post(clinic.server.url + "/api/walk-in", json={"name": "One too many"},
                                headers=headers) as response:
        status, body = response.status, await response.json()
        retry_after = response.headers.get("Retry-After")
    assert (status, body["error"]["code"]) == (429, "rate_limited"), body
    assert "3 times in the last minute" in body["error"]["message"]
    assert retry_after is not None and 1 <= int(retry_after) <= 60
    # Refused: nobody new in line; another link of the same room is counted on its own.
    assert len(await clinic.queue(d["admin"], room)) == len(before) == RATE
    await clinic.ok("POST", "/api/walk-in", other_link, {"name": "Other link"})
    # Refused tokens never reach the counter: a staff token is still forbidden, not rate limited.
    status, body = await clinic.call("POST", "/api/walk-in", d["admin"])
    assert (status, body["error"]["code"]) == (403, "forbidden")
