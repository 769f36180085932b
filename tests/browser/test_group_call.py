"""A three-party consultation in real headless Chromium against a real server: the clinician admits
the patient, adds a guest (an interpreter) from the call page, the guest opens the link and joins
the same session id, the patient shares the screen (getDisplayMedia: Chromium's fake screen under
the suite's own flags), and every page decodes every video stream of the others (3 on the
clinician's and the guest's pages: two cameras and the screen; 2 on the patient's). The inspector's
summary lists the guest; the event log says "started screen sharing"; the clinician removes the
guest, whose page says so and whose link stops working.

A group of six on the demo page: five synthetic participants (pre-encoded media) and one
phone-sized page that decodes all five and lays them out in two columns under the screen share.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from loadtest.hooks import on_keyframe_request
from loadtest.media import PreEncodedTrack, encode_media
from loadtest.peers import PreEncodedPublisher
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


class ScreenPublisher(PreEncodedPublisher):
    """A synthetic participant whose pre-encoded video is published as a screen share."""

    async def publish(self, audio: bool = False, video: bool = True) -> str:
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = PreEncodedTrack("video", self.media)
        transceiver = pc.addTransceiver(track, direction="sendonly")
        on_keyframe_request(transceiver.sender, track.request_keyframe)
        self.tracks["video"] = track
        await pc.setLocalDescription(await pc.createOffer())
        data = await self.client.request("publish", offer={"type": "offer", "sdp": pc.localDescription.sdp},
                                         video_source="screen", name="Slides")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=data["answer"]["sdp"], type="answer"))
        self.stream_id = str(data["stream_id"])
        return self.stream_id


class Synthetic:
    """Five synthetic participants (pre-encoded VP8, no encoder running) on their own event loop in
    a thread, next to the synchronous WebDriver calls: four cameras and one screen share."""

    def __init__(self, server: ServerHandle, room: str) -> None:
        self.server = server
        self.room = room
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.publishers: list[PreEncodedPublisher] = []

    def start(self) -> list[str]:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=120)

    async def _start(self) -> list[str]:
        media = encode_media(seconds=2, fps=15, width=320, height=240, bitrate=250_000, keyframe_interval=30)
        tokens = authority(self.server.data_dir)
        ids = []
        for i in range(5):
            publisher = (ScreenPublisher if i == 4 else PreEncodedPublisher)(self.server.ws_url, media)
            self.publishers.append(publisher)
            await publisher.join(tokens.mint(self.room, Role.PATIENT if i else Role.CLINICIAN, f"Person {i + 1}"))
            ids.append(await publisher.publish())
        return ids

    def stop(self) -> None:
        async def close() -> None:
            for publisher in self.publishers:
                await publisher.close()

        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        self.loop.close()


DEMO_STAGE_JS = """
const grid = document.getElementById('videos');
const rect = (n) => n.getBoundingClientRect();
const cameras = Array.from(grid.querySelectorAll('.tile:not(.screen)')).filter((n) => !n.hidden);
const screen = grid.querySelector('.tile.remote.screen');
return {gridWidth: rect(grid).width, columns: new Set(cameras.map((n) => Math.round(rect(n).left))).size,
        cameras: cameras.length, screenWidth: screen ? rect(screen).width : 0,
        screenTop: screen ? rect(screen).top : null, firstCameraTop: cameras.length ? Math.min(...cameras.map((n) => rect(n).top)) : null};
"""


@pytest.mark.slow
def test_six_people_on_the_demo_page_on_a_phone(server: ServerHandle, browser: BrowserFactory, tmp_path: Path) -> None:
    """A group of six in one demo room: five synthetic participants (one sharing a screen) and a
    phone-sized Chromium page that decodes all five videos, lays the cameras out in two columns
    under the full-width screen share, and shares its own screen with the button."""
    room = f"group-{secrets.token_hex(4)}"
    synthetic = Synthetic(server, room)
    try:
        streams = synthetic.start()
        page = browser()
        page.set_window_size(390, 844)
        page.get(f"{server.url}/?{urlencode({'room': room, 'name': 'Phone', 'role': 'patient', 'autojoin': '1'})}")
        wait_until_sync(lambda: page.execute_script("return window.demo && demo.state") == "joined", timeout=60,
                        message="the demo page joined")

        def decoding() -> bool:
            stats = page.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                " demo.inboundVideoStats().then(done, (err) => done({error: String(err)}));")
            assert isinstance(stats, list), stats
            return len(stats) == 5 and all(s["framesDecoded"] > 0 for s in stats)

        wait_until_sync(decoding, timeout=MEDIA_TIMEOUT * 2, interval=0.5, message="five videos decoded on the phone")
        layout = page.execute_script(DEMO_STAGE_JS)
        # Four remote cameras and the own preview in two columns; the screen share spans the grid, on top.
        assert layout["cameras"] == 5 and layout["columns"] == 2, layout
        assert layout["screenWidth"] >= layout["gridWidth"] - 1 and layout["screenTop"] < layout["firstCameraTop"], layout
        assert page.save_screenshot(str(tmp_path / "demo-phone-six.png"))

        click(page, "#demo-share")
        wait_until_sync(lambda: page.execute_script("return Boolean(demo.screenShare)"), timeout=30,
                        message="the page's screen share")
        publisher = synthetic.publishers[0]
        wait_until_sync(lambda: any(e["event"] == "streamCreated" and e["data"]["stream"]["video_source"] == "screen"
                                    and e["data"]["stream"]["name"] == "Phone (screen)" for e in publisher.client.events),
                        timeout=30, message="the others told of the page's screen share")
        session_id = page.execute_script("return demo.sessionId")
        support = authority(server.data_dir).mint("support", Role.SUPPORT, "Sue")
        click(page, "#demo-share")

        def logged() -> bool:
            texts = [e["text"] for e in get_json(f"{server.url}/api/sessions/{session_id}/events?limit=10000",
                                                 support)["events"]]
            return ("Stream created: Person 5 started screen sharing (video)" in texts
                    and "Stream created: Phone started screen sharing (video)" in texts
                    and any(t.startswith("Stream destroyed: Phone stopped screen sharing.") for t in texts))

        wait_until_sync(logged, timeout=30, message="screen sharing started and stopped in the event log")
        assert len(streams) == 5
        assert page.execute_script("return demo.warning") is None
    finally:
        synthetic.stop()
