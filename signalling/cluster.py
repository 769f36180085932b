"""The Redis room directory: several nodes sharing one Redis (``redis_url`` set).

Implements ``rooms.directory.RoomDirectory`` (read its header for the model). Keys, under the
namespace (``openconsult:`` by default):

* ``node:<id>`` — a node's last load (JSON), expiring after ``lease_s``; ``nodes`` the set of
  node ids ever seen (pruned of those whose key expired).
* ``room:<room>`` — ``<node>|<token>``, the room's lease: claimed with ``SET NX PX`` (atomic:
  one winner), renewed and released only by a caller that presents the same value (Lua compare
  then act), so a node that lost its lease cannot touch the next owner's. ``fence:<room>`` is
  the room's fencing counter (``INCR``: every claim gets a larger token). ``holder:<room>`` —
  ``<node>|<token>|<renewed ms>|<session>``, who holds the room, written at claim and renewal and
  deleted at release (it lives a day): a claim that finds it with no lease returns it as the
  lease's ``previous`` (that node stopped holding the room without releasing it).
* ``placed:<node>`` — rooms placed on a node since its last heartbeat (``INCR`` by the placing
  node, deleted by the node's heartbeat, expiring after ``lease_s``): placement counts them, so
  rooms created within one heartbeat spread instead of all going to the node that looked idle.
* ``rate:<key>`` — a sorted set of event times (a 60 s sliding window, Lua check-and-add).
* ``job:<name>`` / ``jobfence:<name>`` — a scheduled job's lock and fencing counter.
* ``once:<key>`` — ``SET NX PX``: the first node to mark ``key`` does the thing once for the
  cluster (``once:nodefailure:<connection>``: one ``nodeFailure`` disconnect per connection).
* channel ``notices`` — pub/sub of :class:`~rooms.directory.Notice` (JSON); each node skips its
  own (it delivered them locally before publishing). Channel ``inbox:<node>`` — notices for
  one node (relayed signalling).

Every Redis failure becomes ``DirectoryUnavailable`` (code ``cluster_unavailable``). Heartbeats
keep running while Redis is away and re-register the node and re-assert its leases (same value,
so only if nobody claimed the room meanwhile) when it answers again. Media never waits on Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from metrics import prometheus as prom
from rooms.directory import (
    DirectoryUnavailable,
    Holder,
    NodeDraining,
    NodeId,
    NodeLoad,
    Notice,
    RoomLease,
    RoomDirectory,
    RoomOwnedElsewhere,
    new_node_id,
    pick_node,
)

logger = logging.getLogger(__name__)

#: Claim: SET NX PX with a fresh fencing token and record the holder; if the room is already
#: ours, renew it. Returns {owner, token, previous holder} (token 0 when another node holds it;
#: previous holder '' unless the room was vacant but its last holder never released it).
_CLAIM_LUA: Final = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local node, tok = string.match(cur, '^(.*)|(%d+)$')
  if node == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {node, tonumber(tok), ''}
  end
  return {node or '', 0, ''}
end
local prev = redis.call('GET', KEYS[3]) or ''
local tok = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. tok, 'NX', 'PX', ARGV[2])
redis.call('SET', KEYS[3], ARGV[1] .. '|' .. tok .. '|' .. ARGV[3] .. '|' .. ARGV[4], 'PX', ARGV[5])
return {ARGV[1], tok, prev}
"""

#: Renew (or re-assert after an outage) a lease only if it is still exactly ours or vacant and
#: our token is still the latest, and refresh its holder record: 1 renewed, 0 lost.
_RENEW_LUA: Final = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif not cur and tonumber(redis.call('GET', KEYS[2]) or '0') <= tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
else
  return 0
end
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
return 1
"""

#: Release a room: delete its lease if it holds the caller's value, and its holder record if it
#: is the caller's (even once the lease expired: the room was given up, not lost).
_RELEASE_ROOM_LUA: Final = """
local h = redis.call('GET', KEYS[2])
if h and string.sub(h, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  redis.call('DEL', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: How long a holder record outlives its last renewal: a room nobody rejoins within it is
#: forgotten without a node-failure entry.
HOLDER_TTL_MS: Final = 24 * 3600 * 1000

#: Delete a key only if it holds the caller's value.
_RELEASE_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Sliding window: drop times older than the window, then add one if under the limit.
#: Returns -1 when allowed, else the ms until the oldest leaves the window.
_RATE_LUA: Final = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(0, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return -1
"""

WINDOW_MS: Final = 60_000


def parse_holder(raw: object) -> Holder | None:
    """A holder record (``<node>|<token>|<renewed ms>|<session>``), None if empty or malformed."""
    text = _text(raw) if raw else ""
    node, token, renewed, session = (text.split("|", 3) + ["", "", "", ""])[:4]
    if not node or not token.isdigit() or not renewed.isdigit():
        return None
    return Holder(NodeId(node), session, int(renewed))

#: The room directory: ``LocalDirectory`` for one node, :class:`RedisDirectory` with ``redis_url``.
DIRECTORY_KEY: Final = web.AppKey("directory", RoomDirectory)
#: Who hears other nodes' notices (the workflow and the relay add themselves).
NOTICE_SINKS_KEY: Final = web.AppKey("notice_sinks", list[Callable[[Notice], None]])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisDirectory:
    """``RedisDirectory("redis://127.0.0.1:6379/0", lease_s=10)``: see the module header."""

    def __init__(self, url: str, *, node_id: NodeId | None = None, lease_s: float = 10.0,
                 namespace: str = "openconsult:", address: str = "") -> None:
        self.node_id = node_id or new_node_id()
        self.lease_s = lease_s
        self.ns = namespace
        #: Where clients may reach this node (``host:port``), shown with its load.
        self.address = address
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, decode_responses=False, socket_timeout=max(1.0, lease_s / 3), socket_connect_timeout=2.0)
        self._claim = self._redis.register_script(_CLAIM_LUA)
        self._renew = self._redis.register_script(_RENEW_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)
        self._release_room = self._redis.register_script(_RELEASE_ROOM_LUA)
        self._rate = self._redis.register_script(_RATE_LUA)
        #: Leases this node holds, by room.
        self.leases: dict[str, RoomLease] = {}
        #: Rooms whose lease this node found taken by another at renewal (newest last, bounded).
        self.lost: list[str] = []
        #: The session id each held room runs under here (for its holder record).
        self.sessions: dict[str, str] = {}
        #: This node's last heartbeat said it drains.
        self.draining = False
        self._deliver: Callable[[Notice], None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self.available = True

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    def _key(self, *parts: str) -> str:
        return self.ns + ":".join(parts)

    async def start(self, deliver: Callable[[Notice], None]) -> None:
        self._deliver = deliver
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._key("notices"), self._key("inbox", self.node_id))
        except (RedisError, OSError) as exc:
            await pubsub.aclose()
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        self._listener = asyncio.get_running_loop().create_task(self._listen(pubsub), name="cluster-notices")
        await self.heartbeat(NodeLoad())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except asyncio.CancelledError:
                pass
        try:
            for lease in list(self.leases.values()):
                await self.release(lease)
            await self._redis.delete(self._key("node", self.node_id))
            await self._redis.srem(self._key("nodes"), self.node_id)
        except (RedisError, OSError, DirectoryUnavailable) as exc:
            logger.warning("cluster: could not deregister node %s: %s", self.node_id, exc)
        await self._redis.aclose()

    async def _listen(self, pubsub: Any) -> None:
        """Deliver other nodes' notices; resubscribe (backing off) while Redis is away."""
        channels = (self._key("notices"), self._key("inbox", self.node_id))
        lost = False
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                        await pubsub.subscribe(*channels)
                        if lost:
                            logger.info("cluster: notice channel back")
                        lost = False
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._on_message(message["data"])
                except (RedisError, OSError) as exc:
                    if not lost:
                        logger.warning("cluster: notice channel lost (%s); resubscribing", exc)
                    lost = True
                # listen() ended or failed: a fresh subscription after a pause (never a busy loop)
                if pubsub is not None:
                    await pubsub.aclose()
                pubsub = None
                await asyncio.sleep(min(1.0, self.lease_s / 10))
        finally:
            if pubsub is not None:
                await pubsub.aclose()

    def _on_message(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
            notice = Notice(str(data["kind"]), dict(data["data"]), NodeId(str(data["origin"])))
        except (ValueError, KeyError, TypeError):
            logger.warning("cluster: a malformed notice was ignored (%d bytes)", len(raw))
            return
        if notice.origin == self.node_id or self._deliver is None:
            return
        try:
            self._deliver(notice)
        except Exception:  # a listener's bug must not stop the channel
            logger.exception("cluster: delivering notice %s failed", notice.kind)

    async def heartbeat(self, load: NodeLoad) -> None:
        """Register with ``load`` and renew (or re-assert) every lease; a lease found taken by
        another node is dropped (recorded in :attr:`lost`)."""
        body = json.dumps({**load.to_json(), "address": self.address, "at": time.time()})
        self.draining = load.draining
        now_ms = int(time.time() * 1000)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self._key("node", self.node_id), body, px=self._lease_ms)
                pipe.sadd(self._key("nodes"), self.node_id)
                # The rooms placed here so far are in ``load`` now.
                pipe.delete(self._key("placed", self.node_id))
                await pipe.execute()
            for room, lease in list(self.leases.items()):
                holder = f"{lease.node}|{lease.token}|{now_ms}|{self.sessions.get(room, '')}"
                ok = await self._renew(keys=[self._key("room", room), self._key("fence", room),
                                             self._key("holder", room)],
                                       args=[f"{lease.node}|{lease.token}", self._lease_ms, lease.token, holder,
                                             HOLDER_TTL_MS])
                if not ok and self.leases.get(room) == lease:
                    del self.leases[room]
                    self.sessions.pop(room, None)
                    self.lost = [*self.lost[-99:], room]
                    prom.CLUSTER_LEASES_LOST.inc()
                    logger.warning("cluster: node %s lost the lease of room %s (token %d)", self.node_id, room,
                                   lease.token)
        except (RedisError, OSError) as exc:
            prom.CLUSTER_HEARTBEAT_FAILURES.inc()
            if self.available:
                logger.warning("cluster: Redis unavailable (%s); media goes on, new rooms wait", exc)
            self.available = False
            prom.CLUSTER_REDIS_UP.set(0)
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        if not self.available:
            logger.info("cluster: Redis is back; node %s registered, %d leases re-asserted", self.node_id,
                        len(self.leases))
        self.available = True
        prom.CLUSTER_REDIS_UP.set(1)

    async def nodes(self) -> dict[NodeId, NodeLoad]:
        try:
            ids = sorted(_text(m) for m in await self._redis.smembers(self._key("nodes")))
            if not ids:
                return {}
            bodies = await self._redis.mget([self._key("node", i) for i in ids])
            gone = [i for i, b in zip(ids, bodies) if b is None]
            if gone:
                await self._redis.srem(self._key("nodes"), *gone)
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        return {NodeId(i): NodeLoad.from_json(json.loads(b)) for i, b in zip(ids, bodies) if b is not None}

    async def claim(self, room: str, session: str = "") -> RoomLease:
        try:
            owner, token, prev = await self._claim(
                keys=[self._key("room", room), self._key("fence", room), self._key("holder", room)],
                args=[self.node_id, self._lease_ms, int(time.time() * 1000), session, HOLDER_TTL_MS])
        except (RedisError, OSError) as exc:
            prom.CLUSTER_CLAIMS.labels(result=prom.ClaimResult.ERROR).inc()
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        owner_id = NodeId(_text(owner))
        if owner_id != self.node_id or not token:
            prom.CLUSTER_CLAIMS.labels(result=prom.ClaimResult.ELSEWHERE).inc()
            raise RoomOwnedElsewhere(room, owner_id)
        previous = parse_holder(prev)
        if previous is not None and previous.node == self.node_id:
            previous = None  # this node's own lease lapsed (Redis was away): it did not fail
        held = self.leases.get(room)
        if held is not None and held.token == int(token) and (previous is None or held.previous is not None):
            return held  # claimed again (two claims racing: the one that took the room carries previous)
        if previous is not None:
            logger.warning("cluster: node %s claimed room %s, which node %s held without releasing it (last "
                           "renewed %d ms ago): that node failed", self.node_id, room, previous.node,
                           int(time.time() * 1000) - previous.renewed_ms)
        self.sessions[room] = session
        lease = self.leases[room] = RoomLease(room, self.node_id, int(token), previous)
        prom.CLUSTER_CLAIMS.labels(result=prom.ClaimResult.WON).inc()
        return lease

    def held(self) -> set[str]:
        return set(self.leases)

    async def owner(self, room: str) -> NodeId | None:
        try:
            value = await self._redis.get(self._key("room", room))
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        return None if value is None else NodeId(_text(value).rpartition("|")[0])

    async def release(self, lease: RoomLease) -> bool:
        if self.leases.get(lease.room) == lease:
            del self.leases[lease.room]
            self.sessions.pop(lease.room, None)
        try:
            return bool(await self._release_room(keys=[self._key("room", lease.room), self._key("holder", lease.room)],
                                                 args=[f"{lease.node}|{lease.token}"]))
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None

    async def place(self) -> NodeId:
        loads = await self.nodes()
        ids = sorted(loads)
        try:
            counts = await self._redis.mget([self._key("placed", i) for i in ids]) if ids else []
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        pending = {NodeId(i): int(c) for i, c in zip(ids, counts) if c is not None}
        picked = pick_node(loads, pending=pending)
        if picked is not None:
            # Counted until the node's next heartbeat (which carries the room in its load).
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.incr(self._key("placed", picked))
                    pipe.pexpire(self._key("placed", picked), self._lease_ms)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        if picked is None and self.draining:
            raise NodeDraining("this node is draining (it finishes its calls and takes no new room) and no other "
                               "node is live to take the room")
        return picked or self.node_id

    async def publish(self, notice: Notice) -> None:
        body = json.dumps({"kind": notice.kind, "data": notice.data, "origin": self.node_id})
        try:
            await self._redis.publish(self._key("notices"), body)
        except (RedisError, OSError) as exc:
            # Local sockets were told; the others miss this one (their next update carries it).
            logger.warning("cluster: notice %s not published (%s)", notice.kind, exc)

    async def send(self, node: NodeId, notice: Notice) -> None:
        body = json.dumps({"kind": notice.kind, "data": notice.data, "origin": self.node_id})
        try:
            await self._redis.publish(self._key("inbox", node), body)
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None

    async def rate_limit(self, key: str, per_minute: int) -> float | None:
        try:
            wait_ms = await self._rate(keys=[self._key("rate", key)],
                                       args=[int(time.time() * 1000), WINDOW_MS, per_minute, uuid.uuid4().hex])
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        return None if int(wait_ms) < 0 else int(wait_ms) / 1000

    async def mark_once(self, key: str, ttl_s: float) -> bool:
        try:
            return bool(await self._redis.set(self._key("once", key), self.node_id, nx=True, px=int(ttl_s * 1000)))
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None

    def job_lock(self, name: str, ttl_s: float, *, release: bool = True) -> AbstractAsyncContextManager[int | None]:
        return self._job_lock(name, ttl_s, release)

    @asynccontextmanager
    async def _job_lock(self, name: str, ttl_s: float, release: bool) -> AsyncIterator[int | None]:
        key = self._key("job", name)
        try:
            token = int(await self._redis.incr(self._key("jobfence", name)))
            value = f"{self.node_id}|{token}"
            got = await self._redis.set(key, value, nx=True, px=int(ttl_s * 1000))
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"Redis does not answer: {exc}") from None
        if not got:
            yield None
            return
        try:
            yield token
        finally:
            if release:
                await self._unlock(name, key, value, ttl_s)

    async def _unlock(self, name: str, key: str, value: str, ttl_s: float) -> None:
        try:
            await self._release(keys=[key], args=[value])
        except (RedisError, OSError) as exc:
            logger.warning("cluster: job lock %s not released (%s); it expires in %.0f s", name, exc, ttl_s)
