"""Calls survive a dropped connection: the SDK rejoins by itself, in real headless Chromium.

Each test has its own real server subprocess, stopped (SIGTERM: sockets close with 1001) and
started again on the same port and data dir (same token secret). Two demo pages in a call show
"Reconnecting…", get back to `joined` and decode each other's video again on new subscriptions.
A refused join (bad token, or a rejoin the restarted server refuses) is never retried, and
`leave()` — also in the middle of reconnecting — ends the session for good. The consultation
pages come back where they were: a waiting patient in line (seen in the clinician's queue), a
patient and clinician in a call back in the call.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import BrowserFactory, ServerHandle, require_chromium
from tests.browser.test_consultation_pages import (
    api_ok,
    book,
    click,
    consult_state,
    open_clinician,
    open_patient,
    wait_page,
)
from tests.browser.test_demo_page import (
    demo_url,
    forged_token,
    inbound_video,
    page_state,
    remote_tile_captions,
    wait_for_decoded_video,
    wait_for_state,
)
from tests.helpers import wait_until_sync
from tests.server import start_server

pytestmark = pytest.mark.browser

# Generous: a restart is a process exit, a Python start-up and the SDK's backoff (≤ 10 s a try).
RECONNECT_TIMEOUT = 90.0

# Count the page's WebSockets: installed before the SDK opens one (it reads window.WebSocket
# when a session is created).
COUNT_SOCKETS_JS = """
const Native = window.WebSocket;
window.__sockets = [];
window.WebSocket = class extends Native {
  constructor(...args) {
    super(...args);
    window.__sockets.push(this);
  }
};
"""

SOCKETS_JS = "return (window.__sockets || []).map((ws) => ws.readyState);"

# Keep the page's SDK session (the page drops its reference when it ends) and count its events.
HOLD_SESSION_JS = """
window.__session = demo.session;
window.__events = {reconnecting: 0, reconnected: 0, disconnected: []};
demo.session.on('reconnecting', () => { window.__events.reconnecting += 1; });
demo.session.on('reconnected', () => { window.__events.reconnected += 1; });
demo.session.on('disconnected', (e) => { window.__events.disconnected.push(e); });
"""

HELD_SESSION_JS = """
const s = window.__session;
return {state: s.state, reconnectPending: s._reconnect !== null, events: window.__events};
"""

RECONNECT_STATE_JS = """
return {
  states: demo.states,
  reconnecting: demo.reconnecting,
  reconnects: demo.reconnects,
  localPreview: !document.getElementById('local-tile').hidden
    && document.getElementById('local-video').srcObject !== null,
};
"""


@dataclass
class RestartableServer:
    """One server at a time on one port and data dir; every generation is kept for its log."""

    workdir: Path
    generations: list[ServerHandle] = field(default_factory=list)

    @property
    def current(self) -> ServerHandle:
        return self.generations[-1]

    def stop(self) -> None:
        """SIGTERM and wait for the process to exit, so the port is free for the next one."""
        self.current.stop(signal.SIGTERM)
        assert self.current.proc.poll() is not None, "the old server is still running"

    def start_again(self, extra_config: str = "") -> ServerHandle:
        old = self.current
        assert old.proc.poll() is not None, "stop() the running server first"
        self.generations.append(start_server(self.workdir, extra_config, data_dir=old.data_dir, port=old.port))
        return self.current


@pytest.fixture
def restartable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RestartableServer]:
    require_chromium()
    server = RestartableServer(tmp_path / "server")
    server.generations.append(start_server(server.workdir))
    try:
        yield server
    finally:
        for handle in server.generations:
            handle.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for index, handle in enumerate(server.generations):
                tail = "\n".join(handle.log_path.read_text(errors="replace").splitlines()[-120:])
                print(f"\n----- server generation {index} log tail ({handle.log_path}) -----\n{tail}")


@pytest.fixture
def server_log_on_failure(restartable: RestartableServer) -> RestartableServer:
    """Overrides conftest's: these tests bring their own (restartable) server; its fixture prints the logs."""
    return restartable


def wait_for(driver: Any, condition: str, message: str, timeout: float = RECONNECT_TIMEOUT) -> None:
    """Wait for a JS expression to be true on the page."""
    wait_until_sync(
        lambda: bool(driver.execute_script("return Boolean(" + condition + ");")),
        timeout=timeout,
        interval=0.2,
        message=message,
    )


def total_decoded(stats: list[dict[str, Any]]) -> int:
    return sum(int(entry["framesDecoded"]) for entry in stats)


def wait_for_frames(driver: Any, at_least: int, message: str) -> None:
    wait_until_sync(lambda: total_decoded(inbound_video(driver)) >= at_least, timeout=RECONNECT_TIMEOUT,
                    interval=0.5, message=message)


def wait_for_new_video(driver: Any, who: str, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Video on a new subscription (not one from before the restart) decoding more frames than
    the page had decoded before it."""
    old_ids = {entry["subscriptionId"] for entry in before}
    floor = total_decoded(before)
    last: list[dict[str, Any]] = []

    def decoding_again() -> bool:
        nonlocal last
        last = inbound_video(driver)
        return bool(last) and all(e["subscriptionId"] not in old_ids for e in last) and total_decoded(last) > floor

    try:
        wait_until_sync(decoding_again, timeout=RECONNECT_TIMEOUT, interval=0.5,
                        message=f"{who} to decode more than {floor} frames on a new subscription")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last inbound stats: {last}; page: {page_state(driver)}") from None
    return last


def test_call_survives_a_server_restart(restartable: RestartableServer, browser: BrowserFactory) -> None:
    server = restartable.current
    room = f"reconnect-{secrets.token_hex(4)}"
    pages = {"A": browser(), "B": browser()}
    pages["A"].get(demo_url(server, room=room, name="A", role="clinician", autojoin="1"))
    pages["B"].get(demo_url(server, room=room, name="B", role="patient", autojoin="1"))
    first_session = {who: wait_for_state(page, "joined")["sessionId"] for who, page in pages.items()}
    assert first_session["A"] == first_session["B"], first_session
    for who, page in pages.items():
        wait_for_decoded_video(page, who)
        # A real count to beat after the restart, not the first frame or two.
        wait_for_frames(page, 30, f"{who} to decode 30 frames")
    before = {who: inbound_video(page) for who, page in pages.items()}
    assert all(len(stats) == 1 for stats in before.values()), before

    # Server down: both pages say so, keep their own camera preview, lose the remote tile.
    restartable.stop()
    for who, page in pages.items():
        state = wait_for_state(page, "reconnecting", timeout=RECONNECT_TIMEOUT)
        assert state["status"].startswith("Reconnecting… (attempt "), state
        assert "close code 1001" in state["status"], state
        wait_for(page, "demo.subscriptions.size === 0 && document.querySelectorAll('.tile.remote').length === 0",
                 f"{who}'s remote tile to go while reconnecting")
        reconnect = page.execute_script(RECONNECT_STATE_JS)
        assert reconnect["reconnecting"]["code"] == 1001, reconnect
        assert reconnect["reconnecting"]["attempt"] >= 1, reconnect
        assert reconnect["localPreview"], reconnect

    # Same port, same data dir (same token secret): both rejoin with their tokens.
    restartable.start_again()
    after_session = {}
    for who, page in pages.items():
        after_session[who] = wait_for_state(page, "joined", timeout=RECONNECT_TIMEOUT)["sessionId"]
    assert after_session["A"] == after_session["B"], after_session
    # A restarted server has a new session for the room; the page shows the id support asks for.
    assert after_session["A"] != first_session["A"], (first_session, after_session)
    for page in pages.values():
        assert page.find_element("id", "session-id").text == after_session["A"]

    for who, page in pages.items():
        stats = wait_for_new_video(page, who, before[who])
        assert len(stats) == 1, stats
        # Still flowing: the count goes on rising.
        wait_for_frames(page, total_decoded(stats) + 1, f"{who}'s frame count to keep rising")
        reconnect = page.execute_script(RECONNECT_STATE_JS)
        assert reconnect["states"][-3:] == ["joined", "reconnecting", "joined"], reconnect
        assert reconnect["reconnects"] == 1 and reconnect["reconnecting"] is None, reconnect
        assert reconnect["localPreview"], reconnect
        state = page_state(page)
        assert state["error"] is None and state["warning"] is None, state

    wait_until_sync(lambda: remote_tile_captions(pages["A"]) == ["B (patient)"], timeout=RECONNECT_TIMEOUT,
                    message="A's tile for B to come back")
    wait_until_sync(lambda: remote_tile_captions(pages["B"]) == ["A (clinician)"], timeout=RECONNECT_TIMEOUT,
                    message="B's tile for A to come back")


def test_refused_join_is_not_retried(restartable: RestartableServer, browser: BrowserFactory) -> None:
    server = restartable.current
    page = browser()
    page.get(server.url + "/")
    wait_for_state(page, "idle")
    page.execute_script(COUNT_SOCKETS_JS)
    page.find_element("css selector", "#token-details summary").click()
    page.find_element("id", "token").send_keys(forged_token())
    page.find_element("id", "join").click()

    state = wait_for_state(page, "error")
    assert state["error"]["code"] == "unauthorized", state
    # The one socket is closed (the server closes a refused join with 4001) and no other was opened.
    wait_until_sync(lambda: page.execute_script(SOCKETS_JS) == [3], timeout=RECONNECT_TIMEOUT,
                    message="the refused join's socket to close")
    assert "reconnecting" not in page.execute_script(RECONNECT_STATE_JS)["states"]


def test_rejoin_refused_after_restart_stops_retrying(restartable: RestartableServer, browser: BrowserFactory) -> None:
    """The server comes back with another token secret: the first rejoin it answers is refused
    (unauthorized, 4001), and that ends the session instead of another try."""
    server = restartable.current
    page = browser()
    page.get(demo_url(server, room=f"refused-{secrets.token_hex(4)}", name="C", role="patient", autojoin="1"))
    wait_for_state(page, "joined")
    page.execute_script(HOLD_SESSION_JS)

    restartable.stop()
    wait_for_state(page, "reconnecting", timeout=RECONNECT_TIMEOUT)
    restartable.start_again(f'[auth]\nsecret = "{secrets.token_hex(24)}"\n')

    state = wait_for_state(page, "error", timeout=RECONNECT_TIMEOUT)
    assert state["error"]["code"] == "unauthorized", state
    held = page.execute_script(HELD_SESSION_JS)
    assert held["state"] == "disconnected" and not held["reconnectPending"], held
    assert held["events"]["reconnected"] == 0, held
    [disconnected] = held["events"]["disconnected"]
    assert disconnected["error"]["code"] == "unauthorized", disconnected
    assert disconnected["attempts"] == held["events"]["reconnecting"] >= 1, held
    assert disconnected["left"] is False, disconnected


def test_leave_does_not_reconnect(restartable: RestartableServer, browser: BrowserFactory) -> None:
    server = restartable.current
    page = browser()
    page.get(demo_url(server, room=f"leave-{secrets.token_hex(4)}", name="D", role="patient"))
    wait_for_state(page, "idle")
    page.execute_script(COUNT_SOCKETS_JS)
    page.find_element("id", "join").click()
    wait_for_state(page, "joined")
    page.execute_script(HOLD_SESSION_JS)

    page.find_element("id", "leave").click()
    wait_for_state(page, "idle")
    # The server's 1000 close after `leave` has come and gone: the session stays ended.
    wait_until_sync(lambda: page.execute_script(SOCKETS_JS) == [3], timeout=RECONNECT_TIMEOUT,
                    message="the socket to close after leave")
    held = page.execute_script(HELD_SESSION_JS)
    assert held["state"] == "disconnected" and not held["reconnectPending"], held
    assert held["events"]["reconnecting"] == 0, held
    assert [e["left"] for e in held["events"]["disconnected"]] == [True], held
    assert "reconnecting" not in page.execute_script(RECONNECT_STATE_JS)["states"]


def test_leave_while_reconnecting_stops_retrying(restartable: RestartableServer, browser: BrowserFactory) -> None:
    server = restartable.current
    page = browser()
    page.get(demo_url(server, room=f"leave-{secrets.token_hex(4)}", name="E", role="patient", autojoin="1"))
    wait_for_state(page, "joined")
    page.execute_script(HOLD_SESSION_JS)

    restartable.stop()
    wait_for_state(page, "reconnecting", timeout=RECONNECT_TIMEOUT)
    page.find_element("id", "leave").click()
    wait_for_state(page, "idle")
    held = page.execute_script(HELD_SESSION_JS)
    assert held["state"] == "disconnected" and not held["reconnectPending"], held
    assert [e["left"] for e in held["events"]["disconnected"]] == [True], held
    # The local preview went with the session.
    assert not page.execute_script(RECONNECT_STATE_JS)["localPreview"]


CONSULT_INBOUND_JS = """
const done = arguments[arguments.length - 1];
consult.inboundVideoStats().then(done, (err) => done({error: String(err)}));
"""

CONSULT_RECONNECT_JS = """
const status = document.getElementById('consult-status');
return {reconnecting: consult.reconnecting, reconnects: consult.reconnects,
        line: status.dataset.state, text: status.textContent};
"""


def wait_consult_video(driver: Any, who: str, old_ids: set[str]) -> set[str]:
    """A subscription not in ``old_ids`` decoding video; returns the page's subscription ids."""
    last: list[dict[str, Any]] = []

    def decoding() -> bool:
        nonlocal last
        last = driver.execute_async_script(CONSULT_INBOUND_JS)
        assert isinstance(last, list), last
        return any(e["framesDecoded"] > 0 and e["subscriptionId"] not in old_ids for e in last)

    try:
        wait_until_sync(decoding, timeout=RECONNECT_TIMEOUT, interval=0.5, message=f"{who} to decode video")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last inbound stats: {last}; page: {consult_state(driver)}") from None
    return {e["subscriptionId"] for e in last}


def wait_consult_reconnecting(driver: Any, who: str, view_state: str) -> None:
    """The status line says so while the page keeps its place (its view state)."""
    wait_for(driver, "consult.reconnecting !== null", f"{who} to show reconnecting")
    shown = driver.execute_script(CONSULT_RECONNECT_JS)
    assert shown["line"] == "reconnecting" and "Reconnecting… (attempt " in shown["text"], shown
    assert shown["reconnecting"]["code"] == 1001, shown
    assert consult_state(driver)["state"] == view_state, consult_state(driver)


def test_consultation_pages_come_back_after_restarts(restartable: RestartableServer, browser: BrowserFactory) -> None:
    """Waiting patient and clinician desk through one restart, then their call through another
    (the clinician's desk token: the call runs on its own second connection)."""
    server = restartable.current
    booking = book(server, minutes_from_now=2)
    clinician = open_clinician(browser, booking, desk=True)
    patient = open_patient(browser, booking)
    wait_page(clinician, "the patient in the queue", lambda s: [q["sessionId"] for q in s["queue"]] == [booking.session_id])

    # Restart while the patient waits: the place in line and the clinician's queue come back.
    restartable.stop()
    wait_consult_reconnecting(patient, "the patient", "waiting")
    wait_consult_reconnecting(clinician, "the clinician", "queue")
    restartable.start_again()
    for page in (patient, clinician):
        wait_for(page, "consult.reconnecting === null && consult.reconnects === 1", "the page to be back")
    back = wait_page(patient, "the patient back in line",
                     lambda s: s["state"] == "waiting" and s["position"] == 1 and s["status"].startswith("Connected."))
    assert back["positionText"].startswith("You are number 1 in line"), back
    wait_page(clinician, "the queue again", lambda s: s["state"] == "queue"
              and [q["sessionId"] for q in s["queue"]] == [booking.session_id] and s["status"].startswith("Connected as"))

    # The call, then a restart in the middle of it: both pages back in the call, video again.
    click(clinician, f'.admit[data-session-id="{booking.session_id}"]')
    wait_page(clinician, "the clinician in the call", lambda s: s["state"] == "in_call")
    wait_page(patient, "the patient in the call", lambda s: s["state"] == "in_call")
    before = {"clinician": wait_consult_video(clinician, "the clinician", set()),
              "patient": wait_consult_video(patient, "the patient", set())}

    restartable.stop()
    wait_consult_reconnecting(patient, "the patient", "in_call")
    wait_consult_reconnecting(clinician, "the clinician", "in_call")
    restartable.start_again()
    for who, page in (("clinician", clinician), ("patient", patient)):
        wait_consult_video(page, f"the {who} after the restart", before[who])
        state = wait_page(page, f"the {who}'s call status", lambda s: s["state"] == "in_call"
                          and not s["status"].startswith("Connection lost"))
        assert state["error"] is None and state["warning"] is None, state
    assert consult_state(patient)["status"].startswith("The clinician has let you in"), consult_state(patient)
    assert consult_state(clinician)["status"].startswith("In consultation with"), consult_state(clinician)
    # The consultation itself went on: still in progress on the server.
    consultation = api_ok(restartable.current, "GET", f"/api/consultations/{booking.session_id}", booking.admin_token)
    assert consultation["consultation"]["state"] == "in_progress", consultation


# Make a live peer connection look failed to the SDK (ICE broke after a network change).
FAIL_PEER_JS = """
const pc = arguments[0] === 'publisher' ? demo.publisher.pc : Array.from(demo.subscriptions.values())[0].pc;
Object.defineProperty(pc, 'connectionState', {get: () => 'failed'});
pc.dispatchEvent(new Event('connectionstatechange'));
return true;
"""


def test_failed_peer_connection_is_rebuilt(restartable: RestartableServer, browser: BrowserFactory) -> None:
    """Socket up, one stream's transport failed: that stream alone is set up again."""
    server = restartable.current
    room = f"pcfail-{secrets.token_hex(4)}"
    pages = {"A": browser(), "B": browser()}
    pages["A"].get(demo_url(server, room=room, name="A", role="clinician", autojoin="1"))
    pages["B"].get(demo_url(server, room=room, name="B", role="patient", autojoin="1"))
    for who, page in pages.items():
        wait_for_state(page, "joined")
    before = {who: wait_for_decoded_video(page, who) for who, page in pages.items()}

    # A's subscription fails: A unsubscribes and subscribes again (a new subscription decodes).
    pages["A"].execute_script(FAIL_PEER_JS, "subscription")
    after_a = wait_for_new_video(pages["A"], "A", before["A"])
    assert [e["streamId"] for e in after_a] == [e["streamId"] for e in before["A"]], (before, after_a)

    # B's publisher fails: B publishes the same camera again as a new stream; A gets it.
    old_stream = pages["B"].execute_script("return demo.publisher.streamId;")
    pages["B"].execute_script(FAIL_PEER_JS, "publisher")
    wait_for(pages["B"], f"demo.publisher.streamId && demo.publisher.streamId !== {old_stream!r}",
             "B's camera to be published again")
    new_stream = pages["B"].execute_script("return demo.publisher.streamId;")
    wait_until_sync(lambda: [e["streamId"] for e in inbound_video(pages["A"])] == [new_stream],
                    timeout=RECONNECT_TIMEOUT, interval=0.5, message="A to receive B's new stream")
    wait_for_new_video(pages["A"], "A", after_a)
    for page in pages.values():
        state = page_state(page)
        assert state["state"] == "joined" and state["warning"] is None and state["error"] is None, state
    assert remote_tile_captions(pages["A"]) == ["B (patient)"]
