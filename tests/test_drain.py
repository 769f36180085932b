"""Draining one ``openconsult serve --drain`` node with no Redis: SIGTERM (or the admin API) makes it
refuse new rooms with ``draining`` and say so on /healthz, while its call goes on and a participant
rejoins it; it exits 0 once the call ends, or at ``cluster.drain_timeout_s`` (closing 1001)."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
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


async def test_the_admin_api_drains_checks_its_input_and_is_idempotent(tmp_path: Path) -> None:
    server = start_server(tmp_path)  # no --drain: the API drains all the same
    tokens = authority(server.data_dir)
    admin = tokens.mint("ops", Role.ADMIN, "ops")
    pat = SignallingClient(server.ws_url)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as http:
            for bad in (0, -1, 86_401, "600", True, [600]):
                async with http.post(server.url + "/api/admin/drain", json={"deadline_s": bad}) as response:
                    body = await response.json()
                    assert response.status == 400 and body["error"]["code"] == "invalid_message", (bad, body)
                    assert '"deadline_s"' in body["error"]["message"]
            await pat.connect()
            await pat.join(tokens.mint("room-live", Role.PATIENT, "Pat"))
            async with http.post(server.url + "/api/admin/drain", json={"deadline_s": 600}) as response:
                first = await response.json()
                assert response.status == 202, first
            assert first["draining"] and first["deadline_s"] == 600 and (first["rooms"], first["connections"]) == (1, 1)
            async with http.post(server.url + "/api/admin/drain") as response:  # no body: the same drain
                again = await response.json()
                assert response.status == 202 and again["started_ms"] == first["started_ms"], again
        await pat.request("leave")
        await wait_until(lambda: server.proc.poll() is not None, timeout=30, message="the drained node exits")
        assert server.proc.returncode == 0
        assert "(POST /api/admin/drain by ops)" in server.log_text()
    finally:
        await pat.close()
        server.stop()
