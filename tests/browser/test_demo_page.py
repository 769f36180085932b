"""The demo page and the JS SDK in real headless Chromium against a real server subprocess.

Two pages join one room with fake camera devices and must each decode the other's video
through the SFU; a bad token must surface as an `unauthorized` error on the page; SDK
requests must reject with the server's error code.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from tests.browser.conftest import BrowserFactory, ServerHandle
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.browser

JOIN_TIMEOUT = 60.0
MEDIA_TIMEOUT = 60.0

PAGE_STATE_JS = """
const status = document.getElementById('status');
if (!window.demo) { return null; }
return {
  state: demo.state,
  error: demo.error,
  warning: demo.warning,
  sessionErrors: demo.sessionErrors,
  sessionId: demo.sessionId,
  status: status ? status.textContent : null,
};
"""

INBOUND_VIDEO_JS = """
const done = arguments[arguments.length - 1];
demo.inboundVideoStats().then(done, (err) => done({error: String(err)}));
"""


def page_state(driver: Any) -> dict[str, Any]:
    state = driver.execute_script(PAGE_STATE_JS)
    assert state is not None, "window.demo is not defined: the page script did not load"
    return dict(state)


def wait_for_state(
    driver: Any, wanted: str, timeout: float = JOIN_TIMEOUT
) -> dict[str, Any]:
    """Wait for demo.state == wanted; fail at once if the page lands in another final state."""
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        last = page_state(driver)
        if last["state"] == wanted:
            return True
        if last["state"] == "error" and wanted != "error":
            raise AssertionError(f"page went to 'error' instead of {wanted!r}: {last}")
        return False

    try:
        wait_until_sync(
            reached, timeout=timeout, interval=0.2, message=f"demo.state == {wanted!r}"
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last page state: {last}") from None
    return last


def inbound_video(driver: Any) -> list[dict[str, Any]]:
    stats = driver.execute_async_script(INBOUND_VIDEO_JS)
    assert isinstance(stats, list), f"inboundVideoStats() failed: {stats}"
    return stats


def wait_for_decoded_video(driver: Any, who: str) -> list[dict[str, Any]]:
    last: list[dict[str, Any]] = []

    def decoding() -> bool:
        nonlocal last
        last = inbound_video(driver)
        return any(entry["framesDecoded"] > 0 for entry in last)

    try:
        wait_until_sync(
            decoding,
            timeout=MEDIA_TIMEOUT,
            interval=0.5,
            message=f"{who} to decode remote video",
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; last inbound stats: {last}; page: {page_state(driver)}"
        ) from None
    return last


def remote_tile_captions(driver: Any) -> list[str]:
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('.tile.remote figcaption')).map((c) => c.textContent);"
        )
    )


def demo_url(server: ServerHandle, **params: str) -> str:
    return f"{server.url}/?{urlencode(params)}"


def test_two_pages_join_and_decode_each_others_video(
    server: ServerHandle, browser: BrowserFactory, tmp_path: Path
) -> None:
    room = f"browser-{secrets.token_hex(4)}"
    clinician = browser()
    patient = browser()
    clinician.get(demo_url(server, room=room, name="A", role="clinician", autojoin="1"))
    patient.get(demo_url(server, room=room, name="B", role="patient", autojoin="1"))

    state_a = wait_for_state(clinician, "joined")
    state_b = wait_for_state(patient, "joined")

    # One room, one session; the id support staff ask for is on screen.
    assert state_a["sessionId"], state_a
    assert state_a["sessionId"] == state_b["sessionId"]
    assert clinician.find_element("id", "session-id").text == state_a["sessionId"]

    stats_a = wait_for_decoded_video(clinician, "clinician A")
    stats_b = wait_for_decoded_video(patient, "patient B")
    assert len(stats_a) == 1 and len(stats_b) == 1, (stats_a, stats_b)
    assert remote_tile_captions(clinician) == ["B (patient)"]
    assert remote_tile_captions(patient) == ["A (clinician)"]
    # Nothing failed in the background either (every trickled ICE candidate was accepted).
    for state in (page_state(clinician), page_state(patient)):
        assert state["warning"] is None, state
        assert state["sessionErrors"] == [], state

    screenshot = tmp_path / "demo-joined.png"
    assert clinician.save_screenshot(str(screenshot))
    print(f"screenshot of the joined demo page: {screenshot}")

    # B leaves: B is idle again, and A's tile for B goes away on streamDestroyed.
    patient.find_element("id", "leave").click()
    wait_for_state(patient, "idle")
    wait_until_sync(
        lambda: remote_tile_captions(clinician) == [],
        timeout=JOIN_TIMEOUT,
        interval=0.2,
        message="A's tile for B to be removed after B left",
    )
    assert page_state(clinician)["state"] == "joined"


def forged_token() -> str:
    """A well-formed JWT signed with a key the server does not have."""
    now = int(time.time())
    claims = {
        "room": "forged",
        "role": "patient",
        "name": "Mallory",
        "sub": "u-mallory",
        "nbf": now - 10,
        "exp": now + 600,
    }
    return jwt.encode(
        claims, "not-the-server-secret-" + secrets.token_hex(16), algorithm="HS256"
    )


@pytest.mark.parametrize("token_kind", ["garbage", "forged"])
def test_bad_pasted_token_shows_unauthorized(
    server: ServerHandle, browser: BrowserFactory, token_kind: str
) -> None:
    token = "this-is-not-a-jwt" if token_kind == "garbage" else forged_token()
    page = browser()
    page.get(server.url + "/")
    wait_until_sync(
        lambda: page_state(page)["state"] == "idle",
        timeout=JOIN_TIMEOUT,
        message="page to load",
    )

    page.find_element("css selector", "#token-details summary").click()
    page.find_element("id", "token").send_keys(token)
    page.find_element("id", "join").click()

    state = wait_for_state(page, "error")
    assert state["error"]["code"] == "unauthorized", state
    assert "unauthorized" in page.find_element("id", "status").text
    assert state["sessionId"] is None
    # The user can try again: the form is enabled, Leave is not.
    assert page.find_element("id", "join").is_enabled()
    assert not page.find_element("id", "leave").is_enabled()


SDK_ERRORS_JS = """
const done = arguments[arguments.length - 1];
(async () => {
  const out = {};
  const response = await fetch('/api/demo/token', {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({room: arguments[0], name: 'Sdk', role: 'clinician'}),
  });
  const {token} = await response.json();
  const session = await OpenConsult.connect({token});
  out.sessionId = session.sessionId;
  out.room = session.room;
  out.role = session.role;
  try {
    await session.subscribe('no-such-stream');
    out.subscribe = 'resolved';
  } catch (err) {
    out.subscribe = err.code;
  }
  out.ping = typeof (await session.ping()).time;
  await session.leave();
  out.stateAfterLeave = session.state;
  try {
    await session.ping();
    out.afterLeave = 'resolved';
  } catch (err) {
    out.afterLeave = err.code;
  }
  return out;
})().then(done, (err) => done({failed: String(err), code: err && err.code}));
"""


def test_sdk_rejects_requests_with_the_server_error_code(
    server: ServerHandle, browser: BrowserFactory
) -> None:
    room = f"sdk-{secrets.token_hex(4)}"
    page = browser()
    page.get(server.url + "/")
    wait_until_sync(
        lambda: page_state(page)["state"] == "idle",
        timeout=JOIN_TIMEOUT,
        message="page to load",
    )

    result = page.execute_async_script(SDK_ERRORS_JS, room)

    session_id = result.pop("sessionId", None)
    assert session_id, result
    assert result == {
        "room": room,
        "role": "clinician",
        "subscribe": "not_found",
        "ping": "number",
        "stateAfterLeave": "disconnected",
        "afterLeave": "connection_closed",
    }
