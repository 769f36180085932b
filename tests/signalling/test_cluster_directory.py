"""The room directory's two implementations: LocalDirectory (one node) and RedisDirectory against
a real redis-server: leases (one owner, fencing tokens, renewal, expiry, release), node loads and
placement by two random choices, notices between nodes, the shared rate limit and job locks."""

from __future__ import annotations

import asyncio
import random
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from rooms.directory import (
    DirectoryUnavailable,
    LocalDirectory,
    NodeDraining,
    NodeId,
    NodeLoad,
    Notice,
    RoomDirectory,
    RoomOwnedElsewhere,
    pick_node,
)
from rooms.chat import Retention, RetentionKind
from rooms.service import Result, WorkflowConfig, WorkflowService
from rooms.sqlite_store import SqliteStore
from signalling.cluster import RedisDirectory
from signalling.workflow import RetentionJob
from tests.helpers import wait_until
from tests.redis_server import RedisServer, redis_server, redis_srv, require_redis_server

__all__ = ["redis_srv"]

pytestmark = pytest.mark.redis


def _ns() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def pair(redis_srv: RedisServer) -> AsyncIterator[tuple[RedisDirectory, RedisDirectory, list[Notice]]]:
    """Two nodes sharing one Redis (lease 1 s); the second's received notices in a list."""
    ns = _ns()
    got: list[Notice] = []
    a = RedisDirectory(redis_srv.url, node_id=NodeId("node-a"), lease_s=1.0, namespace=ns)
    b = RedisDirectory(redis_srv.url, node_id=NodeId("node-b"), lease_s=1.0, namespace=ns)
    await a.start(lambda n: None)
    await b.start(got.append)
    yield a, b, got
    await a.close()
    await b.close()


def test_pick_node_takes_the_less_loaded_of_two() -> None:
    loads = {NodeId("a"): NodeLoad(calls=5), NodeId("b"): NodeLoad(calls=1), NodeId("c"): NodeLoad(rooms=1)}
    rng = random.Random(1)
    picks = [pick_node(loads, rng) for _ in range(200)]
    # "a" is the most loaded: it loses every pair it is drawn in, so it is never picked.
    assert NodeId("a") not in picks
    assert {NodeId("b"), NodeId("c")} == set(picks)
    assert pick_node({}) is None
    assert pick_node({NodeId("x"): NodeLoad(draining=True)}) is None
    draining = {NodeId("busy"): NodeLoad(calls=90), NodeId("idle"): NodeLoad(draining=True)}
    assert {pick_node(draining, rng) for _ in range(20)} == {"busy"}
    assert pick_node({NodeId("x"): NodeLoad()}) == "x"
    # Rooms placed since the last heartbeat count: an idle node with three pending is busier.
    even = {NodeId("a"): NodeLoad(), NodeId("b"): NodeLoad(calls=1)}
    assert pick_node(even, rng) == "a"
    assert pick_node(even, rng, pending={NodeId("a"): 2}) == "b"


async def test_rooms_placed_within_one_heartbeat_spread_over_the_nodes(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, _ = pair
    await a.heartbeat(NodeLoad())
    await b.heartbeat(NodeLoad())
    picks = [await (a if i % 2 else b).place() for i in range(10)]
    assert picks.count(NodeId("node-a")) == picks.count(NodeId("node-b")) == 5, picks
    # A heartbeat carries the placed rooms in its load and clears the node's pending count.
    await a.heartbeat(NodeLoad(rooms=5, calls=5))
    await b.heartbeat(NodeLoad())
    assert {await a.place() for _ in range(3)} == {"node-b"}


async def test_local_directory_owns_every_room_and_limits_in_a_window() -> None:
    clock = [0.0]
    d = LocalDirectory(NodeId("solo"), clock=lambda: clock[0])
    await d.start(lambda n: None)
    lease = await d.claim("r1")
    assert lease == await d.claim("r1")  # claiming again keeps the same lease
    assert await d.owner("r1") == "solo" and await d.place() == "solo"
    assert await d.release(lease) and not await d.release(lease)
    assert await d.owner("r1") is None
    assert (await d.claim("r1")).token > lease.token
    assert [await d.rate_limit("k", 2) for _ in range(3)] == [None, None, 60.0]
    clock[0] = 60.0
    assert await d.rate_limit("k", 2) is None
    async with d.job_lock("job", 10) as first:
        async with d.job_lock("job", 10) as second:
            assert first is not None and second is None
    async with d.job_lock("job", 10, release=False) as held:
        assert held is not None
    async with d.job_lock("job", 10) as again:
        assert again is None  # held for its ttl
    clock[0] = 71.0
    async with d.job_lock("job", 10) as later:
        assert later is not None and later > held


async def test_a_room_has_one_owner_and_fencing_tokens_grow(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, _ = pair
    results = await asyncio.gather(*(d.claim("room-1") for d in (a, b, a, b)), return_exceptions=True)
    winners = {r.node for r in results if not isinstance(r, BaseException)}
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, RoomOwnedElsewhere) for r in losers), results
    owner = a if winners == {"node-a"} else b
    other = b if owner is a else a
    first = await owner.claim("room-1")
    assert await other.owner("room-1") == owner.node_id
    with pytest.raises(RoomOwnedElsewhere) as err:
        await other.claim("room-1")
    assert err.value.code == "room_elsewhere" and owner.node_id in err.value.message
    # A heartbeat renews the lease to its full 1 s life.
    key = owner._key("room", "room-1")
    await wait_until(lambda: _pttl_below(owner, key, 600), timeout=5, interval=0.02, message="lease ageing")
    await owner.heartbeat(NodeLoad())
    assert await owner._redis.pttl(key) > 800
    assert await other.owner("room-1") == owner.node_id
    # Released: the other claims it with a larger token; the stale lease can neither renew nor release.
    assert await owner.release(first)
    second = await other.claim("room-1")
    assert second.node == other.node_id and second.token > first.token
    assert not await owner.release(first)
    assert await owner.owner("room-1") == other.node_id


async def test_a_dead_nodes_lease_expires_and_a_live_node_claims_it(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, _ = pair
    lease = await a.claim("room-2")
    # a stops heartbeating (as if killed): within the lease time b may claim the room.
    await wait_until(lambda: _claims(b, "room-2"), timeout=5, interval=0.1, message="lease expiry")
    taken = await b.claim("room-2")
    assert taken.token > lease.token
    # a comes back: its renewal finds the room taken and drops its lease, and the owner stays b.
    await a.heartbeat(NodeLoad())
    assert "room-2" not in a.leases and a.lost == ["room-2"]
    assert await a.owner("room-2") == b.node_id


async def test_a_claim_after_expiry_names_the_failed_holder_and_a_release_leaves_none(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, _ = pair
    first = await a.claim("room-h", "s_one")
    assert first.previous is None
    await a.heartbeat(NodeLoad())  # renews the holder record with the time of this beat
    # a dies holding the room: b's claim after the expiry names a, its session and last renewal.
    await wait_until(lambda: _claims(b, "room-h"), timeout=5, interval=0.1, message="lease expiry")
    taken = b.leases["room-h"]
    assert taken.previous is not None and (taken.previous.node, taken.previous.session) == ("node-a", "s_one")
    assert taken.previous.renewed_ms > 0
    assert await b.claim("room-h") == taken  # claiming again: the same lease
    # b releases the room properly: the next claim (by a) finds no failed holder.
    assert await b.release(taken)
    again = await a.claim("room-h", "s_two")
    assert again.previous is None and again.token > taken.token
    # A node's own lapsed lease (Redis was away) is not a failure of another node.
    await a._redis.delete(a._key("room", "room-h"))
    a.leases.clear()
    assert (await a.claim("room-h")).previous is None


async def test_a_draining_node_is_not_placed_and_a_lone_draining_node_refuses(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, _ = pair
    await a.heartbeat(NodeLoad(draining=True))
    await b.heartbeat(NodeLoad(rooms=50, calls=50))
    assert (await a.nodes())[NodeId("node-a")].draining
    assert {await a.place() for _ in range(10)} == {"node-b"}  # busier, but not draining
    await b.heartbeat(NodeLoad(draining=True))
    with pytest.raises(NodeDraining):
        await a.place()
    local = LocalDirectory(NodeId("solo"))
    await local.heartbeat(NodeLoad(draining=True))
    with pytest.raises(NodeDraining):
        await local.place()


async def test_mark_once_is_true_for_one_node_only(pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, _ = pair
    results = await asyncio.gather(*(d.mark_once("nodefailure:c_1", 60) for d in (a, b, a, b)))
    assert sorted(results) == [False, False, False, True]
    assert await b.mark_once("nodefailure:c_2", 60) and not await a.mark_once("nodefailure:c_2", 60)
    clock = [0.0]
    local = LocalDirectory(NodeId("solo"), clock=lambda: clock[0], max_keys=2)
    assert await local.mark_once("k", 10) and not await local.mark_once("k", 10)
    clock[0] = 10.0
    assert await local.mark_once("k", 10)  # the mark lapsed
    assert await local.mark_once("j", 10) and await local.mark_once("i", 10)  # bounded: lapsed ones go


async def _pttl_below(d: RedisDirectory, key: str, ms: int) -> bool:
    return 0 < int(await d._redis.pttl(key)) < ms


async def _claims(d: RedisDirectory, room: str) -> bool:
    try:
        await d.claim(room)
    except RoomOwnedElsewhere:
        return False
    return True


async def test_nodes_register_with_their_load_and_placement_prefers_the_idle(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, _ = pair
    await a.heartbeat(NodeLoad(rooms=9, calls=9, cpu=0.9))
    await b.heartbeat(NodeLoad(rooms=0, calls=0, cpu=0.0))
    nodes = await a.nodes()
    assert nodes == {"node-a": NodeLoad(9, 9, 0.9), "node-b": NodeLoad(0, 0, 0.0)}
    assert {await a.place() for _ in range(5)} == {"node-b"}
    await wait_until(lambda: _only(b, {"node-b"}), timeout=5, interval=0.1, message="node-a's heartbeat to expire")


async def _only(d: RedisDirectory, ids: set[str]) -> bool:
    await d.heartbeat(NodeLoad())
    return set(await d.nodes()) == ids


async def test_notices_reach_the_other_nodes_not_the_sender(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, got = pair
    seen_by_a: list[Notice] = []
    a._deliver = seen_by_a.append
    await a.publish(Notice("queueUpdated", {"to": {"watchers": "wr"}, "data": {"n": 1}}))
    await wait_until(lambda: len(got) == 1, timeout=10, message="notice on node b")
    assert got == [Notice("queueUpdated", {"to": {"watchers": "wr"}, "data": {"n": 1}}, NodeId("node-a"))]
    assert seen_by_a == []


async def test_rate_limit_and_job_lock_are_shared(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]]) -> None:
    a, b, _ = pair
    answers = [await d.rate_limit("walkin:x", 3) for d in (a, b, a, b)]
    assert answers[:3] == [None, None, None]
    assert answers[3] is not None and 0 < answers[3] <= 60
    async with a.job_lock("retention", 5) as held_a:
        async with b.job_lock("retention", 5) as held_b:
            assert held_a is not None and held_b is None
    async with b.job_lock("retention", 5, release=False) as held:
        assert held is not None and held > held_a
    async with a.job_lock("retention", 5) as none:
        assert none is None


async def test_redis_down_raises_a_coded_error_and_recovers() -> None:
    with redis_server() as own:
        d = RedisDirectory(own.url, node_id=NodeId("node-z"), lease_s=1.0, namespace=_ns())
        await d.start(lambda n: None)
        lease = await d.claim("room-z")
        port = own.port
        own.process.kill()
        own.process.wait()
        with pytest.raises(DirectoryUnavailable) as err:
            await d.claim("room-y")
        assert err.value.code == "cluster_unavailable" and "Redis" in err.value.message
        with pytest.raises(DirectoryUnavailable):
            await d.heartbeat(NodeLoad())
        assert d.lost == [] and d.leases == {"room-z": lease} and not getattr(d, "available")
        # Redis comes back empty on the same port: the heartbeat re-registers and re-asserts the lease.
        back = subprocess.Popen([require_redis_server(), "--port", str(port), "--save", "", "--appendonly", "no",
                                 "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_until(lambda: _beats(d), timeout=15, interval=0.2, message="Redis back")
            assert d.available and await d.owner("room-z") == "node-z" and d.leases == {"room-z": lease}
            assert set(await d.nodes()) == {"node-z"}
        finally:
            await d.close()
            back.terminate()
            back.wait(timeout=5)


async def _beats(d: RedisDirectory) -> bool:
    try:
        await d.heartbeat(NodeLoad())
    except DirectoryUnavailable:
        return False
    return True


def _implements(d: RoomDirectory) -> Callable[[], None]:
    return lambda: None


def test_both_implement_the_interface(redis_srv: RedisServer) -> None:
    _implements(LocalDirectory())
    _implements(RedisDirectory(redis_srv.url))


async def test_the_retention_sweep_runs_once_per_period_per_cluster(
        pair: tuple[RedisDirectory, RedisDirectory, list[Notice]], tmp_path: Path) -> None:
    a, b, _ = pair
    store = SqliteStore(tmp_path / "workflow.sqlite3")
    svc = WorkflowService(store, WorkflowConfig(retention=Retention(RetentionKind.DELETE_AFTER_DAYS, 30)))

    async def record(result: Result[int]) -> object:
        return result.value

    def slot(d: RedisDirectory) -> Callable[[], AbstractAsyncContextManager[int | None]]:
        return lambda: d.job_lock("retention", 3600, release=False)

    jobs = [RetentionJob(svc, record, 3600, lock=slot(d)) for d in (a, b, a, b)]
    try:
        await asyncio.gather(*(job._scheduled_run() for job in jobs))
        assert sorted(len(job.runs) for job in jobs) == [0, 0, 0, 1]
        assert all(run.ok for job in jobs for run in job.runs)
    finally:
        await store.close()
