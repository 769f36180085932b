"""Two Chromium pages on the demo page of two different nodes (three ``openconsult serve`` nodes
sharing a real redis-server): they are in the same room, one session, and decode each other's
video; the room has one owner, so one page's signalling is relayed by its node to the owner."""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator

import pytest

from tests.browser.conftest import BrowserFactory, ServerHandle, require_chromium
from tests.browser.test_demo_page import demo_url, page_state, wait_for_decoded_video, wait_for_state
from tests.redis_server import redis_server
from tests.server import start_server

pytestmark = [pytest.mark.browser, pytest.mark.redis]

SECRET = "cluster-pages-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerHandle]]:
    require_chromium()
    with redis_server() as redis:
        config = f'[auth]\nsecret = "{SECRET}"\n[cluster]\nlease_s = 3.0\n'
        handles: list[ServerHandle] = []
        try:
            for name in "abc":
                handles.append(start_server(tmp_path_factory.mktemp(f"node-{name}"), config,
                                            env={"OPENCONSULT_REDIS_URL": redis.url}))
            yield handles
        finally:
            for handle in handles:
                handle.stop()


@pytest.fixture(scope="module")
def server(nodes: list[ServerHandle]) -> ServerHandle:
    """The browser fixtures' server (whose log is printed on failure): the first node."""
    return nodes[0]


def _rooms(node: ServerHandle) -> int:
    with urllib.request.urlopen(node.url + "/healthz", timeout=5) as response:
        return int(json.loads(response.read())["rooms"])


def test_two_pages_through_two_nodes_share_one_room_and_decode(nodes: list[ServerHandle],
                                                               browser: BrowserFactory) -> None:
    room = f"cluster-{secrets.token_hex(4)}"
    pages = [browser(), browser()]
    for page, node, (name, role) in zip(pages, nodes[:2], (("A", "clinician"), ("B", "patient"))):
        page.get(demo_url(node, room=room, name=name, role=role, autojoin="1"))
    for page, who in zip(pages, ("A", "B")):
        wait_for_state(page, "joined")
        wait_for_decoded_video(page, who)
        assert page_state(page)["warning"] is None
    sessions = [page.execute_script("return window.demo.sessionId") for page in pages]
    assert sessions[0] and sessions[0] == sessions[1], sessions  # one call, not one per node
    # The room lives on exactly one node (its media too): a page on another node is relayed.
    assert sorted(_rooms(node) for node in nodes) == [0, 0, 1]
    for page in pages:
        page.find_element("id", "leave").click()
        wait_for_state(page, "idle")
