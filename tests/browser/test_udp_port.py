"""Two Chromium pages call through a server whose media is on one UDP port
(``media.udp_port``): each decodes the other's video, every server candidate pair is on
that port, the server process holds exactly that one UDP socket, and the routes go when
the pages leave."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from rooms.model import Role
from tests.browser.conftest import BrowserFactory, ServerHandle, require_chromium
from tests.browser.test_demo_page import demo_url, page_state, wait_for_decoded_video, wait_for_state
from tests.call_helpers import authority, get_json
from tests.helpers import wait_until_sync
from tests.server import start_server
from tests.test_media_hardening import metric
from tests.test_udp_port import free_udp_port, udp_sockets

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def udp_port() -> int:
    return free_udp_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, udp_port: int) -> Iterator[ServerHandle]:
    require_chromium()
    handle = start_server(tmp_path_factory.mktemp("server"), extra_config=f"udp_port = {udp_port}\n")
    try:
        yield handle
    finally:
        handle.stop()


def test_two_pages_call_through_one_udp_port(server: ServerHandle, browser: BrowserFactory, udp_port: int) -> None:
    room = f"udp-port-{secrets.token_hex(4)}"
    pages = [browser(), browser()]
    for page, (name, role) in zip(pages, (("A", "clinician"), ("B", "patient"))):
        page.get(demo_url(server, room=room, name=name, role=role, autojoin="1"))
    for page, who in zip(pages, ("A", "B")):
        wait_for_state(page, "joined")
        wait_for_decoded_video(page, who)
        assert page_state(page)["warning"] is None

    # Two publishes and two subscriptions, one UDP socket in the server process.
    assert udp_sockets(server.proc.pid) == {("127.0.0.1", udp_port)}
    session_id = pages[0].execute_script("return window.demo.sessionId")
    support = authority(server.data_dir).mint("support", Role.SUPPORT, "Support")
    events = get_json(f"{server.url}/api/sessions/{session_id}/events", support)["events"]
    pairs = [e["payload"]["candidate_pair"] for e in events
             if e["kind"] == "iceStateChanged" and e["payload"]["state"] == "completed"]
    assert len(pairs) == 4, pairs
    assert {p["local_address"] for p in pairs} == {f"127.0.0.1:{udp_port}"}, pairs
    assert metric(server, "media_udp_routes", kind="username") == 4

    for page in pages:
        page.find_element("id", "leave").click()
        wait_for_state(page, "idle")
    for kind in ("username", "address"):
        wait_until_sync(lambda: metric(server, "media_udp_routes", kind=kind) == 0, timeout=30,
                        message=f"{kind} routes at 0 after both pages left")
