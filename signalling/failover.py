"""Draining a node and recording a node's failure (docs/architecture.md "Cluster").

**Draining** (``openconsult serve --drain`` then SIGTERM, or ``POST /api/admin/drain``): the node
says so in its heartbeat, so placement skips it; a join for a room it does not hold is placed
elsewhere (relayed) or, with no other node, refused with ``draining``; joins to rooms it holds go
on, so a call in progress runs to its end. :func:`drain_step` decides, from what the node still
holds, whether to wait, to exit (nothing left: exit 0) or to stop at the deadline
(``cluster.drain_timeout_s``: the remaining connections close 1001 as at a plain SIGTERM).
:class:`Drain` is the thin loop around it.

**Node failure**: a node that claims a room another node held without releasing it (the lease
expired: that node was killed, crashed or paused) logs, under the room's previous session id, a
``nodeFailure`` entry naming the lost node and a ``disconnect`` (reason ``nodeFailure``) for each
connection the log still shows open there (:func:`left_open`). With a shared event log
(PostgreSQL) that is every connection the lost node held; with SQLite per node, those this node
logged. The door of a relayed connection logs it too when it finds the owner lost; whichever of
the two marks it first in the cluster (:func:`closed_mark`) logs it, so it is closed once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from metrics.events import EventKind, now_ms
from rooms.directory import Holder, NodeId
from rooms.model import DisconnectReason, StreamDestroyedReason

logger = logging.getLogger(__name__)

#: How often a draining node looks at what it still holds.
DRAIN_POLL_S: Final = 0.5


class DrainStep(enum.Enum):
    WAIT = "wait"
    DONE = "done"  # nothing left: exit 0
    DEADLINE = "deadline"  # the drain deadline passed: stop as SIGTERM does


def drain_step(rooms: int, connections: int, now: float, deadline: float) -> DrainStep:
    """What a draining node does next, given the rooms and connections (joined here or relayed
    through here) it still holds."""
    if rooms == 0 and connections == 0:
        return DrainStep.DONE
    if now >= deadline:
        return DrainStep.DEADLINE
    return DrainStep.WAIT


@dataclass(frozen=True, slots=True)
class LeftOpen:
    """What a session's log shows still open: connections (id -> name) and streams (id -> connection)."""

    connections: dict[str, str]
    streams: dict[str, str]


def left_open(entries: Iterable[Mapping[str, Any]]) -> LeftOpen:
    """The connections that connected with no ``disconnect`` after, and the streams created with
    no ``streamDestroyed`` after, in a session's entries (in log order)."""
    connections: dict[str, str] = {}
    streams: dict[str, str] = {}
    for e in entries:
        kind, cid, sid = e.get("kind"), e.get("connection_id"), e.get("stream_id")
        payload = e.get("payload")
        if not isinstance(payload, Mapping):
            payload = {}
        if kind == EventKind.SERVER_DETECTED_CONNECT and cid:
            connections[str(cid)] = str(payload.get("name") or cid)
        elif kind == EventKind.DISCONNECT and cid:
            connections.pop(str(cid), None)
            for stream, owner in list(streams.items()):
                if owner == cid:
                    del streams[stream]
        elif kind == EventKind.STREAM_CREATED and sid and cid:
            streams[str(sid)] = str(cid)
        elif kind == EventKind.STREAM_DESTROYED and sid:
            streams.pop(str(sid), None)
    return LeftOpen(connections, {s: c for s, c in streams.items() if c in connections})


#: How long the cluster remembers that a connection was logged closed (``mark_once``).
CLOSED_MARK_S: Final = 24 * 3600.0


def closed_mark(connection_id: str) -> str:
    """The ``mark_once`` key that makes one node of the cluster log ``connection_id``'s
    ``nodeFailure`` disconnect (the door of a relayed connection and the node taking the room
    over may both see it open)."""
    return f"nodefailure:{connection_id}"


#: The kinds :func:`left_open` reads.
LEFT_OPEN_KINDS: Final = [str(k) for k in (EventKind.SERVER_DETECTED_CONNECT, EventKind.DISCONNECT,
                                           EventKind.STREAM_CREATED, EventKind.STREAM_DESTROYED)]


def failure_entries(session_id: str, previous: Holder, by_node: NodeId, found: LeftOpen,
                    ) -> list[tuple[EventKind, str, dict[str, Any]]]:
    """The entries a node logs when it takes over a room ``previous.node`` failed to release:
    (kind, text, fields) with ``connection_id``/``stream_id`` among the fields."""
    why = f"node {previous.node} stopped"
    out: list[tuple[EventKind, str, dict[str, Any]]] = [(
        EventKind.NODE_FAILURE,
        f"Server node {previous.node} holding this call stopped (last heard of {_ago(previous.renewed_ms)}); "
        f"node {by_node} took the room over",
        {"node": previous.node, "last_seen_ms": previous.renewed_ms, "by_node": by_node,
         "connections": sorted(found.connections)})]
    reason = str(StreamDestroyedReason.NODE_FAILURE)
    for stream, cid in sorted(found.streams.items()):
        out.append((EventKind.STREAM_DESTROYED, f"Stream destroyed: {found.connections.get(cid, cid)}. Reason: {reason}",
                    {"connection_id": cid, "stream_id": stream, "reason": reason, "detail": why}))
    for cid, name in sorted(found.connections.items()):
        out.append((EventKind.DISCONNECT,
                    f"Server detected disconnect: {name}. Reason: {DisconnectReason.NODE_FAILURE} ({why})",
                    {"connection_id": cid, "reason": str(DisconnectReason.NODE_FAILURE), "detail": why,
                     "node": previous.node}))
    return out


def _ago(ms: int) -> str:
    if ms <= 0:
        return "at an unknown time"
    return f"{max(0, now_ms() - ms) / 1000:.1f} s ago"


class Drain:
    """One node's drain: started once (by SIGTERM with ``--drain`` or the admin API), watched
    every :data:`DRAIN_POLL_S` until :func:`drain_step` says to exit."""

    def __init__(self, node_id: str, holding: Callable[[], tuple[int, int]], announce: Callable[[], None],
                 timeout_s: float, exit_now: Callable[[], None] | None = None) -> None:
        self.node_id = node_id
        #: (rooms, connections) this node still holds.
        self.holding = holding
        #: Mark the node draining (the hub refuses new rooms, the heartbeat says so, now).
        self.announce = announce
        self.timeout_s = timeout_s
        self.exit_now = exit_now or _graceful_exit
        self.started_ms: int | None = None
        self.deadline = 0.0
        self.deadline_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.started_ms is not None

    def status(self) -> dict[str, Any]:
        rooms, connections = self.holding()
        return {"node": self.node_id, "draining": self.active, "started_ms": self.started_ms,
                "deadline_s": self.deadline_s, "rooms": rooms, "connections": connections}

    def start(self, why: str, deadline_s: float | None = None) -> dict[str, Any]:
        """Start draining (a second start changes nothing); the status."""
        if self.active:
            return self.status()
        self.deadline_s = self.timeout_s if deadline_s is None else deadline_s
        self.started_ms = now_ms()
        self.deadline = time.monotonic() + self.deadline_s
        self.announce()
        rooms, connections = self.holding()
        logger.warning("drain: node %s draining (%s): takes no new room; waiting for %d rooms and %d connections "
                       "to end, at most %g s", self.node_id, why, rooms, connections, self.deadline_s)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="drain")
        return self.status()

    async def _watch(self) -> None:
        last: tuple[int, int] | None = None
        while True:
            rooms, connections = self.holding()
            step = drain_step(rooms, connections, time.monotonic(), self.deadline)
            if step is DrainStep.DONE:
                logger.warning("drain: node %s holds no more rooms or connections; exiting", self.node_id)
                self.exit_now()
                return
            if step is DrainStep.DEADLINE:
                logger.warning("drain: node %s reached its drain deadline (%g s) with %d rooms and %d connections; "
                               "stopping (they are closed with 1001)", self.node_id, self.deadline_s, rooms,
                               connections)
                self.exit_now()
                return
            if (rooms, connections) != last:
                logger.info("drain: node %s waiting for %d rooms and %d connections", self.node_id, rooms,
                            connections)
                last = (rooms, connections)
            await asyncio.sleep(DRAIN_POLL_S)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _graceful_exit() -> None:
    """Stop ``web.run_app`` as SIGINT does (it exits 0 after the shutdown)."""

    def stop() -> None:
        raise GracefulExit()

    asyncio.get_running_loop().call_soon(stop)


#: The node's drain (set with the room directory).
DRAIN_KEY: Final = web.AppKey("drain", Drain)


def drain_on_sigterm(app: web.Application) -> None:
    """``serve --drain``: SIGTERM starts a drain instead of stopping; a second SIGTERM stops now."""

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:
            drain = app[DRAIN_KEY]
            if drain.active:
                logger.warning("drain: second SIGTERM; stopping now")
                _graceful_exit()
            else:
                drain.start("SIGTERM")

        try:
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        except NotImplementedError:  # pragma: no cover - no signal handlers on Windows
            logger.warning("drain: SIGTERM cannot be caught here; --drain has no effect")

    app.on_startup.append(install)
