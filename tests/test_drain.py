"""Draining one ``openconsult serve --drain`` node with no Redis: SIGTERM (or the admin API) makes it
refuse new rooms with ``draining`` and say so on /healthz, while its call goes on and a participant
rejoins it; it exits 0 once the call ends, or at ``cluster.drain_timeout_s`` (closing 1001)."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loadtest.client import RequestFailed, SignallingClient
from rooms.model import Role
from tests.call_helpers import authority
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server

pytestmark = pytest.mark.slow


def _health(server: ServerProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_sigterm_drains_the_call_ends_then_the_node_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, args=("--drain",))
    tokens = authority(server.data_dir)
    pat, doc, late = (SignallingClient(server.ws_url) for _ in range(3))
    try:
        await pat.connect()
        await pat.join(tokens.mint("room-live", Role.PATIENT, "Pat"))
        server.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: _health(server)[0] == 503, timeout=30, message="/healthz says draining")
        assert '"status": "draining"' in _health(server)[1]
        # A new room: refused, with a code that says why.
        await late.connect()
        with pytest.raises(RequestFailed) as err:
            await late.join(tokens.mint("room-new", Role.PATIENT, "Late"))
        assert err.value.code == "draining" and "draining" in err.value.message
        # The call in progress: a clinician joining (or rejoining) it is not cut off.
        await doc.connect()
        joined = await doc.join(tokens.mint("room-live", Role.CLINICIAN, "Doc"))
        assert [c["name"] for c in joined["connections"]] == ["Pat"]
        assert server.proc.poll() is None
        await pat.request("leave")
        assert server.proc.poll() is None  # the clinician is still in the call
        await doc.request("leave")
        await wait_until(lambda: server.proc.poll() is not None, timeout=30, message="the drained node exits")
        assert server.proc.returncode == 0, server.log_tail()
        log = server.log_text()
        assert "drain: node" in log and "(SIGTERM)" in log and "holds no more rooms or connections; exiting" in log
    finally:
        for client in (pat, doc, late):
            await client.close()
        server.stop()


async def test_the_drain_deadline_stops_the_node_closing_1001(tmp_path: Path) -> None:
    server = start_server(tmp_path, "[cluster]\ndrain_timeout_s = 2.0\n", args=("--drain",))
    tokens = authority(server.data_dir)
    pat = SignallingClient(server.ws_url)
    try:
        await pat.connect()
        await pat.join(tokens.mint("room-stays", Role.PATIENT, "Pat"))
        server.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: server.proc.poll() is not None, timeout=30, message="the deadline stops the node")
        assert server.proc.returncode == 0, server.log_tail()
        await wait_until(pat.closed.wait, timeout=10, message="the socket closed")
        assert pat.close_code == 1001
        assert "reached its drain deadline (2 s) with 1 rooms and 1 connections" in server.log_text()
    finally:
        await pat.close()
        server.stop()


async def test_without_drain_sigterm_stops_at_once(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    pat = SignallingClient(server.ws_url)
    try:
        await pat.connect()
        await pat.join(authority(server.data_dir).mint("room-x", Role.PATIENT, "Pat"))
        assert server.stop(signal.SIGTERM) == 0
        await wait_until(pat.closed.wait, timeout=10, message="the socket closed")
        assert pat.close_code == 1001 and "drain:" not in server.log_path.read_text()
    finally:
        await pat.close()
