"""The device check advises, never blocks, in real headless Chromium against a real server.

The tests drop ``--use-fake-ui-for-media-stream`` (it grants every request whatever the
permission says) so the page's permissions decide, as for a user, and keep the fake devices:
- the camera denied through DevTools ``Browser.setPermission`` (the microphone granted): the
  patient still enters the waiting room, the clinician's queue says "camera denied · voice only",
  Admit runs an audio-only call with audio received on both sides, and the inspector's diagnosis
  finds the camera denied;
- no camera: a DevTools preload script (``Page.addScriptToEvaluateOnNewDocument``) makes the
  browser report no video input, as on a computer without a camera (``enumerateDevices`` lists
  none; ``getUserMedia`` with video fails with ``NotFoundError``): the queue says "no camera".
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.browser.conftest import BrowserFactory, ServerHandle
from tests.browser.test_consultation_pages import Booking, book, click, open_clinician, wait_page
from tests.browser.test_inspector import api_get, support_token
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.browser

TIMEOUT = 60.0

QUEUE_DEVICES_JS = """
return Array.from(document.querySelectorAll('.queue-line')).map((n) => {
  const d = n.querySelector('.queue-devices');
  return d ? d.textContent : '';
});
"""

# Audio packets received on every subscription of the page (the call's inbound audio).
INBOUND_AUDIO_JS = """
const done = arguments[arguments.length - 1];
(async () => {
  const out = [];
  for (const subscription of consult.subscriptions.values()) {
    if (!subscription) { continue; }
    const report = await subscription.getStats();
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' && (s.kind || s.mediaType) === 'audio') { out.push(s.packetsReceived || 0); }
    });
  }
  return out;
})().then(done, (err) => done({error: String(err)}));
"""

# The computer has no camera: no video input listed, and asking for video fails as Chromium does.
NO_CAMERA_JS = """
(() => {
  const media = navigator.mediaDevices;
  if (!media) { return; }
  const getUserMedia = media.getUserMedia.bind(media);
  const enumerate = media.enumerateDevices.bind(media);
  media.getUserMedia = (constraints) => (constraints && constraints.video)
    ? Promise.reject(new DOMException('Requested device not found', 'NotFoundError'))
    : getUserMedia(constraints);
  media.enumerateDevices = () => enumerate().then((list) => list.filter((d) => d.kind !== 'videoinput'));
})();
"""


@pytest.fixture
def prompting_browser() -> Iterator[Callable[[], Any]]:
    """Headless Chromium with the project's flags but without the fake permission UI."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tests.browser.conftest import CHROMEDRIVER, CHROMIUM, CHROMIUM_ARGUMENTS, require_chromium

    require_chromium()
    made: list[tuple[Any, str]] = []

    def new() -> Any:
        profile = tempfile.mkdtemp(prefix="openconsult-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in CHROMIUM_ARGUMENTS:
            if argument != "--use-fake-ui-for-media-stream":
                options.add_argument(argument)
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        made.append((driver, profile))
        driver.set_window_size(1280, 900)
        driver.set_script_timeout(30)
        return driver

    yield new
    for driver, profile in made:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def allow(driver: Any, origin: str, camera: str) -> None:
    """Set the site's permissions as a patient who answered the prompt would have."""
    for name, setting in (("camera", camera), ("microphone", "granted")):
        driver.execute_cdp_cmd("Browser.setPermission", {
            "permission": {"name": name}, "setting": setting, "origin": origin})


def wait_audio(driver: Any, who: str) -> list[int]:
    last: list[int] = []

    def flowing() -> bool:
        nonlocal last
        got = driver.execute_async_script(INBOUND_AUDIO_JS)
        assert isinstance(got, list), f"inbound audio stats failed: {got}"
        last = got
        return bool(got) and all(count > 20 for count in got)

    wait_until_sync(flowing, timeout=TIMEOUT, interval=0.5, message=f"{who} to receive audio (last: {last})")
    return last


def patient_enters(patient: Any, booking: Booking) -> dict[str, Any]:
    patient.get(booking.patient_link)
    return wait_page(patient, "the patient in the waiting room", lambda s: s["state"] == "waiting")


def queue_says(clinician: Any, words: str) -> None:
    wait_until_sync(lambda: clinician.execute_script(QUEUE_DEVICES_JS) == [words], timeout=TIMEOUT,
                    interval=0.2, message=f"the queue to say {words!r}")


def test_camera_denied_patient_enters_and_talks(
    server: ServerHandle, browser: BrowserFactory, prompting_browser: Callable[[], Any]
) -> None:
    booking = book(server)
    clinician = open_clinician(browser, booking)
    patient = prompting_browser()
    allow(patient, server.url, camera="denied")
    patient_enters(patient, booking)
    assert "not allowed" in patient.find_element("id", "camera-check").text
    advice = patient.find_element("id", "device-advice").text
    assert "voice only" in advice and "Allow" in advice, advice
    queue_says(clinician, "camera denied · voice only")

    # Admit: an audio-only call, audio received on both sides.
    click(clinician, f'.admit[data-session-id="{booking.session_id}"]')
    wait_page(clinician, "the clinician in the call", lambda s: s["state"] == "in_call")
    wait_page(patient, "the patient in the call", lambda s: s["state"] == "in_call")
    wait_audio(clinician, "the clinician")
    wait_audio(patient, "the patient")

    # Support's diagnosis names the denied camera.
    token = support_token(server)

    def denied() -> bool:
        findings = api_get(server, f"/api/sessions/{booking.session_id}/diagnosis", token)["findings"]
        return any(f["type"] == "device_denied" and "camera" in f["cause"] for f in findings)

    wait_until_sync(denied, timeout=TIMEOUT, interval=0.5, message="a device_denied finding for the camera")


def test_patient_without_camera_enters_and_the_queue_says_no_camera(
    server: ServerHandle, browser: BrowserFactory, prompting_browser: Callable[[], Any]
) -> None:
    booking = book(server)
    clinician = open_clinician(browser, booking)
    patient = prompting_browser()
    allow(patient, server.url, camera="granted")
    patient.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": NO_CAMERA_JS})
    patient_enters(patient, booking)
    assert "not found" in patient.find_element("id", "camera-check").text
    queue_says(clinician, "no camera · voice only")

    click(clinician, f'.admit[data-session-id="{booking.session_id}"]')
    wait_page(patient, "the patient in the call", lambda s: s["state"] == "in_call")
    wait_audio(clinician, "the clinician")
    wait_audio(patient, "the patient")

    token = support_token(server)

    def missing() -> bool:
        findings = api_get(server, f"/api/sessions/{booking.session_id}/diagnosis", token)["findings"]
        return any(f["type"] == "device_missing" and "no camera" in f["cause"] for f in findings)

    wait_until_sync(missing, timeout=TIMEOUT, interval=0.5, message="a device_missing finding for the camera")
