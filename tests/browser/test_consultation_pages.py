"""The consultation pages in real headless Chromium against a real server subprocess.

A consultation is booked over the staff HTTP API; the patient opens their link (`/#token=…`) and
gets the waiting room (early, number 1 in line, the clinic's announcement, device check), the
clinician opens theirs and gets the live queue; Admit puts both in a call where each page decodes
the other's video; chat with HTML in it stays text; End tells the patient the consultation ended.
A walk-in patient opens a shared link (`/#walk_in=…`), gives a name and is in line, seen by name
on the clinician's page; a patient page reloaded while waiting or mid-call comes back where it was.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rooms.model import Role
from tests.browser.conftest import BrowserFactory, ServerHandle
from tests.call_helpers import authority
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.browser

PAGE_TIMEOUT = 60.0
MEDIA_TIMEOUT = 60.0
MINUTE_MS = 60_000

CONSULT_STATE_JS = """
if (!window.consult) { return null; }
const text = (id) => { const n = document.getElementById(id); return n && !n.hidden ? n.textContent : null; };
return {
  active: consult.active,
  view: consult.view,
  state: consult.state,
  error: consult.error,
  warning: consult.warning,
  sessionErrors: consult.sessionErrors,
  arrival: consult.arrival,
  micLevel: consult.micLevel || 0,
  micCheck: document.getElementById('mic-check').textContent,
  position: consult.position,
  status: text('consult-status'),
  arrivalText: text('arrival'),
  positionText: text('position'),
  finished: text('finished-title'),
  announcements: Array.from(document.querySelectorAll('#announcement-list .announcement-text')).map((n) => n.textContent),
  announcementsShown: !document.getElementById('announcements-panel').hidden,
  chat: Array.from(document.querySelectorAll('#chat-log .chat-text')).map((n) => n.textContent),
  chatShown: !document.getElementById('chat').hidden,
  queue: Array.from(document.querySelectorAll('.queue-line')).map((n) => ({
    sessionId: n.dataset.sessionId,
    ref: n.querySelector('.queue-ref').textContent,
    name: n.querySelector('.queue-name') ? n.querySelector('.queue-name').textContent : null,
    nameShown: Boolean(n.querySelector('.queue-name') && n.querySelector('.queue-name').getClientRects().length),
    badge: n.querySelector('.badge').textContent,
    facts: n.querySelector('.queue-facts').textContent,
  })),
};
"""

INBOUND_VIDEO_JS = """
const done = arguments[arguments.length - 1];
consult.inboundVideoStats().then(done, (err) => done({error: String(err)}));
"""


@dataclass
class Booking:
    session_id: str
    room_id: str
    patient_link: str
    clinician_link: str
    admin_token: str
    desk_link: str  # a clinician's own staff token for the department, not tied to the consultation


def api(server: ServerHandle, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    """One staff HTTP API call: status and decoded JSON body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def api_ok(server: ServerHandle, method: str, path: str, token: str, body: Any = None) -> Any:
    status, data = api(server, method, path, token, body)
    assert status in (200, 201), (method, path, status, data)
    return data


def book(server: ServerHandle, *, minutes_from_now: int = 30) -> Booking:
    """A fresh department and waiting room, and one consultation booked with a clinician."""
    suffix = secrets.token_hex(4)
    department = f"dept-{suffix}"
    room_id = f"wr-{suffix}"
    tokens = authority(server.data_dir)
    admin = tokens.mint("staff", Role.DEPARTMENT_ADMIN, "Dana Admin", sub="dana", departments=(department,), ttl_s=3600)
    api_ok(server, "POST", "/api/waiting-rooms", admin, {"room_id": room_id, "name": "Cardiology", "department": department})
    booked = api_ok(server, "POST", "/api/consultations", admin, {
        "department": department, "waiting_room": room_id, "patient_ref": f"p-anna-{suffix}",
        "patient_name": "Anna", "clinician": "dr-who", "clinician_name": "Dr Who",
        "appointment_ms": time.time_ns() // 1_000_000 + minutes_from_now * MINUTE_MS,
    })
    assert booked["clinician_link"], booked
    desk = tokens.mint(f"desk-{suffix}", Role.CLINICIAN, "Dr Who", sub="dr-who", departments=(department,), ttl_s=3600)
    return Booking(booked["consultation"]["session_id"], room_id, booked["patient_link"], booked["clinician_link"],
                   admin, f"{server.url}/?token={desk}")  # an old-style link: still works (see open_clinician)


def consult_state(driver: Any) -> dict[str, Any]:
    state = driver.execute_script(CONSULT_STATE_JS)
    assert state is not None, "window.consult is not defined: consultation.js did not load"
    return dict(state)


def wait_page(driver: Any, what: str, check: Any, timeout: float = PAGE_TIMEOUT) -> dict[str, Any]:
    """Wait until ``check(state)`` holds; fail at once if the page lands in 'error'."""
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        last = consult_state(driver)
        if last["state"] == "error":
            raise AssertionError(f"page went to 'error' while waiting for {what}: {last}")
        return bool(check(last))

    try:
        wait_until_sync(reached, timeout=timeout, interval=0.2, message=what)
    except AssertionError as exc:
        if "went to 'error'" in str(exc):
            raise
        raise AssertionError(f"{exc}; last page state: {last}") from None
    return last


def wait_decoding(driver: Any, who: str) -> list[dict[str, Any]]:
    last: list[dict[str, Any]] = []

    def decoding() -> bool:
        nonlocal last
        stats = driver.execute_async_script(INBOUND_VIDEO_JS)
        assert isinstance(stats, list), f"inboundVideoStats() failed: {stats}"
        last = stats
        return any(entry["framesDecoded"] > 0 for entry in stats)

    try:
        wait_until_sync(decoding, timeout=MEDIA_TIMEOUT, interval=0.5, message=f"{who} to decode remote video")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last inbound stats: {last}; page: {consult_state(driver)}") from None
    return last


def click(driver: Any, selector: str) -> None:
    driver.find_element("css selector", selector).click()


def type_into(driver: Any, selector: str, text: str) -> None:
    field = driver.find_element("css selector", selector)
    field.clear()
    field.send_keys(text)


def open_clinician(browser: BrowserFactory, booking: Booking, *, desk: bool = False) -> Any:
    clinician = browser()
    link = booking.desk_link if desk else booking.clinician_link
    assert ("/?token=" if desk else "/#token=") in link, link
    clinician.get(link)
    wait_page(clinician, "the clinician's queue", lambda s: s["state"] == "queue")
    # The token lives in the fragment: an old ?token= link has been moved there.
    url = clinician.current_url
    assert "?token=" not in url and url.split("#token=", 1)[1] == link.split("token=", 1)[1], url
    return clinician


def open_patient(browser: BrowserFactory, booking: Booking) -> Any:
    patient = browser()
    assert "/#token=" in booking.patient_link and "?" not in booking.patient_link, booking.patient_link
    patient.get(booking.patient_link)
    wait_page(patient, "the patient's waiting room", lambda s: s["state"] == "waiting")
    return patient


def test_patient_waits_clinician_admits_chats_and_ends(
    server: ServerHandle, browser: BrowserFactory, tmp_path: Path
) -> None:
    booking = book(server, minutes_from_now=30)
    api_ok(server, "POST", f"/api/waiting-rooms/{booking.room_id}/announcements", booking.admin_token,
           {"text": "Running 10 minutes late", "expires_in_s": 600})

    clinician = open_clinician(browser, booking)
    desk = consult_state(clinician)
    assert (desk["view"], desk["queue"]) == ("clinician", []), desk

    # The patient opens the link 30 minutes early: the waiting room, in plain words.
    patient = open_patient(browser, booking)
    state = wait_page(patient, "the announcement on the patient page",
                      lambda s: s["announcements"] == ["Running 10 minutes late"])
    assert (state["view"], state["arrival"], state["position"]) == ("patient", "early", 1), state
    assert state["arrivalText"].startswith("You are early for your appointment at "), state
    assert state["positionText"].startswith("You are number 1 in line"), state
    assert state["announcementsShown"] and state["chatShown"], state
    # The device check found the (fake) camera and microphone.
    checks = patient.execute_script(
        "return [document.getElementById('camera-check').dataset.ok, document.getElementById('mic-check').dataset.ok,"
        " document.getElementById('preview-video').videoWidth];"
    )
    assert checks[0] == "true" and checks[1] == "true", checks
    # The microphone level meter moves with the fake device's beeps.
    wait_page(patient, "the microphone meter to move",
              lambda s: s["micLevel"] > 0.1 and s["micCheck"] == "Microphone: working, we can hear you")

    # The clinician's queue shows the patient live, with the early badge.
    desk = wait_page(clinician, "the patient in the clinician's queue", lambda s: len(s["queue"]) == 1)
    line = desk["queue"][0]
    assert line["sessionId"] == booking.session_id, desk
    assert line["ref"].startswith("p-anna-") and line["badge"] == "Early", line
    assert "waiting " in line["facts"] and "appointment " in line["facts"], line

    assert patient.save_screenshot(str(tmp_path / "patient-waiting.png"))
    assert clinician.save_screenshot(str(tmp_path / "clinician-queue.png"))

    # Admit: both pages in the call, each decoding the other's video.
    click(clinician, f'.admit[data-session-id="{booking.session_id}"]')
    wait_page(clinician, "the clinician in the call", lambda s: s["state"] == "in_call" and s["queue"] == [])
    wait_page(patient, "the patient in the call", lambda s: s["state"] == "in_call")
    stats_c = wait_decoding(clinician, "the clinician")
    stats_p = wait_decoding(patient, "the patient")
    assert len(stats_c) == 1 and len(stats_p) == 1, (stats_c, stats_p)

    # Chat with HTML in it: shown verbatim as text, never run.
    hostile = "<b>hi</b><script>window.__x=1</script>"
    type_into(clinician, "#chat-text", hostile)
    click(clinician, "#chat-send")
    wait_page(patient, "the clinician's message on the patient page", lambda s: s["chat"] == [hostile])
    assert patient.execute_script(
        "return [typeof window.__x, document.querySelectorAll('#chat-log b, #chat-log script').length];"
    ) == ["undefined", 0]
    type_into(patient, "#chat-text", "Thank you & see you")
    click(patient, "#chat-send")
    wait_page(clinician, "the patient's reply", lambda s: s["chat"] == [hostile, "Thank you & see you"])
    assert clinician.execute_script("return typeof window.__x;") == "undefined"

    for state in (consult_state(clinician), consult_state(patient)):
        assert state["warning"] is None and state["sessionErrors"] == [], state
    assert patient.save_screenshot(str(tmp_path / "patient-call.png"))
    assert clinician.save_screenshot(str(tmp_path / "clinician-call.png"))

    # End: the patient is told; the clinician completes (journal pending) and is back at the queue.
    click(clinician, "#end-consultation")
    wait_page(clinician, "the wrap-up", lambda s: s["state"] == "wrapup")
    assert clinician.save_screenshot(str(tmp_path / "clinician-wrapup.png"))
    ended = wait_page(patient, "the patient told it ended", lambda s: s["state"] == "ended")
    assert ended["finished"] == "The consultation has ended", ended
    assert patient.find_element("id", "finished-title").is_displayed()
    assert ended["chat"] == [hostile, "Thank you & see you"], ended
    assert patient.save_screenshot(str(tmp_path / "patient-ended.png"))
    click(clinician, "#complete-consultation")
    wait_page(clinician, "the queue again", lambda s: s["state"] == "queue")
    consultation = api_ok(server, "GET", f"/api/consultations/{booking.session_id}", booking.admin_token)
    assert consultation["consultation"]["state"] == "completed", consultation
    print(f"screenshots: {tmp_path}")


def test_desk_announces_patient_leaves_and_comes_back_then_phone_instead(
    server: ServerHandle, browser: BrowserFactory
) -> None:
    """A clinician's own desk token (not the consultation link): the call runs on a second connection."""
    booking = book(server, minutes_from_now=2)  # within the on-time window
    clinician = open_clinician(browser, booking, desk=True)
    patient = open_patient(browser, booking)
    state = consult_state(patient)
    assert state["arrival"] == "on_time" and state["arrivalText"].startswith("You are on time"), state
    assert not state["announcementsShown"], state
    wait_page(clinician, "the patient in the queue", lambda s: [q["badge"] for q in s["queue"]] == ["On time"])

    text = "Back on schedule <i>now</i>"
    type_into(clinician, "#announce-text", text)
    clinician.find_element("css selector", '#announce-expiry option[value="900"]').click()
    click(clinician, "#announce-post")
    wait_page(patient, "the announcement pushed to the patient", lambda s: s["announcements"] == [text])
    assert consult_state(clinician)["announcements"] == [text]
    assert patient.execute_script("return document.querySelectorAll('#announcement-list i').length;") == 0

    click(patient, "#leave-waiting-room")
    left = wait_page(patient, "the patient to leave the line", lambda s: s["state"] == "left")
    assert left["positionText"] == "", left
    wait_page(clinician, "the queue to empty", lambda s: s["queue"] == [])

    # The patient can come back while the link is valid.
    click(patient, "#reenter-waiting-room")
    wait_page(patient, "the patient back in line", lambda s: s["state"] == "waiting" and s["position"] == 1)
    wait_page(clinician, "the patient back in the queue", lambda s: len(s["queue"]) == 1)

    click(clinician, f'.admit[data-session-id="{booking.session_id}"]')
    wait_page(patient, "the patient in the call", lambda s: s["state"] == "in_call")
    wait_decoding(clinician, "the clinician")
    wait_decoding(patient, "the patient")

    click(clinician, "#phone-fallback")
    wait_page(clinician, "the wrap-up", lambda s: s["state"] == "wrapup")
    ended = wait_page(patient, "the patient told about the phone call", lambda s: s["state"] == "ended")
    assert ended["finished"] == "Your clinician will phone you instead", ended
    click(clinician, "#complete-consultation")
    wait_page(clinician, "the queue again", lambda s: s["state"] == "queue")
    consultation = api_ok(server, "GET", f"/api/consultations/{booking.session_id}", booking.admin_token)
    assert consultation["consultation"]["state"] == "completed", consultation


def test_link_opened_too_early_says_when_it_opens(server: ServerHandle, browser: BrowserFactory) -> None:
    booking = book(server, minutes_from_now=3 * 60)  # links open one hour before by default
    patient = browser()
    patient.get(booking.patient_link)

    def failed() -> bool:
        return consult_state(patient)["state"] == "error"

    wait_until_sync(failed, timeout=PAGE_TIMEOUT, interval=0.2, message="the page to show the join error")
    state = consult_state(patient)
    assert state["view"] == "patient" and state["error"]["code"] == "token_not_yet_valid", state
    assert "Your link is not open yet. It opens at " in state["status"], state
    assert "[token_not_yet_valid]" in state["status"], state


def test_walk_in_link_asks_the_name_and_the_clinician_sees_it(
    server: ServerHandle, browser: BrowserFactory, tmp_path: Path
) -> None:
    booking = book(server, minutes_from_now=30)  # only for its department, room and desk link
    api_ok(server, "POST", f"/api/waiting-rooms/{booking.room_id}/announcements", booking.admin_token,
           {"text": "Walk-in hours until 16:00", "expires_in_s": 600})
    link = api_ok(server, "POST", f"/api/waiting-rooms/{booking.room_id}/walk-in-link", booking.admin_token)
    assert link["walk_in_link"] == f"{server.url}/#walk_in={link['walk_in_token']}", link

    # The desk lists the room's current announcement as soon as it loads.
    clinician = open_clinician(browser, booking, desk=True)
    desk = wait_page(clinician, "the current announcement on the desk",
                     lambda s: s["announcements"] == ["Walk-in hours until 16:00"])
    assert desk["announcementsShown"], desk

    patient = browser()
    patient.get(link["walk_in_link"])
    asked = wait_page(patient, "the walk-in page to ask for a name", lambda s: s["state"] == "name")
    assert asked["view"] == "patient", asked
    assert patient.find_element("id", "walk-in-name").is_displayed()
    type_into(patient, "#walk-in-name", "Eva <b>Lund</b>")
    assert patient.save_screenshot(str(tmp_path / "walk-in-name.png"))
    click(patient, "#walk-in-submit")
    state = wait_page(patient, "the walk-in patient in line", lambda s: s["state"] == "waiting")
    assert (state["arrival"], state["position"]) == ("walk_in", 1), state
    assert state["arrivalText"].startswith("You came without an appointment"), state
    assert state["announcements"] == ["Walk-in hours until 16:00"], state
    # The address is now the patient's own link; the walk-in form is gone.
    url = patient.current_url
    assert url.startswith(f"{server.url}/#token=") and "walk_in" not in url, url
    assert patient.execute_script("return document.getElementById('walk-in') === null;")

    # The clinician sees the walk-in by name, with the Walk-in badge; the name is text, not markup.
    desk = wait_page(clinician, "the walk-in in the clinician's queue", lambda s: len(s["queue"]) == 1)
    line = desk["queue"][0]
    assert (line["badge"], line["name"], line["nameShown"]) == ("Walk-in", "Eva <b>Lund</b>", True), line
    assert line["ref"].startswith("walkin"), line
    assert clinician.execute_script("return document.querySelectorAll('.queue-line b').length;") == 0
    assert clinician.save_screenshot(str(tmp_path / "clinician-walk-in.png"))

    # A reload keeps the place: same session, still number 1, no name asked again.
    session_id = line["sessionId"]
    patient.refresh()
    again = wait_page(patient, "the reloaded walk-in page back in line",
                      lambda s: s["state"] == "waiting" and s["position"] == 1)
    assert again["arrival"] == "walk_in" and patient.current_url == url, again
    assert [q["sessionId"] for q in consult_state(clinician)["queue"]] == [session_id]

    click(clinician, f'.admit[data-session-id="{session_id}"]')
    wait_page(patient, "the walk-in in the call", lambda s: s["state"] == "in_call")
    assert clinician.find_element("id", "call-title").text == f"Consultation with Eva <b>Lund</b> ({line['ref']})"
    wait_decoding(clinician, "the clinician")
    wait_decoding(patient, "the patient")
    print(f"screenshots: {tmp_path}")


def test_patient_reload_while_waiting_and_mid_call_comes_back(
    server: ServerHandle, browser: BrowserFactory
) -> None:
    booking = book(server, minutes_from_now=30)
    clinician = open_clinician(browser, booking)
    patient = open_patient(browser, booking)

    # Reloaded while waiting: the same place and still "early for your appointment at …".
    patient.refresh()
    state = wait_page(patient, "the reloaded patient in line", lambda s: s["state"] == "waiting" and s["position"] == 1)
    assert state["arrival"] == "early", state
    assert state["arrivalText"].startswith("You are early for your appointment at "), state

    wait_page(clinician, "the patient in the queue", lambda s: len(s["queue"]) == 1)
    click(clinician, f'.admit[data-session-id="{booking.session_id}"]')
    wait_page(patient, "the patient in the call", lambda s: s["state"] == "in_call")
    wait_decoding(clinician, "the clinician")
    wait_decoding(patient, "the patient")
    before = {e["streamId"] for e in clinician.execute_async_script(INBOUND_VIDEO_JS)}

    # Reloaded mid-call: straight back to the call (no waiting room, no invalid_state), video both ways.
    patient.refresh()
    back = wait_page(patient, "the reloaded patient back in the call", lambda s: s["state"] == "in_call")
    assert back["error"] is None and back["warning"] is None, back
    assert patient.find_element("id", "call").is_displayed()
    assert not patient.find_element("id", "waiting").is_displayed()
    wait_decoding(patient, "the reloaded patient")

    def clinician_sees_the_new_stream() -> bool:
        stats = clinician.execute_async_script(INBOUND_VIDEO_JS)
        return isinstance(stats, list) and any(e["framesDecoded"] > 0 and e["streamId"] not in before for e in stats)

    wait_until_sync(clinician_sees_the_new_stream, timeout=MEDIA_TIMEOUT, interval=0.5,
                    message="the clinician to decode the reloaded patient's video")

    # Ended while away: a reload shows the outcome, not the waiting room.
    click(clinician, "#end-consultation")
    wait_page(patient, "the patient told it ended", lambda s: s["state"] == "ended")
    patient.refresh()
    ended = wait_page(patient, "the reloaded page showing the outcome", lambda s: s["state"] == "ended")
    assert ended["finished"] == "The consultation has ended", ended


def test_patient_removed_by_staff_is_told_so(server: ServerHandle, browser: BrowserFactory) -> None:
    booking = book(server, minutes_from_now=10)
    patient = open_patient(browser, booking)
    wait_page(patient, "the patient in line", lambda s: s["position"] == 1)
    api_ok(server, "POST", f"/api/waiting-rooms/{booking.room_id}/queue/{booking.session_id}/remove",
           booking.admin_token)
    state = wait_page(patient, "the removal on the patient page", lambda s: s["state"] == "left")
    assert state["position"] is None, state
    title = patient.execute_script("return document.getElementById('waiting-title').textContent")
    assert title == "The clinic took you out of the waiting room"
