"""The room directory: which node holds which room, and what every node must hear.

One interface, two implementations. :class:`LocalDirectory` is one node alone (no Redis: every
room is ours, every notice is delivered here, rate limits and job locks are in memory); the Redis
one (``signalling.cluster.RedisDirectory``) is used when ``redis_url`` is set. The rest of the code
asks a :class:`RoomDirectory`, never Redis.

The model:

* **Nodes.** Each node has a :data:`NodeId` and sends a heartbeat carrying its :class:`NodeLoad`
  (rooms, calls, CPU); a node whose heartbeat is older than the lease time is gone.
* **Rooms.** A room is owned by exactly one node through a :class:`RoomLease`: an atomic claim
  (nobody else holds it), renewed while the room lives, released when it closes. Every claim
  gets a fencing token, strictly increasing per room, so a node that lost its lease (paused, cut
  off) and comes back cannot act on a newer owner's room: renew and release check the token.
* **Placement.** A new room goes to a lightly loaded node: :func:`pick_node` draws two live nodes
  at random and takes the less loaded (the power of two choices), counting the rooms placed on
  each since its last heartbeat (its load does not show them yet). A *draining* node (its heartbeat
  says so) takes no new room: placement skips it, and a join for a new room it receives is relayed
  to the node placement picks (or refused with :class:`NodeDraining` when no other node lives).
* **Holders.** A claim also records the room's *holder* (node, session id, last renewal), kept
  until the room is released. A claim that finds a holder but no lease knows the previous node
  stopped holding the room without releasing it (killed, crashed, paused past its lease): the
  lease carries that :class:`Holder` as ``previous`` so the new owner can log the node failure.
* **Notices.** What a node must tell clients it may not hold (queue updates, positions, admitted,
  chat, announcements) is a :class:`Notice`: the node delivers it to the sockets it holds, then
  publishes it to the other nodes, which do the same (so one node alone behaves as before).
* **Relay.** :meth:`RoomDirectory.send` carries notices to one node: a client that reached a
  node other than its room's owner has its frames relayed to the owner and the owner's replies
  and events back (``relay.*`` notices, see ``signalling.ws``).
* **Shared limits and jobs.** :meth:`RoomDirectory.rate_limit` counts in a window shared by all
  nodes; :meth:`RoomDirectory.job_lock` lets one node of the cluster run a scheduled job.

A directory that cannot reach its store raises :class:`DirectoryUnavailable` (code
``cluster_unavailable``); media in progress never waits on it.
"""

from __future__ import annotations

import collections
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, NewType, Protocol

from rooms.errors import RoomsError

NodeId = NewType("NodeId", str)


def new_node_id() -> NodeId:
    return NodeId("node_" + uuid.uuid4().hex[:12])


class DirectoryUnavailable(RoomsError):
    """The cluster's shared store (Redis) does not answer: new rooms and joins that need it fail."""

    code: ClassVar[str] = "cluster_unavailable"


class NodeDraining(RoomsError):
    """This node is draining (it takes no new room) and no other node can take the room."""

    code: ClassVar[str] = "draining"


class RoomOwnedElsewhere(RoomsError):
    """The room is held by another live node."""

    code: ClassVar[str] = "room_elsewhere"

    def __init__(self, room: str, owner: NodeId) -> None:
        self.room = room
        self.owner = owner
        super().__init__(f'Room "{room}" is held by node "{owner}"')


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """What a heartbeat carries."""

    rooms: int = 0
    calls: int = 0
    cpu: float = 0.0  # share of one core used by this process since the last beat, 0..n
    #: The node is draining: it finishes its calls and takes no new room.
    draining: bool = False

    def weight(self) -> float:
        """One number to compare nodes by: calls weigh most, then rooms, then CPU."""
        return self.calls * 4 + self.rooms + self.cpu * 10

    def to_json(self) -> dict[str, Any]:
        return {"rooms": self.rooms, "calls": self.calls, "cpu": self.cpu, "draining": self.draining}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeLoad:
        return cls(int(data.get("rooms", 0)), int(data.get("calls", 0)), float(data.get("cpu", 0.0)),
                   data.get("draining") is True)


@dataclass(frozen=True, slots=True)
class Holder:
    """Who held a room last: ``node``, the room's ``session`` id there (empty if not known yet)
    and when the node last renewed the lease (UTC ms)."""

    node: NodeId
    session: str = ""
    renewed_ms: int = 0


@dataclass(frozen=True, slots=True)
class RoomLease:
    """``node`` holds ``room`` with fencing token ``token`` (strictly increasing per room)."""

    room: str
    node: NodeId
    token: int
    #: The node that held the room before without releasing it (it failed), if any; only the
    #: claim that took the room over carries it (not part of the lease's identity).
    previous: Holder | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Notice:
    """Something every node must deliver to the sockets it holds: ``kind`` names the recipients'
    selector (the workflow resolves it), ``data`` the message. ``origin`` is the publishing node."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    origin: NodeId = NodeId("")


#: What a room placed on a node since its last heartbeat weighs (as a call: it is about to be one).
PENDING_WEIGHT = 4


def pick_node(loads: Mapping[NodeId, NodeLoad], rng: random.Random | None = None,
              pending: Mapping[NodeId, int] | None = None) -> NodeId | None:
    """Two random choices among the nodes not draining, least loaded wins (ties: the smaller id).
    ``pending``: rooms placed on each node since its last heartbeat, which its load does not show
    yet (without them, every room placed within one heartbeat would go to the same node). None
    without such a node."""
    nodes = sorted(n for n, load in loads.items() if not load.draining)
    if not nodes:
        return None
    r = rng or random
    extra = pending or {}
    a, b = (nodes[0], nodes[0]) if len(nodes) == 1 else tuple(r.sample(nodes, 2))
    return min((a, b), key=lambda n: (loads[n].weight() + PENDING_WEIGHT * extra.get(n, 0), n))


class RoomDirectory(Protocol):
    node_id: NodeId
    #: Seconds a lease (or a heartbeat) lives without renewal.
    lease_s: float

    async def start(self, deliver: Callable[[Notice], None]) -> None:
        """Register this node; ``deliver`` gets the other nodes' notices."""

    async def close(self) -> None:
        """Release this node's leases and deregister; idempotent."""

    async def heartbeat(self, load: NodeLoad) -> None:
        """Tell the cluster this node lives and how loaded it is; renews every lease it holds."""

    async def nodes(self) -> dict[NodeId, NodeLoad]:
        """Live nodes and their last load."""

    async def claim(self, room: str, session: str = "") -> RoomLease:
        """Own ``room`` (or keep owning it) for session ``session``: the lease (with the failed
        previous holder, if any), or :class:`RoomOwnedElsewhere`."""

    def held(self) -> set[str]:
        """The rooms whose lease this node holds (as of its last heartbeat)."""

    async def owner(self, room: str) -> NodeId | None:
        """The node holding ``room``, or None."""

    async def release(self, lease: RoomLease) -> bool:
        """Give the room up; False if the lease was no longer ours (expired, claimed since)."""

    async def place(self) -> NodeId:
        """The node a new room should go to (two random choices over live nodes not draining);
        :class:`NodeDraining` if that is none but this node, and this node drains."""

    async def publish(self, notice: Notice) -> None:
        """Send ``notice`` to every other node (the caller delivered it here)."""

    async def send(self, node: NodeId, notice: Notice) -> None:
        """Send ``notice`` to node ``node`` only (a relayed client's frames, both ways)."""

    async def rate_limit(self, key: str, per_minute: int) -> float | None:
        """Count one event for ``key`` in a 60 s sliding window shared by the cluster: None if
        allowed, else the seconds until the next would be."""

    async def mark_once(self, key: str, ttl_s: float) -> bool:
        """True for the first node to mark ``key`` within ``ttl_s`` seconds, False for every later
        mark: something the cluster must do once (log a failed node's connection as closed)."""

    def job_lock(self, name: str, ttl_s: float, *, release: bool = True) -> AbstractAsyncContextManager[int | None]:
        """Hold the cluster-wide lock of job ``name`` for at most ``ttl_s``: yields its fencing
        token (larger at every take), or None when another node holds it (skip this run). With
        ``release=False`` the lock stays until ``ttl_s`` ends: one run per period per cluster."""


class LocalDirectory:
    """One node, no Redis: every room is this node's, there is nobody else to tell."""

    WINDOW_S: ClassVar[float] = 60.0

    def __init__(self, node_id: NodeId | None = None, *, lease_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self.node_id = node_id or new_node_id()
        self.lease_s = lease_s
        self.clock = clock
        self.max_keys = max_keys
        self.load = NodeLoad()
        self.leases: dict[str, RoomLease] = {}
        self._tokens = itertools.count(1)
        self._seen: dict[str, collections.deque[float]] = {}
        self._jobs: dict[str, tuple[int, float]] = {}  # name -> (token, held until)
        self._marks: dict[str, float] = {}  # key -> marked until

    async def start(self, deliver: Callable[[Notice], None]) -> None:
        return None

    async def close(self) -> None:
        self.leases.clear()

    async def heartbeat(self, load: NodeLoad) -> None:
        self.load = load

    async def nodes(self) -> dict[NodeId, NodeLoad]:
        return {self.node_id: self.load}

    async def claim(self, room: str, session: str = "") -> RoomLease:
        lease = self.leases.get(room)
        if lease is None:
            lease = self.leases[room] = RoomLease(room, self.node_id, next(self._tokens))
        return lease

    def held(self) -> set[str]:
        return set(self.leases)

    async def owner(self, room: str) -> NodeId | None:
        return self.node_id if room in self.leases else None

    async def release(self, lease: RoomLease) -> bool:
        if self.leases.get(lease.room) != lease:
            return False
        del self.leases[lease.room]
        return True

    async def place(self) -> NodeId:
        if self.load.draining:
            raise NodeDraining("this node is draining (it finishes its calls and takes no new room) and there is "
                               "no other node (no redis_url)")
        return self.node_id

    async def publish(self, notice: Notice) -> None:
        return None

    async def send(self, node: NodeId, notice: Notice) -> None:
        raise DirectoryUnavailable(f'node "{node}" is not this node and there is no cluster (no redis_url)')

    async def rate_limit(self, key: str, per_minute: int) -> float | None:
        now = self.clock()
        times = self._seen.get(key)
        if times is None:
            if len(self._seen) >= self.max_keys:
                for k in [k for k, t in self._seen.items() if not t or t[-1] <= now - self.WINDOW_S]:
                    del self._seen[k]
            times = self._seen[key] = collections.deque()
        while times and times[0] <= now - self.WINDOW_S:
            times.popleft()
        if len(times) >= per_minute:
            return max(0.0, times[0] + self.WINDOW_S - now)
        times.append(now)
        return None

    async def mark_once(self, key: str, ttl_s: float) -> bool:
        now = self.clock()
        if len(self._marks) >= self.max_keys:
            for k in [k for k, until in self._marks.items() if until <= now]:
                del self._marks[k]
        if self._marks.get(key, 0.0) > now:
            return False
        self._marks[key] = now + ttl_s
        return True

    def job_lock(self, name: str, ttl_s: float, *, release: bool = True) -> AbstractAsyncContextManager[int | None]:
        return self._job_lock(name, ttl_s, release)

    @asynccontextmanager
    async def _job_lock(self, name: str, ttl_s: float, release: bool) -> AsyncIterator[int | None]:
        now = self.clock()
        held = self._jobs.get(name)
        if held is not None and held[1] > now:
            yield None
            return
        token = next(self._tokens)
        self._jobs[name] = (token, now + ttl_s)
        try:
            yield token
        finally:
            if release and self._jobs.get(name, (0, 0.0))[0] == token:
                del self._jobs[name]

