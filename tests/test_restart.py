"""`openconsult serve` restarted on the same data dir still serves earlier sessions'
event logs, and keeps its generated token secret."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from loadtest.client import SignallingClient
from rooms.model import Role
from tests.call_helpers import authority, get_json
from tests.server import start_server


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_event_log_survives_restart(tmp_path: Path, stop_signal: int) -> None:
    server = start_server(tmp_path)
    tokens = authority(server.data_dir)
    room = f"r-{uuid.uuid4().hex[:8]}"
    client = await SignallingClient(server.ws_url).connect()
    joined = await client.join(tokens.mint(room, Role.PATIENT, "Anna"))
    await client.request("leave")
    await client.closed.wait()
    await client.close()
    session_id = joined["session_id"]
    support = tokens.mint("support", Role.SUPPORT, "Support")
    before = get_json(f"{server.url}/api/sessions/{session_id}/events", support)["events"]
    assert [e["kind"] for e in before] == ["VideoSession", "connectAttempt", "serverDetectedConnect",
                                           "successfullyJoined", "disconnect"]
    assert before[-1]["payload"]["reason"] == "clientDisconnected"
    # Someone is still in a call when the server stops.
    staying = await SignallingClient(server.ws_url).connect()
    second = (await staying.join(tokens.mint(room, Role.CLINICIAN, "Dr Berg")))["session_id"]
    server.stop(stop_signal)
    await staying.closed.wait()
    await staying.close()

    restarted = start_server(tmp_path, data_dir=server.data_dir)
    try:
        # The same secret: the support token minted before the restart is still valid.
        after = get_json(f"{restarted.url}/api/sessions/{session_id}/events", support)["events"]
        assert after == before
        if stop_signal == signal.SIGTERM:
            last = get_json(f"{restarted.url}/api/sessions/{second}/events", support)["events"][-1]
            assert (last["kind"], last["payload"]["reason"]) == ("disconnect", "serverShutdown")
    finally:
        restarted.stop()
