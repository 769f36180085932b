"""The pre-call test in real headless Chromium through a real server: /test publishes to the SFU
and receives its own stream back for ~10 s, then gives a verdict with the measured bitrate, loss
and round trip and the candidate pair, logged as a precallTest client event in the test's own
session; with the server's media port unreachable (a browser on a network that blocks UDP: the
server's media is UDP only) it says "cannot connect" within 15 s. The token route hands out private throwaway rooms,
demo tokens with no workflow identity, and refuses a burst from one address.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import BrowserFactory, ServerHandle, require_chromium
from tests.browser.test_inspector import api_get, support_token
from tests.helpers import wait_until_sync
from tests.server import start_server

pytestmark = pytest.mark.browser

PRECALL_JS = "return window.precall ? {state: precall.state, result: precall.result, error: precall.error," \
             " elapsedMs: precall.elapsedMs, devices: precall.devices} : null;"


def page_precall(driver: Any) -> dict[str, Any]:
    state = driver.execute_script(PRECALL_JS)
    assert state is not None, "window.precall is not defined: test.js did not load"
    return dict(state)


def run_test(driver: Any, server: ServerHandle, timeout: float) -> dict[str, Any]:
    driver.get(f"{server.url}/test")
    wait_until_sync(lambda: page_precall(driver)["state"] == "ready", timeout=30, interval=0.2,
                    message="the device check on /test")
    driver.find_element("id", "precall-start").click()
    wait_until_sync(lambda: page_precall(driver)["state"] in ("done", "error"), timeout=timeout, interval=0.2,
                    message="the pre-call test's verdict")
    state = page_precall(driver)
    assert state["state"] == "done", state
    return state


def post_token(server: ServerHandle) -> tuple[int, Any]:
    request = urllib.request.Request(server.url + "/api/precall/token", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_precall_test_measures_through_the_server(server: ServerHandle, browser: BrowserFactory) -> None:
    page = browser()
    state = run_test(page, server, timeout=45)
    assert state["devices"] == {"camera": "ok", "microphone": "ok"}, state
    result = state["result"]
    figures = result["figures"]
    assert result["verdict"] in ("good", "fair", "poor"), result
    # Measured, not assumed: video went out and came back through the SFU on loopback.
    assert figures["connected"] and figures["video"], figures
    assert figures["up_kbps"] > 50 and figures["down_kbps"] > 50, figures
    assert figures["down_loss_pct"] is not None and 0 <= figures["down_loss_pct"] <= 100, figures
    assert figures["rtt_ms"] is not None and 0 <= figures["rtt_ms"] < 1000, figures
    assert (figures["local_candidate_type"], figures["protocol"]) == ("host", "udp"), figures
    assert result["relay"] is None, result  # no TURN configured
    assert page.find_element("id", "precall-verdict").text == result["title"]
    assert "kbit/s" in page.find_element("id", "precall-figures").text

    # Logged for support in the test's own session, with the figures.
    sid = figures["session_id"]
    token = support_token(server)
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        nonlocal found
        events = api_get(server, f"/api/sessions/{sid}/events", token)["events"]
        found = [e for e in events if e["kind"] == "clientEvent" and e["payload"]["event"] == "precallTest"]
        return bool(found)

    wait_until_sync(logged, timeout=30, interval=0.5, message="a precallTest client event")
    payload = found[0]["payload"]
    assert payload["verdict"] == result["verdict"] and payload["up_kbps"] == figures["up_kbps"], payload
    assert payload["rtt_ms"] == figures["rtt_ms"] and payload["test_session_id"] == sid, payload
    assert found[0]["text"].startswith(f"Client pre-call test: {result['verdict']} (up "), found[0]


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerHandle]:
    """A server of its own: the rate limit test spends its address's allowance."""
    handle = start_server(tmp_path)
    try:
        yield handle
    finally:
        handle.stop()


def test_precall_token_is_private_throwaway_and_rate_limited(own_server: ServerHandle) -> None:
    server = own_server
    status, first = post_token(server)
    assert status == 201 and first["room"].startswith("precall-") and first["expires_in_s"] <= 120, first
    _, second = post_token(server)
    assert second["room"] != first["room"]
    # A demo token: media only, refused by every HTTP API.
    request = urllib.request.Request(server.url + "/api/sessions", headers={"Authorization": f"Bearer {first['token']}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    statuses = [post_token(server)[0] for _ in range(30)]
    assert 429 in statuses, statuses


@pytest.fixture
def udp_blocked_browser() -> Iterator[Any]:
    """Headless Chromium with the project's flags on a network that lets no UDP through: WebRTC
    may not send UDP except through a proxy (there is none), so the server's media port, UDP
    only, is out of reach — as behind a firewall that blocks UDP."""
    import shutil
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tests.browser.conftest import CHROMEDRIVER, CHROMIUM, CHROMIUM_ARGUMENTS

    require_chromium()
    profile = tempfile.mkdtemp(prefix="openconsult-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (*CHROMIUM_ARGUMENTS, f"--user-data-dir={profile}"):
        options.add_argument(argument)
    # The profile's WebRTC IP handling policy (chrome.privacy.network.webRTCIPHandlingPolicy).
    options.add_experimental_option("prefs", {"webrtc": {"ip_handling_policy": "disable_non_proxied_udp"}})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(1280, 900)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_precall_test_says_cannot_connect_within_15_s(server: ServerHandle, udp_blocked_browser: Any) -> None:
    page = udp_blocked_browser
    began = time.monotonic()
    state = run_test(page, server, timeout=40)
    result = state["result"]
    assert result["verdict"] == "cannot_connect", result
    assert state["elapsedMs"] < 15_000, state
    assert time.monotonic() - began < 40
    assert page.find_element("id", "precall-verdict").text == "Cannot connect"
    assert "another network" in page.find_element("id", "precall-advice").text
    assert "UDP" in page.find_element("id", "precall-advice").text


# (figures, verdict, reasons): the rules of OpenConsult.precallVerdict (docs/operations.md).
VERDICT_CASES = [
    ({"connected": False}, "cannot_connect", ["connect"]),
    ({"connected": True, "down_kbps": 0, "up_kbps": 300, "video": True}, "cannot_connect", ["connect"]),
    ({"connected": True, "up_kbps": 400, "down_kbps": 390, "rtt_ms": 20, "jitter_ms": 10, "video": True,
      "down_loss_pct": 0.5}, "good", []),
    ({"connected": True, "up_kbps": 400, "down_kbps": 390, "rtt_ms": 300, "video": True}, "fair", ["rtt"]),
    ({"connected": True, "up_kbps": 400, "down_kbps": 390, "down_loss_pct": 3, "video": True}, "fair", ["loss"]),
    ({"connected": True, "up_kbps": 120, "down_kbps": 390, "video": True}, "fair", ["bitrate"]),
    ({"connected": True, "up_kbps": 400, "down_kbps": 390, "up_loss_pct": 9, "video": True}, "poor", ["loss"]),
    ({"connected": True, "up_kbps": 400, "down_kbps": 390, "jitter_ms": 70, "video": True}, "poor", ["loss"]),
    ({"connected": True, "up_kbps": 60, "down_kbps": 60, "video": True, "protocol": "tcp"}, "poor",
     ["bitrate", "tcp"]),
    ({"connected": True, "up_kbps": 30, "down_kbps": 30, "video": False}, "good", []),
    ({"connected": True, "up_kbps": 600, "down_kbps": 600, "rtt_ms": 800, "video": True}, "poor", ["rtt"]),
]


def test_precall_verdict_rules(server: ServerHandle, browser: BrowserFactory) -> None:
    page = browser()
    page.get(f"{server.url}/test")
    got = page.execute_script(
        "return arguments[0].map((f) => { const v = OpenConsult.precallVerdict(f);"
        " return [v.verdict, v.reasons, v.advice.length > 20]; });", [case[0] for case in VERDICT_CASES])
    assert got == [[verdict, reasons, True] for _, verdict, reasons in VERDICT_CASES]


def test_precall_test_in_the_patient_flow_is_logged_in_the_consultation(
    server: ServerHandle, browser: BrowserFactory
) -> None:
    from tests.browser.test_consultation_pages import book, open_patient

    booking = book(server)
    patient = open_patient(browser, booking)
    wait_until_sync(lambda: patient.execute_script("return Boolean(document.getElementById('precall-run'))"),
                    timeout=30, interval=0.2, message="the connection test button on the patient page")
    patient.find_element("id", "precall-run").click()
    wait_until_sync(lambda: (patient.execute_script("return window.consult.precall && consult.precall.state")
                             in ("done", "error")), timeout=45, interval=0.3, message="the patient's connection test")
    precall = patient.execute_script("return consult.precall")
    assert precall["state"] == "done", precall
    result = precall["result"]
    assert result["figures"]["connected"] and result["figures"]["down_kbps"] > 50, result
    assert patient.find_element("id", "precall-verdict").text == "Connection: " + result["title"]
    # The patient is still waiting: the test ran in its own private room, not the consultation's.
    assert patient.execute_script("return consult.state") == "waiting"
    assert result["figures"]["session_id"] != booking.session_id

    token = support_token(server)
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        nonlocal found
        events = api_get(server, f"/api/sessions/{booking.session_id}/events", token)["events"]
        found = [e["payload"] for e in events if e["kind"] == "clientEvent" and e["payload"]["event"] == "precallTest"]
        return bool(found)

    wait_until_sync(logged, timeout=30, interval=0.5, message="the precallTest event in the consultation's session")
    assert found[0]["verdict"] == result["verdict"] and found[0]["down_kbps"] == result["figures"]["down_kbps"]
    assert found[0]["test_session_id"] == result["figures"]["session_id"], found
