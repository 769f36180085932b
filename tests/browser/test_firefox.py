"""Firefox ESR next to Chromium, and no silent hangs.

Calls through the SFU on the demo page: Chromium ↔ Firefox and Firefox ↔ Firefox, each side
decoding the other's video (``framesDecoded`` grows on both). Then clients whose ICE never
completes: Firefox as shipped (it refuses the loopback-only candidates these tests' server
offers: the call used to hang, the page saying "Connected") and Chromium relaying everything
through a TURN server that refuses to relay to the server. Within the deadline the page says
so in plain words with what to try, the event log has the failure with the candidates both
sides offered, and the stream is never announced as live.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rooms.model import Role
from tests.browser.conftest import BrowserFactory, FirefoxFactory, ServerHandle, require_chromium
from tests.browser.test_demo_page import (
    demo_url,
    inbound_video,
    page_state,
    wait_for_decoded_video,
    wait_for_state,
)
from tests.call_helpers import authority, get_json
from tests.helpers import wait_until_sync
from tests.server import start_server
from tests.turn_server import TurnServer, turn_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: The SDK's and the server's default deadline for a media connection.
DEADLINE_S = 15.0

DEMO_STATE_JS = """
const status = document.getElementById('status');
if (!window.demo) { return null; }
return {state: demo.state, error: demo.error, warning: demo.warning, sessionErrors: demo.sessionErrors,
        sessionId: demo.sessionId, status: status ? status.textContent : null, mediaFailure: demo.mediaFailure};
"""

INBOUND_VIDEO_JS = """
const done = arguments[arguments.length - 1];
demo.inboundVideoStats().then(done, (err) => done({error: String(err)}));
"""


class FirefoxPage:
    """The demo page in Firefox, read the way tests/browser/test_demo_page.py reads Chromium."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def state(self) -> dict[str, Any]:
        state = self.client.execute_script(DEMO_STATE_JS, sandbox=None)
        assert state is not None, "window.demo is not defined: the page script did not load"
        return dict(state)

    def wait_joined(self) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def joined() -> bool:
            nonlocal last
            last = self.state()
            assert last["state"] != "error", last
            return bool(last["state"] == "joined")

        wait_until_sync(joined, timeout=60, interval=0.2, message=f"Firefox page joined (last: {last})")
        return last

    def inbound_video(self) -> list[dict[str, Any]]:
        stats = self.client.execute_async_script(INBOUND_VIDEO_JS, sandbox=None)
        assert isinstance(stats, list), f"inboundVideoStats() failed: {stats}"
        return stats


def decoded(stats: list[dict[str, Any]]) -> int:
    return sum(int(entry["framesDecoded"]) for entry in stats)


def wait_for_growing_video(read: Any, who: str) -> None:
    """framesDecoded > 0, and then larger still: video keeps coming, not one frame."""
    first = 0

    def some() -> bool:
        nonlocal first
        first = decoded(read())
        return first > 0

    wait_until_sync(some, timeout=60, interval=0.5, message=f"{who} to decode video")
    wait_until_sync(lambda: decoded(read()) > first + 10, timeout=30, interval=0.5,
                    message=f"{who}'s decoded frames to grow past {first}")


def test_chromium_and_firefox_call_each_other_through_the_sfu(
    server: ServerHandle, browser: BrowserFactory, firefox: FirefoxFactory
) -> None:
    room = f"ff-chromium-{secrets.token_hex(4)}"
    chromium = browser()
    fox = FirefoxPage(firefox())
    chromium.get(demo_url(server, room=room, name="C", role="clinician", autojoin="1"))
    fox.client.navigate(demo_url(server, room=room, name="F", role="patient", autojoin="1"))

    state_c = wait_for_state(chromium, "joined")
    state_f = fox.wait_joined()
    assert state_c["sessionId"] and state_c["sessionId"] == state_f["sessionId"]

    wait_for_decoded_video(chromium, "Chromium")
    wait_for_growing_video(fox.inbound_video, "Firefox")
    wait_for_growing_video(lambda: inbound_video(chromium), "Chromium")
    assert page_state(chromium)["warning"] is None and fox.state()["warning"] is None


def test_two_firefox_pages_call_each_other_through_the_sfu(server: ServerHandle, firefox: FirefoxFactory) -> None:
    room = f"ff-ff-{secrets.token_hex(4)}"
    pages = [FirefoxPage(firefox()), FirefoxPage(firefox())]
    for page, (name, role) in zip(pages, (("A", "clinician"), ("B", "patient"))):
        page.client.navigate(demo_url(server, room=room, name=name, role=role, autojoin="1"))
    states = [page.wait_joined() for page in pages]
    assert states[0]["sessionId"] == states[1]["sessionId"]
    for page, who in zip(pages, ("Firefox A", "Firefox B")):
        wait_for_growing_video(page.inbound_video, who)
    for page in pages:
        state = page.state()
        assert state["warning"] is None and state["mediaFailure"] is None, state


# --- no silent hangs ----------------------------------------------------------------------------


def session_events(server: ServerHandle, session_id: str) -> list[dict[str, Any]]:
    support = authority(server.data_dir).mint("support", Role.SUPPORT, "Support")
    events: list[dict[str, Any]] = get_json(f"{server.url}/api/sessions/{session_id}/events", support)["events"]
    return events


def assert_failure_recorded(server: ServerHandle, session_id: str) -> list[dict[str, Any]]:
    """The event log has the publish's ICE failure with both sides' candidates, and no stream
    ever went live (streamCreated is what the others would have been sent)."""
    found: list[dict[str, Any]] = []

    def recorded() -> bool:
        nonlocal found
        found = [e for e in session_events(server, session_id)
                 if e["kind"] in ("iceStateChanged", "dtlsStateChanged") and "local_candidates" in e["payload"]]
        return bool(found)

    wait_until_sync(recorded, timeout=DEADLINE_S + 15, interval=0.5, message="the failure in the event log")
    for entry in found:
        payload = entry["payload"]
        assert payload["state"] in ("failed", "closed"), entry
        assert payload["local_candidates"] and payload["remote_candidates"], entry
        assert all(c["address"].startswith("127.0.0.1:") for c in payload["local_candidates"]), entry
        assert "Server offered host udp 127.0.0.1:" in entry["text"] and "client offered" in entry["text"], entry
    kinds = [e["kind"] for e in session_events(server, session_id)]
    assert "publishAttempt" in kinds and "streamCreated" not in kinds, kinds
    return found


def assert_page_says_so(state: dict[str, Any]) -> None:
    failure = state["mediaFailure"]
    assert failure is not None and failure["kind"] == "publish", state
    assert failure["code"] in ("media_timeout", "media_error"), failure
    assert "could not connect" in state["status"] and "try another network" in state["status"], state


def test_firefox_refusing_loopback_candidates_is_told_within_the_deadline(
    server: ServerHandle, firefox: FirefoxFactory
) -> None:
    # Firefox as shipped does not pair with loopback candidates, the only ones this server offers:
    # ICE never completes. It used to hang silently with the page saying "Connected".
    room = f"ff-hang-{secrets.token_hex(4)}"
    page = FirefoxPage(firefox(loopback=False))
    started = time.monotonic()
    page.client.navigate(demo_url(server, room=room, name="F", role="patient", autojoin="1"))
    session_id = page.wait_joined()["sessionId"]

    last: dict[str, Any] = {}

    def told() -> bool:
        nonlocal last
        last = page.state()
        return last["mediaFailure"] is not None

    wait_until_sync(told, timeout=DEADLINE_S + 10, interval=0.25, message="the page to report the failure")
    assert time.monotonic() - started < DEADLINE_S + 10
    assert_page_says_so(last)
    assert last["mediaFailure"]["reason"] == "timeout" and last["mediaFailure"]["retrying"], last
    assert f"within {DEADLINE_S:g} seconds" in last["status"], last

    entries = assert_failure_recorded(server, session_id)
    # Firefox trickled its own (non-loopback) host candidates; the server offered 127.0.0.1.
    assert any(c["type"] == "host" and not c["address"].startswith("127.")
               for e in entries for c in e["payload"]["remote_candidates"]), entries


@pytest.fixture(scope="module")
def refusing_turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TurnServer]:
    require_chromium()
    with turn_server(tmp_path_factory.mktemp("turn"), allow_loopback_peers=False) as turn:
        yield turn


def test_chromium_whose_relay_cannot_reach_the_server_is_told_within_the_deadline(
    browser: BrowserFactory, refusing_turn: TurnServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Relay-only ICE through a TURN server that will not relay to the (loopback) media server:
    # no candidate pair the browser can use.
    handle = start_server(tmp_path_factory.mktemp("server-turn"),
                          extra_config=f'turn_urls = ["{refusing_turn.url}"]\nturn_secret = "{refusing_turn.secret}"\n')
    try:
        room = f"relay-refused-{secrets.token_hex(4)}"
        driver = browser()
        started = time.monotonic()
        driver.get(demo_url(handle, room=room, name="C", role="patient", autojoin="1", ice="relay"))
        wait_for_state(driver, "joined")
        last: dict[str, Any] = {}

        def told() -> bool:
            nonlocal last
            last = dict(driver.execute_script(DEMO_STATE_JS))
            return last["mediaFailure"] is not None

        wait_until_sync(told, timeout=DEADLINE_S + 10, interval=0.25, message="the page to report the failure")
        assert time.monotonic() - started < DEADLINE_S + 10
        assert_page_says_so(last)
        entries = assert_failure_recorded(handle, last["sessionId"])
        # The browser's only candidates are the TURN server's relay addresses.
        assert {c["type"] for e in entries for c in e["payload"]["remote_candidates"]} == {"relay"}, entries
    finally:
        handle.stop()
