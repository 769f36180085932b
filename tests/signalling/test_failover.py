"""signalling.failover's decisions: when a draining node exits, what a failed node left open in a
session's log, and the entries the node that takes the room over writes."""

from __future__ import annotations

from typing import Any

import pytest

from metrics.events import EventKind
from rooms.directory import Holder, NodeId
from signalling.failover import DrainStep, LeftOpen, drain_step, failure_entries, left_open


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
