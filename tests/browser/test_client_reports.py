"""What the browser saw, in real headless Chromium against a real server: the patient page's
device check with the camera denied (through the DevTools protocol) lands in the consultation's
event log as a deviceCheck client event with the error name, and closing that page logs tabClosed
through the beacon; during a call each page posts a
getStats() summary per track every ~5 s; the inspector opened for the finished call shows charts
with data points and event markers, the user table with the browser and OS the server parsed,
and, served the diagnosis and summary documents, the diagnosis first with its evidence linked
into the event log. A screenshot of the inspector is kept under the test's tmp dir.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import BrowserFactory, ServerHandle
from tests.browser.test_consultation_pages import book, consult_state
from tests.browser.test_demo_page import demo_url, wait_for_decoded_video, wait_for_state
from tests.browser.test_inspector import api_get, open_inspector, support_token, wait_for_inspector
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.browser

TIMEOUT = 60.0


def client_entries(server: ServerHandle, session_id: str, token: str, kind: str) -> list[dict[str, Any]]:
    events = api_get(server, f"/api/sessions/{session_id}/events", token)["events"]
    return [e for e in events if e["kind"] == kind and e["component"] == "client"]


@pytest.fixture
def prompting_browser(browser: BrowserFactory) -> Iterator[Any]:
    """Headless Chromium with the project's flags but the fake permission UI (which grants every
    camera request whatever the permission says): the page's permissions decide, as for a user."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tests.browser.conftest import CHROMEDRIVER, CHROMIUM, CHROMIUM_ARGUMENTS

    profile = tempfile.mkdtemp(prefix="openconsult-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in CHROMIUM_ARGUMENTS:
        if argument != "--use-fake-ui-for-media-stream":
            options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(1280, 900)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_camera_denied_on_the_patient_page_is_logged_with_its_error_name(
    server: ServerHandle, prompting_browser: Any
) -> None:
    booking = book(server)
    patient = prompting_browser
    # Deny the camera for the server's origin through the DevTools protocol, as a patient who
    # clicked "Block" would.
    patient.execute_cdp_cmd("Browser.setPermission", {
        "permission": {"name": "camera"}, "setting": "denied", "origin": server.url})
    patient.get(booking.patient_link)
    # The page tells the patient (the check only advises: they still enter the waiting room).
    wait_until_sync(lambda: "not allowed" in consult_state(patient)["micCheck"], timeout=TIMEOUT, interval=0.2,
                    message="the device check to fail")
    assert "not allowed" in patient.find_element("id", "camera-check").text

    token = support_token(server)
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        nonlocal found
        found = client_entries(server, booking.session_id, token, "clientEvent")
        return any(e["payload"]["event"] == "deviceCheck" for e in found)

    wait_until_sync(logged, timeout=TIMEOUT, interval=0.5, message="a deviceCheck client event")
    checks = [e["payload"] for e in found if e["payload"]["event"] == "deviceCheck"]
    assert checks == [{"event": "deviceCheck", "camera": "denied", "microphone": "denied",
                       "error_name": "NotAllowedError"}], found
    failures = [e["payload"] for e in found if e["payload"]["event"] == "getUserMediaFailed"]
    assert len(failures) == 1 and failures[0]["error_name"] == "NotAllowedError", found
    assert failures[0]["constraints"] == {"audio": True, "video": True}
    # In the consultation's own session, from the patient's connection.
    connects = [e for e in api_get(server, f"/api/sessions/{booking.session_id}/events", token)["events"]
                if e["kind"] == "serverDetectedConnect"]
    assert {e["connection_id"] for e in found} == {c["connection_id"] for c in connects if c["payload"]["role"] == "patient"}

    # Closing the page sends the tabClosed beacon (the socket goes with the page).
    patient.get("about:blank")
    closed: list[dict[str, Any]] = []

    def tab_closed() -> bool:
        nonlocal closed
        closed = [e for e in client_entries(server, booking.session_id, token, "clientEvent")
                  if e["payload"]["event"] == "tabClosed"]
        return bool(closed)

    wait_until_sync(tab_closed, timeout=TIMEOUT, interval=0.5, message="the tabClosed beacon")
    assert [e["connection_id"] for e in closed] == [found[0]["connection_id"]], closed


@contextmanager
def overriding_proxy(server: ServerHandle, documents: Callable[[str, str], Any]) -> Iterator[str]:
    """An HTTP front for ``server`` that answers GET /api/sessions/{id}/(diagnosis|summary) with
    ``documents(session_id, what)`` and passes every other GET through (the inspector's own
    requests: page, scripts, events, quality)."""
    route = re.compile(r"^/api/sessions/([^/?]+)/(diagnosis|summary)(\?.*)?$")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            match = route.match(self.path)
            if match:
                body = json.dumps(documents(match.group(1), match.group(2))).encode()
                status, content_type = 200, "application/json"
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "accept")}
                request = urllib.request.Request(server.url + self.path, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        status, content_type, body = response.status, response.headers["Content-Type"], response.read()
                except urllib.error.HTTPError as exc:
                    status, content_type, body = exc.code, exc.headers["Content-Type"], exc.read()
            self.send_response(status)
            self.send_header("Content-Type", content_type or "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    front = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{front.server_address[1]}"
    finally:
        front.shutdown()
        front.server_close()


def test_stats_every_five_seconds_then_the_inspector_of_the_finished_call(
    server: ServerHandle, browser: BrowserFactory, tmp_path: Path
) -> None:
    room = f"stats-{secrets.token_hex(4)}"
    clinician, patient = browser(), browser()
    clinician.get(demo_url(server, room=room, name="Dr Stats", role="clinician", autojoin="1"))
    patient.get(demo_url(server, room=room, name="Pat Stats", role="patient", autojoin="1"))
    session_id = wait_for_state(clinician, "joined")["sessionId"]
    assert wait_for_state(patient, "joined")["sessionId"] == session_id
    wait_for_decoded_video(clinician, "clinician")
    wait_for_decoded_video(patient, "patient")
    token = support_token(server)

    # Three stats messages from each page: one per ~5 s, each a sample per track.
    stats: list[dict[str, Any]] = []

    def three_rounds_each() -> bool:
        nonlocal stats
        stats = client_entries(server, session_id, token, "clientStats")
        rounds: dict[str, set[int]] = {}
        for e in stats:
            rounds.setdefault(e["connection_id"], set()).add(e["time_ms"])
        return len(rounds) == 2 and all(len(times) >= 3 for times in rounds.values())

    wait_until_sync(three_rounds_each, timeout=TIMEOUT, interval=1.0, message="three stats rounds per page")
    for connection_id in {e["connection_id"] for e in stats}:
        times = sorted({e["time_ms"] for e in stats if e["connection_id"] == connection_id})
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(3_000 <= gap <= 10_000 for gap in gaps), (connection_id, gaps)
        mine = [e["payload"] for e in stats if e["connection_id"] == connection_id]
        kinds = {(p["direction"], p["kind"]) for p in mine}
        assert kinds == {("send", "audio"), ("send", "video"), ("recv", "audio"), ("recv", "video")}, kinds
        received = [p for p in mine if p["direction"] == "recv" and p["kind"] == "video"]
        assert max(p["framesDecoded"] for p in received) > 0, received
        assert all(p["subscription_id"].startswith("sub") for p in received), received
        assert {p["candidate_pair"]["protocol"] for p in mine} == {"udp"}, mine
        assert max(p.get("bytesSent", 0) for p in mine if p["direction"] == "send") > 0, mine
    # The live streams' entries are attached to them.
    assert all(e["stream_id"] for e in stats), stats

    # End the call: both leave.
    for page in (clinician, patient):
        page.find_element("id", "leave").click()
        wait_for_state(page, "idle")

    # The inspector of the finished call, straight from this server (no diagnosis route here yet
    # or yes: either way the charts, markers and user table come from the real call).
    page = browser()
    open_inspector(page, server, session_id, token)
    wait_for_inspector(page, "loaded")
    charts = page.execute_script("""
      return Array.from(document.querySelectorAll('#charts svg[data-metric]')).map((chart) => ({
        points: Array.from(chart.querySelectorAll('polyline')).reduce((n, l) => n + l.points.numberOfItems, 0),
        markers: chart.querySelectorAll('line.marker').length,
        kinds: Array.from(chart.querySelectorAll('line.marker')).map((m) => m.getAttribute('data-kind')),
      }));""")
    assert charts and all(c["points"] >= 2 for c in charts[:1]), charts
    assert all(c["markers"] == page.execute_script("return inspector.markers;") > 0 for c in charts), charts
    assert {"serverDetectedConnect", "streamCreated", "disconnect"} <= set(charts[0]["kinds"]), charts[0]
    table = page.execute_script("""
      return Array.from(document.querySelectorAll('#participants tbody tr')).map((row) => ({
        name: row.cells[0].textContent, browser: row.querySelector('.browser').textContent,
        os: row.querySelector('.os').textContent, device: row.querySelector('.device').textContent,
        sdk: row.querySelector('.sdk').textContent}));""")
    assert sorted(r["name"] for r in table) == ["Dr Stats", "Pat Stats"], table
    for row in table:
        assert row["browser"].startswith(("HeadlessChrome ", "Chrome ")) and row["os"] == "Linux", row
        assert row["device"] == "desktop" and re.fullmatch(r"\d+\.\d+\.\d+", row["sdk"]), row
    if not page.execute_script("return inspector.diagnosis.available;"):
        assert page.find_element("id", "diagnosis-status").text == "Diagnosis: not available on this server."

    # Zoom on the first half of the call: fewer or equal markers, the range is shown.
    page.execute_script("""
      const ev = inspector.events; inspector.zoomTo(ev[0].time_ms, (ev[0].time_ms + ev[ev.length - 1].time_ms) / 2);""")
    assert page.find_element("id", "zoom-range").text.startswith("Zoomed to ")
    assert page.find_element("id", "zoom-reset").is_displayed()
    page.find_element("id", "zoom-reset").click()
    assert page.find_element("id", "zoom-range").text.startswith("Whole call: ")

    # The diagnosis and summary, as the API documents them, rendered first.
    events = api_get(server, f"/api/sessions/{session_id}/events", token)["events"]
    connects = {e["payload"]["name"]: e for e in events if e["kind"] == "serverDetectedConnect"}
    patient_connect = connects["Pat Stats"]
    last_ms = events[-1]["time_ms"]

    def documents(sid: str, what: str) -> Any:
        if what == "diagnosis":
            return {"session_id": sid, "findings": [
                {"type": "low_bitrate", "severity": "problem",
                 "cause": "Pat Stats's video reached the clinician at under 150 kbps for 80% of the call.",
                 "participant": {"connection_id": patient_connect["connection_id"], "name": "Pat Stats",
                                 "role": "patient"},
                 "direction": "send", "from_ms": patient_connect["time_ms"], "until_ms": last_ms,
                 "evidence": {"entries": [patient_connect["seq"]], "samples": []},
                 "next_step": "Ask the patient to move closer to the Wi-Fi router or close other apps."},
                {"type": "reconnected", "severity": "info", "cause": "Nobody had to reconnect.", "participant": None,
                 "direction": None, "from_ms": None, "until_ms": None, "evidence": {"entries": [], "samples": []},
                 "next_step": ""}]}
        return {"session_id": sid, "meeting": {}, "participants": [
            {"connection_id": e["connection_id"], "name": name, "role": e["payload"]["role"], "user": "",
             "joined_ms": e["time_ms"], "left_ms": last_ms, "reason": "clientDisconnected",
             "user_agent": e["payload"]["user_agent"], "browser": e["payload"]["browser"], "os": e["payload"]["os"],
             "device": e["payload"]["device"], "ip": "127.0.0.1", "sdk_version": e["payload"]["sdk_version"],
             "scores": {"audio_mos": 4.3, "video_level": "good", "freezes": 0, "time_to_first_media_ms": 900},
             "quality": []} for name, e in connects.items()],
            "errors": {"connect": {"attempts": 2, "failures": 0}, "publish": {"attempts": 2, "failures": 0},
                       "subscribe": {"attempts": 3, "failures": 1},
                       "log": [dict(patient_connect, kind="subscribeFailure", text="Subscribe failed: no stream")]}}

    with overriding_proxy(server, documents) as front:
        page.get(f"{front}/inspector?session={session_id}")
        wait_for_inspector(page, "idle")
        page.find_element("id", "support-token").send_keys(token)  # another origin: its own sessionStorage
        page.find_element("id", "inspect").click()
        wait_for_inspector(page, "loaded")
        available = page.execute_script("return [inspector.diagnosis.available, inspector.summary.available];")
        assert available == [True, True], available
        # The diagnosis panel is the first thing in the report, above the meeting and the charts.
        order = page.execute_script(
            "return Array.from(document.querySelectorAll('#report > section')).map((s) => s.id || s.getAttribute('aria-labelledby'));")
        assert order[0] == "diagnosis-panel", order
        findings = page.execute_script("""
          return Array.from(document.querySelectorAll('#findings li')).map((li) => ({
            severity: li.dataset.severity, cause: li.querySelector('.cause').textContent,
            meta: li.querySelector('.meta') ? li.querySelector('.meta').textContent : '',
            next: li.querySelector('.next') ? li.querySelector('.next').textContent : ''}));""")
        assert [f["severity"] for f in findings] == ["problem", "info"], findings
        assert "under 150 kbps" in findings[0]["cause"] and findings[0]["meta"].startswith("Pat Stats (patient) · sending · ")
        assert findings[0]["next"].startswith("Next step: Ask the patient")
        assert page.find_element("id", "diagnosis-status").text == "1 problem, 0 warnings, 1 note."
        assert not page.find_element("id", "warnings").is_displayed()
        # Evidence links into the event log.
        page.find_element("css selector", f'#findings button[data-seq="{patient_connect["seq"]}"]').click()
        assert page.find_element("id", f"ev-{patient_connect['seq']}").is_displayed()
        # The error log and the scores.
        assert page.find_element("css selector", '#error-rates [data-stat="subscribe-failures"] dd').text == \
            "1 of 3 · 33% failed"
        assert "Subscribe failed: no stream" in page.find_element("id", "error-log").text
        scores = [td.text for td in page.find_elements("css selector", "#participants td.scores")]
        assert scores == ["MOS 4.3 · video good · 0 freezes · first media 0.9s"] * 2, scores
        screenshot = tmp_path / "inspector-diagnosis.png"
        page.set_window_size(1280, 2600)
        page.execute_script("window.scrollTo(0, 0);")
        assert page.save_screenshot(str(screenshot))
        print(f"screenshot of the inspector: {screenshot}")
