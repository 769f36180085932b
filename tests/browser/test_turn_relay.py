"""The browser SDK uses the TURN servers the join response hands out: two
Chromium pages forced to relay-only ICE (`?ice=relay`) still see each other,
through a real coturn, and the selected candidate pair is a relay; the pre-call test (/test)
runs its relay-only pass through it too."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from rooms.model import Role
from tests.browser.conftest import BrowserFactory, ServerHandle, require_chromium
from tests.browser.test_demo_page import demo_url, wait_for_decoded_video, wait_for_state
from tests.call_helpers import authority, get_json
from tests.server import start_server
from tests.turn_server import TurnServer, turn_server

SELECTED_PAIR_JS = """
const done = arguments[0];
(async () => {
  const out = [];
  for (const subscription of window.demo.subscriptions.values()) {
    const stats = await subscription.pc.getStats();
    let pair = null;
    stats.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId); });
    const local = pair && stats.get(pair.localCandidateId);
    out.push(local ? local.candidateType : null);
  }
  done({ types: out, iceServers: window.demo.session.iceServers });
})().catch((e) => done({ error: String(e) }));
"""


@pytest.fixture(scope="module")
def turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TurnServer]:
    require_chromium()
    with turn_server(tmp_path_factory.mktemp("turn")) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, turn: TurnServer) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path_factory.mktemp("server"),
                          extra_config=f'turn_urls = ["{turn.url}"]\nturn_secret = "{turn.secret}"\n')
    try:
        yield handle
    finally:
        handle.stop()


def test_relay_only_pages_call_through_turn(server: ServerHandle, browser: BrowserFactory, turn: TurnServer) -> None:
    room = f"relay-{secrets.token_hex(4)}"
    pages = [browser(), browser()]
    for page, (name, role) in zip(pages, (("A", "clinician"), ("B", "patient"))):
        page.get(demo_url(server, room=room, name=name, role=role, autojoin="1", ice="relay"))
    for page, who in zip(pages, ("A", "B")):
        wait_for_state(page, "joined")
        wait_for_decoded_video(page, who)
        result: dict[str, Any] = page.execute_async_script(SELECTED_PAIR_JS)
        assert "error" not in result, result
        assert [s["urls"] for s in result["iceServers"]] == [[turn.url]], result
        assert result["types"] and set(result["types"]) == {"relay"}, result

    session_id = pages[0].execute_script("return window.demo.sessionId")
    support = authority(server.data_dir).mint("support", Role.SUPPORT, "Support")
    events = get_json(f"{server.url}/api/sessions/{session_id}/events", support)["events"]
    pairs = [e["payload"]["candidate_pair"] for e in events
             if e["kind"] == "iceStateChanged" and e["payload"]["state"] == "completed"]
    # The server sees the far end at the TURN server's relay address: typed "relay" when the
    # trickled candidate came first, "prflx" when a connectivity check beat it.
    assert pairs, events
    for pair in pairs:
        host, port = pair["remote_address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) in turn.relay_ports, pair
        assert pair["remote_type"] in ("relay", "prflx"), pair


def test_precall_test_also_tries_relay_only(server: ServerHandle, browser: BrowserFactory, turn: TurnServer) -> None:
    """With TURN configured the pre-call test runs a second pass relay-only, through the real coturn."""
    from tests.browser.test_precall import run_test

    page = browser()
    state = run_test(page, server, timeout=60)
    result = state["result"]
    assert result["figures"]["connected"] and result["figures"]["turn"], result
    relay = result["relay"]
    assert relay is not None and relay["verdict"] != "cannot_connect", relay
    assert relay["figures"]["local_candidate_type"] == "relay" and relay["figures"]["down_kbps"] > 0, relay
    assert result["report"]["relay_verdict"] == relay["verdict"], result["report"]
    assert "Through the relay only" in page.find_element("id", "precall-figures").text
