"""A three-party consultation in real headless Chromium against a real server: the clinician admits
the patient, adds a guest (an interpreter) from the call page, the guest opens the link and joins
the same session id, the patient shares the screen (getDisplayMedia: Chromium's fake screen under
the suite's own flags), and every page decodes every video stream of the others (3 on the
clinician's and the guest's pages: two cameras and the screen; 2 on the patient's). The inspector's
summary lists the guest; the event log says "started screen sharing"; the clinician removes the
guest, whose page says so and whose link stops working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rooms.model import Role
from tests.browser.conftest import BrowserFactory, ServerHandle
from tests.browser.test_consultation_pages import (
    INBOUND_VIDEO_JS,
    MEDIA_TIMEOUT,
    api_ok,
    book,
    click,
    consult_state,
    open_clinician,
    open_patient,
    type_into,
    wait_page,
)
from tests.call_helpers import authority, get_json
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.browser

PEOPLE_JS = "return consult.people.map((p) => p.name + ' (' + p.role + ')').sort();"
STAGE_JS = """
const stage = document.getElementById('stage');
const screen = stage.querySelector('.tile.remote.screen');
const other = stage.querySelector('.tile.remote:not(.screen)');
return {group: stage.classList.contains('group'), tiles: stage.querySelectorAll('.tile.remote').length,
        screenWidth: screen ? screen.getBoundingClientRect().width : 0,
        otherWidth: other ? other.getBoundingClientRect().width : 0,
        stageWidth: stage.getBoundingClientRect().width,
        screenLabel: screen ? screen.querySelector('figcaption').textContent : null};
"""


def wait_decoding_all(driver: Any, who: str, streams: int) -> list[dict[str, Any]]:
    """Until the page receives ``streams`` videos and has decoded frames of every one."""
    last: list[dict[str, Any]] = []

    def decoding() -> bool:
        nonlocal last
        stats = driver.execute_async_script(INBOUND_VIDEO_JS)
        assert isinstance(stats, list), f"inboundVideoStats() failed: {stats}"
        last = stats
        return len(stats) == streams and all(entry["framesDecoded"] > 0 for entry in stats)

    try:
        wait_until_sync(decoding, timeout=MEDIA_TIMEOUT * 2, interval=0.5,
                        message=f"{who} to decode {streams} remote videos")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last inbound stats: {last}; page: {consult_state(driver)}") from None
    return last


def test_three_party_call_with_a_guest_and_a_screen_share(
    server: ServerHandle, browser: BrowserFactory, tmp_path: Path
) -> None:
    booking = book(server, minutes_from_now=5)
    clinician = open_clinician(browser, booking)
    patient = open_patient(browser, booking)
    wait_page(clinician, "the patient in the queue", lambda s: len(s["queue"]) == 1)
    click(clinician, f'.admit[data-session-id="{booking.session_id}"]')
    wait_page(clinician, "the clinician in the call", lambda s: s["state"] == "in_call")
    wait_page(patient, "the patient in the call", lambda s: s["state"] == "in_call")

    # The clinician adds an interpreter from the call page and hands over the link.
    type_into(clinician, "#guest-name", "Ida (interpreter)")
    click(clinician, "#guest-invite")
    wait_until_sync(lambda: clinician.execute_script("return consult.guests.length") == 1, timeout=30,
                    message="the guest's link on the clinician's page")
    link = clinician.execute_script("return consult.guests[0].guest_link")
    assert link.startswith(server.url + "/#token="), link
    guest = browser()
    guest.get(link)
    state = wait_page(guest, "the guest in the call", lambda s: s["state"] == "in_call")
    assert state["view"] == "guest", state
    assert guest.execute_script("return consult.sessionId") == booking.session_id
    def lists_guest(page: Any) -> bool:
        return "Ida (interpreter) (guest)" in page.execute_script(PEOPLE_JS)

    wait_until_sync(lambda: lists_guest(clinician) and lists_guest(patient), timeout=30,
                    message="the guest listed in the call")
    assert sorted(guest.execute_script(PEOPLE_JS)) == ["Anna (patient)", "Dr Who (clinician)"]

    # The patient shares the screen: a second stream, the big tile on the others' pages.
    click(patient, "#share-screen")
    wait_until_sync(lambda: patient.execute_script("return Boolean(consult.screenShare)"), timeout=30,
                    message="the patient's screen share")
    stats = {"clinician": wait_decoding_all(clinician, "the clinician", 3),
             "guest": wait_decoding_all(guest, "the guest", 3),
             "patient": wait_decoding_all(patient, "the patient", 2)}
    for who, page in (("clinician", clinician), ("guest", guest)):
        stage = page.execute_script(STAGE_JS)
        assert stage["group"] and stage["tiles"] == 3, (who, stage)
        assert stage["screenWidth"] > 1.5 * stage["otherWidth"] > 0, (who, stage)
        assert stage["screenLabel"].endswith("— screen"), (who, stage)
        assert page.save_screenshot(str(tmp_path / f"{who}-group.png"))
    for state in (consult_state(clinician), consult_state(patient), consult_state(guest)):
        assert state["warning"] is None and state["sessionErrors"] == [], state

    # A phone-sized screen: the grid reflows into two columns, the screen share stays on top.
    guest.set_window_size(390, 844)
    wait_until_sync(lambda: guest.execute_script(STAGE_JS)["stageWidth"] < 390, timeout=10, message="the phone layout")
    phone = guest.execute_script(STAGE_JS)
    assert phone["screenWidth"] <= phone["stageWidth"] and phone["otherWidth"] < 0.6 * phone["stageWidth"], phone
    assert guest.save_screenshot(str(tmp_path / "guest-phone.png"))

    # The inspector: the guest is a participant of the consultation's session; the log says who shares.
    support = authority(server.data_dir).mint("support", Role.SUPPORT, "Sue")
    summary = get_json(f"{server.url}/api/sessions/{booking.session_id}/summary", support)
    roles = sorted((p["name"], p["role"]) for p in summary["participants"])
    assert roles == [("Anna", "patient"), ("Dr Who", "clinician"), ("Ida (interpreter)", "guest")], roles
    events = get_json(f"{server.url}/api/sessions/{booking.session_id}/events?limit=10000", support)["events"]
    assert "Stream created: Anna started screen sharing (video)" in [e["text"] for e in events]

    # Stopped from the page: the others' screen tile goes; the log says so.
    click(patient, "#share-screen")
    wait_until_sync(lambda: clinician.execute_script(STAGE_JS)["tiles"] == 2, timeout=30,
                    message="the screen tile gone")

    def stopped() -> bool:
        texts = [e["text"] for e in get_json(f"{server.url}/api/sessions/{booking.session_id}/events?limit=10000",
                                             support)["events"]]
        return any(t.startswith("Stream destroyed: Anna stopped screen sharing.") for t in texts)

    wait_until_sync(stopped, timeout=30, message="stopped screen sharing in the event log")

    # The clinician removes the guest: the guest's page says so, the link no longer opens the call.
    click(clinician, ".remove-guest")
    ended = wait_page(guest, "the guest told they were removed", lambda s: s["state"] == "ended")
    assert ended["finished"] == "You were removed from the consultation", ended
    wait_until_sync(lambda: not lists_guest(patient), timeout=30,
                    message="the guest gone from the patient's list")
    again = browser()
    again.get(link)
    wait_until_sync(lambda: bool(again.execute_script("return window.consult && consult.error")), timeout=30,
                    message="the revoked link refused")
    refused = again.execute_script("return consult.error")
    assert refused["code"] == "forbidden", refused
    booking_state = api_ok(server, "GET", f"/api/consultations/{booking.session_id}", booking.admin_token)
    assert [g["removed_by"] for g in booking_state["consultation"]["guests"]] == ["dr-who"]
    print(f"screenshots: {tmp_path}; stats: {stats}")
