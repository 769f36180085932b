"""Two Chromium pages call through ``openconsult serve --workers 2`` (one public port, a real
Redis): each decodes the other's video; the worker that owns their room is killed with SIGKILL,
the supervisor starts it again (same index, new pid), and the SDK in both pages rejoins by
itself and decodes video again on new subscriptions."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Iterator

import pytest

from tests.browser.conftest import BrowserFactory, ServerHandle, require_chromium
from tests.browser.test_demo_page import demo_url, inbound_video, wait_for_decoded_video, wait_for_state
from tests.browser.test_reconnect import RECONNECT_TIMEOUT, wait_for_frames, wait_for_new_video
from tests.helpers import wait_until_sync
from tests.redis_server import RedisServer, redis_server
from tests.test_cluster import _owner
from tests.test_workers import health, restarted, start_host

pytestmark = [pytest.mark.browser, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    require_chromium()
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[ServerHandle]:
    """Overrides conftest's: the supervisor with two workers on one port."""
    handle, _ = start_host(tmp_path_factory.mktemp("workers"), redis)
    try:
        yield handle
    finally:
        handle.stop()


def test_two_pages_call_through_workers_and_rejoin_after_a_worker_is_killed(
        server: ServerHandle, browser: BrowserFactory, redis: RedisServer) -> None:
    room = f"workers-{secrets.token_hex(4)}"
    pages = {"A": browser(), "B": browser()}
    pages["A"].get(demo_url(server, room=room, name="A", role="clinician", autojoin="1"))
    pages["B"].get(demo_url(server, room=room, name="B", role="patient", autojoin="1"))
    sessions = {who: wait_for_state(page, "joined")["sessionId"] for who, page in pages.items()}
    assert sessions["A"] == sessions["B"], sessions
    for who, page in pages.items():
        wait_for_decoded_video(page, who)
        wait_for_frames(page, 30, f"{who} to decode 30 frames")
    before = {who: inbound_video(page) for who, page in pages.items()}

    owner = asyncio.run(_owner(redis, room))
    dead = next(r for r in health(server)["workers"] if r["node_id"] == owner)
    os.kill(dead["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    wait_until_sync(lambda: restarted(server, dead), timeout=RECONNECT_TIMEOUT, interval=0.3,
                    message="the killed worker back")
    # The SDK notices the lost socket (or the relay's 1012) and rejoins through the shared port.
    for who, page in pages.items():
        wait_for_new_video(page, who, before[who])
        assert page.execute_script("return demo.reconnects") >= 1
    took = time.monotonic() - killed_at
    assert took < 2 * RECONNECT_TIMEOUT, took
    assert f"worker {dead['index']} (pid {dead['pid']}) killed by SIGKILL" in server.log_text()
