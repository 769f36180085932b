"""signalling.failover's decisions: when a draining node exits, what a failed node left open in a
session's log, and the entries the node that takes the room over writes."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from media.router import Router
from metrics.eventlog import EventLog
from metrics.events import EventKind
from metrics.recorder import Recorder
from rooms.directory import Holder, NodeId, NodeLoad, RoomOwnedElsewhere
from rooms.model import DisconnectReason, Role
from signalling.auth import TokenAuthority
from signalling.cluster import RedisDirectory
from signalling.failover import DrainStep, LeftOpen, drain_step, failure_entries, left_open
from signalling.hub import Client, Hub
from tests.redis_server import RedisServer, redis_srv

__all__ = ["redis_srv"]


@pytest.mark.parametrize(("rooms", "connections", "now", "step"), [
    (0, 0, 0.0, DrainStep.DONE),
    (0, 0, 99.0, DrainStep.DONE),  # nothing left wins over the deadline: exit 0
    (1, 0, 0.0, DrainStep.WAIT),
    (0, 1, 0.0, DrainStep.WAIT),  # a socket relayed through this node to a room elsewhere
    (1, 2, 10.0, DrainStep.DEADLINE),
    (1, 2, 9.99, DrainStep.WAIT),
])
def test_drain_step(rooms: int, connections: int, now: float, step: DrainStep) -> None:
    assert drain_step(rooms, connections, now, deadline=10.0) is step


def _e(kind: EventKind, cid: str | None = None, stream: str | None = None, **payload: Any) -> dict[str, Any]:
    return {"kind": str(kind), "connection_id": cid, "stream_id": stream, "payload": payload}


def test_left_open_is_what_connected_and_never_left() -> None:
    entries = [
        _e(EventKind.SERVER_DETECTED_CONNECT, "c1", name="Pat"),
        _e(EventKind.SERVER_DETECTED_CONNECT, "c2", name="Doc"),
        _e(EventKind.SERVER_DETECTED_CONNECT, "c3"),  # no name: its id stands in
        _e(EventKind.STREAM_CREATED, "c1", "st1"),
        _e(EventKind.STREAM_CREATED, "c2", "st2"),
        _e(EventKind.STREAM_CREATED, "c2", "st3"),
        _e(EventKind.STREAM_DESTROYED, "c2", "st3", reason="clientDisconnected"),
        _e(EventKind.DISCONNECT, "c2", reason="clientDisconnected"),  # left: its streams too
        _e(EventKind.STREAM_CREATED, "c3", "st4"),
        _e(EventKind.DISCONNECT, None, reason="x"),  # malformed: ignored
        {"kind": str(EventKind.SERVER_DETECTED_CONNECT), "connection_id": "c4", "payload": "not a dict"},
    ]
    assert left_open(entries) == LeftOpen({"c1": "Pat", "c3": "c3", "c4": "c4"}, {"st1": "c1", "st4": "c3"})
    assert left_open([]) == LeftOpen({}, {})


def test_failure_entries_name_the_lost_node_and_close_what_it_left_open() -> None:
    found = LeftOpen({"c1": "Pat", "c2": "Doc"}, {"st1": "c1"})
    out = failure_entries("s_1", Holder(NodeId("node_a"), "s_1", 1_000), NodeId("node_b"), found)
    kinds = [k for k, _, _ in out]
    assert kinds == [EventKind.NODE_FAILURE, EventKind.STREAM_DESTROYED, EventKind.DISCONNECT, EventKind.DISCONNECT]
    _, text, fields = out[0]
    assert "node_a" in text and "node_b" in text
    assert fields == {"node": "node_a", "last_seen_ms": 1_000, "by_node": "node_b", "connections": ["c1", "c2"]}
    assert out[1][2] == {"connection_id": "c1", "stream_id": "st1", "reason": "nodeFailure",
                         "detail": "node node_a stopped"}
    assert [(f["connection_id"], f["reason"], f["node"]) for _, _, f in out[2:]] == [
        ("c1", "nodeFailure", "node_a"), ("c2", "nodeFailure", "node_a")]
    assert out[3][1] == "Server detected disconnect: Doc. Reason: nodeFailure (node node_a stopped)"
    # Nothing left open (e.g. SQLite per node, the log is elsewhere): the failure is still logged.
    assert [k for k, _, _ in failure_entries("s_1", Holder(NodeId("n")), NodeId("m"), LeftOpen({}, {}))] == [
        EventKind.NODE_FAILURE]


# --- a node takes over the room of a node that died: real hubs, real Redis, one shared event log ---

SECRET = "failover-test-secret-0123456789abcdef"


@pytest.mark.redis
async def test_the_node_taking_over_logs_the_failure_once_before_the_rejoins(
        tmp_path: Path, redis_srv: RedisServer) -> None:
    """Node A holds a consultation's room with Pat and Doc and dies (stops renewing, never
    releases). Both rejoin through node B at once, and Gus joins while B logs the takeover: B logs
    one ``nodeFailure`` entry naming A and closes A's two connections as ``nodeFailure`` before any
    of the three joins, all under the same session id."""
    ns = f"t{uuid.uuid4().hex[:8]}:"
    tokens = TokenAuthority("HS256", SECRET, SECRET, leeway_s=30)
    eventlog = EventLog(tmp_path / "events.sqlite3")  # shared by both nodes, as PostgreSQL would be
    dir_a = RedisDirectory(redis_srv.url, node_id=NodeId("node-a"), lease_s=1.0, namespace=ns)
    dir_b = RedisDirectory(redis_srv.url, node_id=NodeId("node-b"), lease_s=1.0, namespace=ns)
    router_a, router_b = Router(), Router()
    hub_a = Hub(tokens, router_a, Recorder(eventlog))
    hub_b = Hub(tokens, router_b, Recorder(eventlog))
    hub_a.directory, hub_b.directory = dir_a, dir_b
    room = "c-takeover"
    try:
        await dir_a.start(lambda n: None)
        await dir_b.start(lambda n: None)
        first = [Client(lambda m: None) for _ in range(2)]
        for client, (role, name) in zip(first, ((Role.PATIENT, "Pat"), (Role.CLINICIAN, "Doc"))):
            await hub_a.join(client, tokens.mint(room, role, name, consultation=room), None, None)
        await dir_a.heartbeat(NodeLoad(rooms=1, calls=1))  # renews the holder record
        # A dies here. Both rejoin through B, racing for the room once A's lease expired.
        again = [Client(lambda m: None) for _ in range(2)]

        async def rejoin(client: Client, role: Role, name: str) -> dict[str, Any]:
            token = tokens.mint(room, role, name, consultation=room)
            while True:
                try:
                    return await hub_b.join(client, token, None, None)
                except RoomOwnedElsewhere:
                    await asyncio.sleep(0.05)

        racing = asyncio.gather(rejoin(again[0], Role.PATIENT, "Pat"), rejoin(again[1], Role.CLINICIAN, "Doc"))
        # A third joins while B, having claimed the room, is still logging the failure.
        while not (room in hub_b.leases and room in hub_b.claiming):
            await asyncio.sleep(0)
        again.append(Client(lambda m: None))
        late = rejoin(again[2], Role.CLINICIAN, "Gus")
        joined = await asyncio.wait_for(asyncio.gather(racing, late), timeout=10)
        joined = [*joined[0], joined[1]]
        assert [j["session_id"] for j in joined] == [room, room, room]
        await eventlog.flush(timeout=5)
        events = await eventlog.events(room, kinds=[str(k) for k in EventKind])
        failures = [e for e in events if e["kind"] == EventKind.NODE_FAILURE]
        assert len(failures) == 1, failures
        assert (failures[0]["payload"]["node"], failures[0]["payload"]["by_node"]) == ("node-a", "node-b")
        old = {c.connection.connection_id for c in first if c.connection is not None}
        assert set(failures[0]["payload"]["connections"]) == old
        closed = [e for e in events if e["kind"] == EventKind.DISCONNECT]
        assert {e["connection_id"] for e in closed} == old and len(closed) == 2
        assert {e["payload"]["reason"] for e in closed} == {"nodeFailure"}
        new = {j["connection_id"] for j in joined}
        connects = [i for i, e in enumerate(events)
                    if e["kind"] == EventKind.SERVER_DETECTED_CONNECT and e["connection_id"] in new]
        assert len(connects) == 3 and min(connects) > max(events.index(e) for e in (*failures, *closed))
    finally:
        for client in again if "again" in locals() else []:
            await hub_b.disconnect(client, DisconnectReason.CLIENT_DISCONNECTED)
        await dir_b.close()
        await dir_a.close()  # the room is B's by now: A's release changes nothing
        await router_a.close()
        await router_b.close()
        await eventlog.aclose()
