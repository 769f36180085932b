"""The support inspector page (/inspector) in real headless Chromium against a real server.

A real two-page call runs first; once the server has quality samples for it, a third page
opens the inspector with the session id and a pasted support token and must show the meeting
stats, the event log and drawn quality charts. A token that is not a support/admin token
shows the auth error; an unknown session says so; a participant whose name is HTML is shown
as text and never executed.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from rooms.model import Role
from tests.browser.conftest import BrowserFactory, ServerHandle
from tests.browser.test_demo_page import (
    demo_url,
    wait_for_decoded_video,
    wait_for_state,
)
from tests.call_helpers import authority
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.browser

LOAD_TIMEOUT = 30.0
QUALITY_TIMEOUT = 60.0
XSS_NAME = '<img src=x onerror="window.__pwned=1">'

INSPECTOR_STATE_JS = """
if (!window.inspector) { return null; }
return {
  state: inspector.state,
  error: inspector.error,
  stats: inspector.stats,
  warnings: inspector.warnings,
  verdict: inspector.verdict,
  status: document.getElementById('status').textContent,
};
"""

EVENT_ROWS_JS = """
return Array.from(document.querySelectorAll('#events tbody tr:not(.detail)'))
  .filter((row) => !row.hidden)
  .map((row) => Array.from(row.cells).map((cell) => cell.textContent.trim()));
"""

CHART_POINTS_JS = """
return Array.from(document.querySelectorAll('#charts svg[data-metric]')).map((chart) => ({
  metric: chart.getAttribute('data-metric'),
  points: Array.from(chart.querySelectorAll('polyline')).map((line) => line.points.numberOfItems),
}));
"""


def support_token(server: ServerHandle, role: Role = Role.SUPPORT) -> str:
    return authority(server.data_dir).mint("support", role, "Support")


def api_get(server: ServerHandle, path: str, token: str) -> Any:
    request = urllib.request.Request(
        server.url + path, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def inspector_state(page: Any) -> dict[str, Any]:
    state = page.execute_script(INSPECTOR_STATE_JS)
    assert state is not None, (
        "window.inspector is not defined: inspector.js did not load"
    )
    return dict(state)


def open_inspector(
    page: Any, server: ServerHandle, session_id: str, token: str
) -> None:
    """Open /inspector?session=<id>, paste the token and press Inspect."""
    page.get(f"{server.url}/inspector?{urlencode({'session': session_id})}")
    wait_until_sync(
        lambda: inspector_state(page)["state"] == "idle",
        timeout=LOAD_TIMEOUT,
        interval=0.1,
        message="inspector page to load",
    )
    assert page.find_element("id", "session").get_attribute("value") == session_id
    page.find_element("id", "support-token").send_keys(token)
    page.find_element("id", "inspect").click()


def wait_for_inspector(page: Any, wanted: str) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        last = inspector_state(page)
        return last["state"] == wanted

    try:
        wait_until_sync(
            reached,
            timeout=LOAD_TIMEOUT,
            interval=0.1,
            message=f"inspector.state == {wanted!r}",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last inspector state: {last}") from None
    return last


def stat(page: Any, name: str) -> str:
    return str(
        page.find_element("css selector", f'#stats [data-stat="{name}"] dd').text
    )


def event_rows(page: Any) -> list[list[str]]:
    return [list(row) for row in page.execute_script(EVENT_ROWS_JS)]


def test_inspector_shows_stats_events_and_charts_of_a_real_call(
    server: ServerHandle, browser: BrowserFactory, tmp_path: Path
) -> None:
    room = f"inspect-{secrets.token_hex(4)}"
    clinician, patient = browser(), browser()
    clinician.get(
        demo_url(server, room=room, name="Dr Anna", role="clinician", autojoin="1")
    )
    patient.get(demo_url(server, room=room, name="Bo", role="patient", autojoin="1"))
    session_id = wait_for_state(clinician, "joined")["sessionId"]
    assert wait_for_state(patient, "joined")["sessionId"] == session_id
    wait_for_decoded_video(clinician, "clinician")
    wait_for_decoded_video(patient, "patient")

    # The server samples every media.sample_interval_s (2 s): wait for a track with two
    # samples, enough to draw a line.
    token = support_token(server)
    samples: list[dict[str, Any]] = []

    def two_samples_of_a_track() -> bool:
        nonlocal samples
        samples = api_get(server, f"/api/sessions/{session_id}/quality", token)[
            "samples"
        ]
        per_track: dict[tuple[str, ...], int] = {}
        for s in samples:
            key = (s["connection_id"], s["direction"], s["kind"], s["stream_id"])
            per_track[key] = per_track.get(key, 0) + 1
        return any(count >= 2 for count in per_track.values())

    wait_until_sync(
        two_samples_of_a_track,
        timeout=QUALITY_TIMEOUT,
        interval=0.5,
        message="two quality samples of one track",
    )

    page = browser()
    open_inspector(page, server, session_id, token)
    state = wait_for_inspector(page, "loaded")

    # Meeting stats: two users, two connections, two streams, each subscribed by the other.
    stats = state["stats"]
    assert (
        stats["users"],
        stats["connections"],
        stats["streams"],
        stats["subscribers"],
    ) == (2, 2, 2, 2), stats
    assert stats["streamedMinutes"] > 0, stats
    assert stat(page, "users") == "2"
    assert stat(page, "streams") == "2"
    verdict = page.find_element("id", "verdict").text
    assert verdict.startswith("2 users connected, 2 streams, call in progress for "), (
        verdict
    )
    assert not [w for w in state["warnings"] if w["level"] == "error"], state[
        "warnings"
    ]

    # Event log: both connects, with the participant column mapped from the connect payload.
    rows = event_rows(page)
    connects = [row for row in rows if row[2] == "serverDetectedConnect"]
    assert sorted(row[4] for row in connects) == [
        "Server detected connect: Bo (patient)",
        "Server detected connect: Dr Anna (clinician)",
    ], connects
    assert sorted(row[1] for row in connects) == ["Bo patient", "Dr Anna clinician"], (
        connects
    )
    # The UTC time is in the tooltip.
    assert (
        page.find_element("css selector", "#events tbody td.time time")
        .get_attribute("title")
        .endswith(" UTC")
    )

    # Filters: by kind, then by free text.
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", "kind-filter")).select_by_value(
        "serverDetectedConnect"
    )
    assert [row[2] for row in event_rows(page)] == ["serverDetectedConnect"] * 2
    page.find_element("id", "text-filter").send_keys("Anna")
    assert [row[4] for row in event_rows(page)] == [
        "Server detected connect: Dr Anna (clinician)"
    ]

    # The payload expands as JSON text.
    page.find_element("css selector", "#events tbody tr:not([hidden]) button").click()
    detail = page.find_element("css selector", "#events tbody tr.detail pre").text
    assert json.loads(detail)["payload"]["name"] == "Dr Anna", detail

    # Quality charts: every metric has a chart; at least one line has two or more points,
    # and the legend names the participants.
    charts = page.execute_script(CHART_POINTS_JS)
    assert [c["metric"] for c in charts] == [
        "bitrate_kbps",
        "loss_pct",
        "jitter_ms",
        "rtt_ms",
        "frame_rate",
    ]
    assert any(n >= 2 for c in charts for n in c["points"]), charts
    legend = page.find_element("id", "legend").text
    assert "Dr Anna (clinician)" in legend and "Bo (patient)" in legend, legend
    assert not page.find_element("id", "quality-empty").is_displayed()

    Select(page.find_element("id", "kind-filter")).select_by_value("")
    page.find_element("id", "text-filter").clear()
    assert len(event_rows(page)) == page.execute_script(
        "return inspector.events.length;"
    )
    screenshot = tmp_path / "inspector.png"
    page.set_window_size(1280, 2400)
    page.execute_script("window.scrollTo(0, 0);")
    assert page.save_screenshot(str(screenshot))
    print(f"screenshot of the inspector: {screenshot}")


@pytest.mark.parametrize("token_kind", ["garbage", "patient"])
def test_a_token_that_is_not_support_shows_the_auth_error(
    server: ServerHandle, browser: BrowserFactory, token_kind: str
) -> None:
    token = (
        "not-a-jwt" if token_kind == "garbage" else support_token(server, Role.PATIENT)
    )
    page = browser()
    open_inspector(page, server, "s_whatever", token)
    state = wait_for_inspector(page, "error")
    assert state["error"]["status"] == (401 if token_kind == "garbage" else 403), state
    assert (
        "This token is not a support/admin token"
        in page.find_element("id", "status").text
    )
    assert not page.find_element("id", "report").is_displayed()


def test_an_unknown_session_says_no_events(
    server: ServerHandle, browser: BrowserFactory
) -> None:
    page = browser()
    open_inspector(
        page, server, f"s_unknown{secrets.token_hex(4)}", support_token(server)
    )
    wait_for_inspector(page, "empty")
    assert "No events for this session id" in page.find_element("id", "status").text
    assert not page.find_element("id", "report").is_displayed()


def test_a_participant_named_with_html_is_shown_as_text_not_executed(
    server: ServerHandle, browser: BrowserFactory
) -> None:
    room = f"xss-{secrets.token_hex(4)}"
    joiner = browser()
    joiner.get(demo_url(server, room=room, name=XSS_NAME, role="patient", autojoin="1"))
    session_id = wait_for_state(joiner, "joined")["sessionId"]

    # Find the session through the search box (by room), then open it from the result list.
    page = browser()
    page.get(f"{server.url}/inspector")
    wait_until_sync(
        lambda: inspector_state(page)["state"] == "idle",
        timeout=LOAD_TIMEOUT,
        interval=0.1,
        message="inspector page to load",
    )
    page.find_element("id", "support-token").send_keys(support_token(server))
    page.find_element("css selector", "#search-details summary").click()
    page.find_element("id", "search-text").send_keys(room)
    page.find_element("id", "search").click()
    wait_until_sync(
        lambda: (
            page.execute_script(
                "return Array.from(document.querySelectorAll('#search-results button')).map((b) => b.textContent);"
            )
            == [session_id]
        ),
        timeout=LOAD_TIMEOUT,
        interval=0.1,
        message="the search to list the session",
    )
    page.find_element("css selector", "#search-results button").click()
    state = wait_for_inspector(page, "loaded")
    assert (
        page.execute_script(
            "return new URLSearchParams(location.search).get('session');"
        )
        == session_id
    )
    assert "support-token" not in page.current_url and "eyJ" not in page.current_url

    # The name is on screen literally: participants table, event log, diagnosis and payload.
    assert state["stats"]["users"] == 1
    assert (
        f"Only {XSS_NAME} (patient) joined; nobody else ever joined the call."
        in page.find_element("id", "findings").text
    )
    participants = page.find_element("css selector", "#participants tbody td").text
    assert participants == XSS_NAME
    connects = [row for row in event_rows(page) if row[2] == "serverDetectedConnect"]
    assert [row[4] for row in connects] == [
        f"Server detected connect: {XSS_NAME} (patient)"
    ], connects
    assert connects[0][1] == f"{XSS_NAME} patient"
    page.find_element(
        "css selector", '#events tbody tr[data-kind="serverDetectedConnect"] button'
    ).click()
    detail = page.find_element("css selector", "#events tbody tr.detail pre").text
    assert json.loads(detail)["payload"]["name"] == XSS_NAME

    # …and never became markup: no <img> anywhere, the handler never ran.
    assert page.execute_script("return document.querySelectorAll('img').length;") == 0
    assert page.execute_script("return typeof window.__pwned;") == "undefined"
