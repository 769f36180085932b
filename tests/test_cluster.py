"""Three ``openconsult serve`` nodes sharing one real redis-server (each its own data dir and
port): workflow pushes reach the node holding the recipient's socket, one patient admitted from
two nodes at once has one winner, a room's media lives on one node only, the walk-in limit and
the node registry are cluster-wide."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from loadtest.client import RequestFailed, SignallingClient
from rooms.model import Role
from signalling.auth import TokenAuthority
from tests.call_helpers import Participant
from tests.postgres_server import PostgresServer, pg_srv
from tests.redis_server import RedisServer, redis_server, require_redis_server
from tests.server import ServerProcess, start_server
from tests.helpers import free_port, wait_until
from tests.workflow.helpers import Clinic, now_ms, wait_event

SECRET = "cluster-test-secret-0123456789abcdef"

__all__ = ["pg_srv"]

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@asynccontextmanager
async def _cluster(tmp_path: Path, redis: RedisServer, extra: str = "") -> AsyncIterator[list[Clinic]]:
    ns = f"oc{tmp_path.name[-12:]}:".replace("-", "")
    config = (f'[auth]\nsecret = "{SECRET}"\n'
              f'[cluster]\nlease_s = 3.0\nnamespace = "{ns}"\n'
              '[workflow]\nwalk_in_per_link_per_min = 3\n' + extra)
    servers: list[ServerProcess] = []
    try:
        for name in "abc":
            servers.append(start_server(tmp_path / name, config, env={"OPENCONSULT_REDIS_URL": redis.url}))
        clinics = [Clinic(s, TokenAuthority("HS256", SECRET, SECRET, leeway_s=30), aiohttp.ClientSession())
                   for s in servers]
        admin = clinics[0].staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")
        await clinics[0].waiting_room(admin, "wr-a", "Cardiology A", "cardio")
        yield clinics
        for c in clinics:
            await c.close()
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGCONT)  # a test may have paused one
            s.stop()


@pytest.fixture
async def nodes(tmp_path: Path, redis: RedisServer) -> AsyncIterator[list[Clinic]]:
    async with _cluster(tmp_path, redis) as clinics:
        yield clinics


@pytest.fixture
async def pg_nodes(tmp_path: Path, redis: RedisServer, pg_srv: PostgresServer) -> AsyncIterator[list[Clinic]]:
    """Three nodes sharing one Redis and one PostgreSQL event log (a session written from several
    nodes reads complete from any)."""
    async with _cluster(tmp_path, redis, f'[eventlog]\nurl = "{pg_srv.new_database()}"\n') as clinics:
        yield clinics


def _admin(c: Clinic) -> str:
    return c.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")


def _doctor(c: Clinic, user: str = "dr-who") -> str:
    return c.staff(Role.CLINICIAN, user, "cardio")


async def _book(c: Clinic, patient: str) -> dict[str, object]:
    return await c.book(_admin(c), department="cardio", room_id="wr-a", patient=patient, clinician="dr-who",
                        appointment_ms=now_ms())


async def test_a_desk_on_one_node_sees_queue_and_chat_from_patients_on_two_others(nodes: list[Clinic]) -> None:
    a, b, c = nodes
    desk = await c.connect(_doctor(c))
    watched = await desk.request("queue.watch", room_id="wr-a")
    assert watched["queue"] == []
    booking_1, booking_2 = await _book(a, "p-one"), await _book(b, "p-two")
    sid_1, sid_2 = (str(bk["consultation"]["session_id"]) for bk in (booking_1, booking_2))  # type: ignore[index]
    patient_1 = await a.connect(str(booking_1["patient_token"]))
    entered_1 = await patient_1.request("waiting_room.enter")
    await wait_event(desk, "queueUpdated", lambda d: [q["session_id"] for q in d["queue"]] == [sid_1])
    patient_2 = await b.connect(str(booking_2["patient_token"]))
    await patient_2.request("waiting_room.enter")
    await wait_event(desk, "queueUpdated", lambda d: [q["session_id"] for q in d["queue"]] == [sid_1, sid_2])
    # The patient on node B is told their place, computed on node A when patient 1 left the queue.
    await patient_1.request("waiting_room.leave")
    await wait_event(patient_2, "positionChanged", lambda d: d == {"session_id": sid_2, "room_id": "wr-a",
                                                                   "position": 1})
    await wait_event(desk, "queueUpdated", lambda d: [q["session_id"] for q in d["queue"]] == [sid_2])
    # Chat: patient on B -> clinician on C, and back; an announcement from C reaches B's patient.
    channel = f"consultation:{sid_2}"
    sent = await patient_2.request("chat.send", channel_id=channel, text="Hello from node B")
    got = await desk.wait_event("chatMessage", message__message_id=sent["message"]["message_id"])
    assert got["data"]["message"]["text"] == "Hello from node B"
    reply = await desk.request("chat.send", channel_id=channel, text="Hi from node C")
    await patient_2.wait_event("chatMessage", message__message_id=reply["message"]["message_id"])
    ann = await desk.request("announcement.post", room_id="wr-a", text="Running late", expires_in_s=600)
    ann_id = ann["announcement"]["announcement_id"]
    await wait_event(patient_2, "announcement", lambda d: d["announcement"]["announcement_id"] == ann_id)
    assert entered_1["channel_id"] == f"consultation:{sid_1}"
    for client in (desk, patient_1, patient_2):
        await client.close()


async def test_concurrent_admits_from_two_nodes_have_one_winner(nodes: list[Clinic]) -> None:
    a, b, c = nodes
    booking = await _book(c, "p-race")
    sid = str(booking["consultation"]["session_id"])  # type: ignore[index]
    patient = await c.connect(str(booking["patient_token"]))
    await patient.request("waiting_room.enter")
    desk_a = await a.connect(_doctor(a, "dr-who"))
    desk_b = await b.connect(_doctor(b, "dr-who"))

    async def admit(desk: object) -> str:
        try:
            await desk.request("consultation.admit", session_id=sid)  # type: ignore[attr-defined]
        except RequestFailed as exc:
            return exc.code
        return "ok"

    outcomes = sorted(await asyncio.gather(admit(desk_a), admit(desk_b)))
    assert outcomes[1] == "ok" and outcomes[0] in ("invalid_state", "conflict"), outcomes
    # The patient, on node C, hears of it once.
    await wait_event(patient, "admitted", lambda d: d == {"session_id": sid, "room": sid})
    assert [e["event"] for e in patient.events].count("admitted") == 1
    for client in (patient, desk_a, desk_b):
        await client.close()


async def test_a_patient_on_one_node_and_a_clinician_on_another_decode_each_other(
        nodes: list[Clinic], redis: RedisServer) -> None:
    a, b, c = nodes
    p = Participant(a.server.ws_url, "Pat")
    d = Participant(b.server.ws_url, "Doc")
    try:
        joined_p = await p.join(a.tokens, "room-one", Role.PATIENT)
        joined_d = await d.join(b.tokens, "room-one", Role.CLINICIAN)
        assert joined_p["session_id"] == joined_d["session_id"]  # one call, not two
        assert [x["name"] for x in joined_d["connections"]] == ["Pat"]
        stream_p, stream_d = await p.publish(), await d.publish()
        await p.client.wait_event("streamCreated", stream__stream_id=stream_d)
        await d.client.wait_event("streamCreated", stream__stream_id=stream_p)
        sub_d, sub_p = await d.subscribe(stream_p), await p.subscribe(stream_d)
        await wait_until(lambda: len(sub_d.received.frames) > 5 and len(sub_p.received.frames) > 5,
                         timeout=60, message="video both ways across nodes")
        # The room has one owner in Redis, and it is one of the three nodes.
        owner = await _owner(redis, "room-one")
        assert owner is not None
        logs = [s.server.log_text() for s in (a, b, c)]
        assert sum(f"cluster: node {owner} " in text for text in logs) == 1, owner
    finally:
        await p.close()
        await d.close()


async def _owner(redis: RedisServer, room: str) -> str | None:
    """The node holding ``room``'s lease (there is exactly one lease key for it)."""
    r = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        keys = [k for k in await r.keys(f"*room:{room}")]
        assert len(keys) == 1, keys
        value = await r.get(keys[0])
        return None if value is None else str(value).rpartition("|")[0]
    finally:
        await r.aclose()


async def test_walk_in_limit_is_counted_across_nodes(nodes: list[Clinic]) -> None:
    admin = _admin(nodes[0])
    link = await nodes[0].ok("POST", "/api/waiting-rooms/wr-a/walk-in-link", admin)
    token = link["walk_in_token"]
    statuses = [(await node.call("POST", "/api/walk-in", token, {"name": "W"}))[0] for node in (*nodes, nodes[0])]
    assert statuses == [201, 201, 201, 429], statuses


def test_a_node_without_its_redis_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as err:
        start_server(tmp_path, env={"OPENCONSULT_REDIS_URL": "redis://127.0.0.1:1/0"}, timeout=30)
    assert "exited" in str(err.value)


async def _rejoin(url: str, tokens: TokenAuthority, room: str, role: Role, name: str,
                  deadline: float) -> tuple[Participant, dict[str, Any]]:
    """Join like the SDK after a lost connection: try again until a node takes the join."""
    got: list[tuple[Participant, dict[str, Any]]] = []

    async def attempt() -> bool:
        p = Participant(url, name)
        try:
            await p.client.connect()
            joined = await p.client.request("join", timeout=5,
                                            token=tokens.mint(room, role, name, consultation=room))
        except Exception:
            await p.close()
            return False
        got.append((p, joined))
        return True

    await wait_until(attempt, timeout=max(1.0, deadline - time.monotonic()), interval=0.3, message=f"{name} rejoined")
    return got[0]


async def test_kill_the_owner_mid_call_and_both_rejoin_through_live_nodes(
        pg_nodes: list[Clinic], redis: RedisServer) -> None:
    nodes = pg_nodes
    room = "c-kill"
    by_port = {c.server.port: c for c in nodes}
    a, b, _ = nodes
    p = Participant(a.server.ws_url, "Pat")
    d = Participant(b.server.ws_url, "Doc")
    await p.client.connect()
    await d.client.connect()
    first = await p.client.join(a.tokens.mint(room, Role.PATIENT, "Pat", consultation=room))
    first_d = await d.client.join(b.tokens.mint(room, Role.CLINICIAN, "Doc", consultation=room))
    assert first["session_id"] == room
    stream_p, stream_d = await p.publish(), await d.publish()
    await d.client.wait_event("streamCreated", stream__stream_id=stream_p)
    await p.client.wait_event("streamCreated", stream__stream_id=stream_d)
    sub = await d.subscribe(stream_p)
    await wait_until(lambda: len(sub.received.frames) > 5, timeout=60, message="video before the kill")
    owner = await _owner(redis, room)
    dead = next(c for c in nodes if f"cluster: node {owner} " in c.server.log_text())
    live = [c for c in nodes if c is not dead]
    dead.server.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    await p.close()
    await d.close()
    # Each rejoins through its own node if it lives, else through another live node.
    url_p = (a if a is not dead else live[0]).server.ws_url
    url_d = (b if b is not dead else live[1]).server.ws_url
    deadline = killed_at + 15
    (p2, joined_p), (d2, joined_d) = await asyncio.gather(
        _rejoin(url_p, a.tokens, room, Role.PATIENT, "Pat", deadline),
        _rejoin(url_d, b.tokens, room, Role.CLINICIAN, "Doc", deadline))
    try:
        assert joined_p["session_id"] == joined_d["session_id"] == room  # the same session id
        stream_p2, stream_d2 = await p2.publish(), await d2.publish()
        await d2.client.wait_event("streamCreated", stream__stream_id=stream_p2)
        await p2.client.wait_event("streamCreated", stream__stream_id=stream_d2)
        sub_d, sub_p = await d2.subscribe(stream_p2), await p2.subscribe(stream_d2)
        await wait_until(lambda: len(sub_d.received.frames) > 5 and len(sub_p.received.frames) > 5,
                         timeout=max(1.0, deadline - time.monotonic()), message="video both ways again")
        took = time.monotonic() - killed_at
        assert took < 15, took
        new_owner = await _owner(redis, room)  # one key, so one owner
        assert new_owner is not None and new_owner != owner
        assert any(f"cluster: node {new_owner} " in c.server.log_text() for c in live)
        assert by_port[dead.server.port].server.proc.returncode == -signal.SIGKILL
        # The event log (one PostgreSQL for the three nodes), read through any live node: the
        # failure, the connections the dead node left open closed as nodeFailure, and the call
        # resumed under the same session id.
        support = live[0].tokens.mint("support", Role.SUPPORT, "Sue")
        old_conns = {first["connection_id"], first_d["connection_id"]}

        async def failure_logged() -> bool:
            events = (await live[1].ok("GET", f"/api/sessions/{room}/events", support))["events"]
            closed = {e["connection_id"] for e in events
                      if e["kind"] == "disconnect" and e["payload"].get("reason") == "nodeFailure"}
            return closed == old_conns

        await wait_until(failure_logged, timeout=30, message="nodeFailure disconnects of both connections")
        events = (await live[0].ok("GET", f"/api/sessions/{room}/events", support))["events"]
        failures = [e for e in events if e["kind"] == "nodeFailure"]
        assert len(failures) == 1 and failures[0]["payload"]["node"] == owner, failures
        assert failures[0]["payload"]["by_node"] == new_owner
        gone = [e for e in events if e["kind"] == "disconnect" and e["connection_id"] in old_conns]
        assert len(gone) == 2 and {e["payload"]["reason"] for e in gone} == {"nodeFailure"}, gone
        rejoined = [e for e in events if e["kind"] == "serverDetectedConnect"
                    and e["connection_id"] in (joined_p["connection_id"], joined_d["connection_id"])]
        assert len(rejoined) == 2 and min(events.index(e) for e in rejoined) > events.index(failures[0])
        diagnosis = await live[1].ok("GET", f"/api/sessions/{room}/diagnosis", support)
        node_failure = [f for f in diagnosis["findings"] if f["type"] == "node_failure"]
        assert len(node_failure) == 1, diagnosis
        assert node_failure[0]["cause"].startswith(f"The server node holding this call ({owner}) stopped; both "
                                                   "participants rejoined through another node after "), node_failure
    finally:
        await p2.close()
        await d2.close()


async def test_redis_stopped_mid_call_media_flows_new_joins_fail_then_work(tmp_path: Path) -> None:
    binary = require_redis_server()
    port = free_port()
    command = [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
               "--dir", str(tmp_path)]
    url = f"redis://127.0.0.1:{port}/0"
    redis_proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node: ServerProcess | None = None
    p = Participant("", "Pat")
    d = Participant("", "Doc")
    try:
        node = start_server(tmp_path / "a", f'[auth]\nsecret = "{SECRET}"\n[cluster]\nlease_s = 3.0\n',
                            env={"OPENCONSULT_REDIS_URL": url})
        tokens = TokenAuthority("HS256", SECRET, SECRET, leeway_s=30)
        p, d = Participant(node.ws_url, "Pat"), Participant(node.ws_url, "Doc")
        await p.join(tokens, "room-r", Role.PATIENT)
        await d.join(tokens, "room-r", Role.CLINICIAN)
        stream = await p.publish()
        await d.client.wait_event("streamCreated", stream__stream_id=stream)
        sub = await d.subscribe(stream)
        await wait_until(lambda: len(sub.received.frames) > 5, timeout=60, message="video before the outage")
        redis_proc.kill()
        redis_proc.wait()
        before = len(sub.received.frames)
        # Media goes on without Redis; a join to a new room gets a clear coded error.
        late = SignallingClient(node.ws_url)
        await late.connect()
        with pytest.raises(RequestFailed) as err:
            await late.join(tokens.mint("room-new", Role.PATIENT, "Late"))
        assert err.value.code == "cluster_unavailable" and "Redis" in err.value.message
        await wait_until(lambda: len(sub.received.frames) > before + 30, timeout=30, message="media without Redis")
        await wait_until(lambda: "cluster: Redis unavailable" in node.log_text(), timeout=30, message="outage log")
        # Redis comes back (empty): the node re-registers and re-asserts its lease; new joins work.
        redis_proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_until(lambda: "cluster: Redis is back" in node.log_text(), timeout=30, message="Redis back")
        joined = await late.join(tokens.mint("room-new", Role.PATIENT, "Late"))
        assert joined["room"] == "room-new"
        r = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            assert sorted(await r.keys("openconsult:room:*")) == ["openconsult:room:room-new", "openconsult:room:room-r"]
        finally:
            await r.aclose()
        await late.close()
    finally:
        await p.close()
        await d.close()
        if node is not None:
            node.stop()
        redis_proc.kill()
        redis_proc.wait()


async def _call(url_p: str, url_d: str, tokens: TokenAuthority, room: str) -> tuple[Participant, Participant, Any]:
    """Pat and Doc in ``room`` (joined through the given nodes), Doc receiving Pat's video."""
    p, d = Participant(url_p, "Pat"), Participant(url_d, "Doc")
    await p.client.connect()
    await d.client.connect()
    await p.client.join(tokens.mint(room, Role.PATIENT, "Pat", consultation=room))
    await d.client.join(tokens.mint(room, Role.CLINICIAN, "Doc", consultation=room))
    stream = await p.publish()
    await d.client.wait_event("streamCreated", stream__stream_id=stream)
    sub = await d.subscribe(stream)
    await wait_until(lambda: len(sub.received.frames) > 5, timeout=60, message=f"video in {room}")
    return p, d, sub


async def test_drain_a_node_new_rooms_go_elsewhere_its_call_ends_then_it_exits_0(
        nodes: list[Clinic], redis: RedisServer) -> None:
    a = nodes[0]
    p, d, sub = await _call(a.server.ws_url, a.server.ws_url, a.tokens, "c-held")
    owner = await _owner(redis, "c-held")
    drained = next(c for c in nodes if f"cluster: node {owner} " in c.server.log_text())
    n1: Participant | None = None
    n2: Participant | None = None
    try:
        admin = drained.tokens.mint("ops", Role.ADMIN, "ops")
        status, body = await drained.call("POST", "/api/admin/drain", admin, {"deadline_s": 600})
        assert status == 202 and body["draining"] and body["node"] == owner and body["rooms"] == 1, body
        assert (await drained.call("GET", "/healthz", None))[0] == 503
        # A new room joined through the draining node lands on another one, and decodes (the media
        # goes to the owner's candidates; the signalling is relayed).
        n1, n2, sub_new = await _call(drained.server.ws_url, drained.server.ws_url, drained.tokens, "c-new")
        new_owner = await _owner(redis, "c-new")
        assert new_owner is not None and new_owner != owner
        # The drained node's call keeps decoding, and its clinician can rejoin it there.
        before = len(sub.received.frames)
        await wait_until(lambda: len(sub.received.frames) > before + 30, timeout=30, message="the held call goes on")
        await d.close()
        await p.client.wait_event("connectionDestroyed", connection__name="Doc")  # the server saw it go
        d = Participant(drained.server.ws_url, "Doc")
        await d.client.connect()
        rejoined = await d.client.join(drained.tokens.mint("c-held", Role.CLINICIAN, "Doc", consultation="c-held"))
        assert rejoined["session_id"] == "c-held" and [c["name"] for c in rejoined["connections"]] == ["Pat"]
        assert await _owner(redis, "c-held") == owner
        assert drained.server.proc.poll() is None
        # The calls end (the new room's sockets were relayed through the drained node): it exits 0.
        for left in (p, d, n1, n2):
            assert left is not None
            await left.client.request("leave")
        await wait_until(lambda: drained.server.proc.poll() is not None, timeout=30, message="the drained node exits")
        assert drained.server.proc.returncode == 0
        assert "holds no more rooms or connections; exiting" in drained.server.log_text()
        assert len(sub_new.received.frames) > 5
    finally:
        for end in (p, d, n1, n2):
            if end is not None:
                await end.close()


async def test_a_paused_owner_whose_room_was_claimed_closes_its_clients_1012(
        nodes: list[Clinic], redis: RedisServer) -> None:
    a = nodes[0]
    room = "c-pause"
    p = Participant(a.server.ws_url, "Pat")
    await p.client.connect()
    await p.client.join(a.tokens.mint(room, Role.PATIENT, "Pat", consultation=room))
    owner = await _owner(redis, room)
    paused = next(c for c in nodes if f"cluster: node {owner} " in c.server.log_text())
    other = next(c for c in nodes if c is not paused)
    # A guest connected to the owner itself (Pat's socket may be relayed through another node).
    g = Participant(paused.server.ws_url, "Gus")
    await g.client.connect()
    await g.client.join(paused.tokens.mint(room, Role.PATIENT, "Gus", consultation=room))
    d: Participant | None = None
    paused.server.proc.send_signal(signal.SIGSTOP)
    try:
        # Past the lease, a join through another node claims the room there.
        d, _ = await _rejoin(other.server.ws_url, other.tokens, room, Role.CLINICIAN, "Doc", time.monotonic() + 30)
        new_owner = await _owner(redis, room)
        assert new_owner is not None and new_owner != owner
    finally:
        paused.server.proc.send_signal(signal.SIGCONT)
    try:
        # The paused node finds its lease taken: its client in the room is closed 1012 (the SDK
        # rejoins and lands on the live owner), and the room is held once.
        await wait_until(g.client.closed.wait, timeout=30, message="the paused node's client closed")
        await wait_until(p.client.closed.wait, timeout=30, message="Pat's socket closed")
        assert g.client.close_code == p.client.close_code == 1012
        await wait_until(lambda: "now belongs to another node; closing its connections" in paused.server.log_text(),
                         timeout=30, message="the paused node's log")
        health = await paused.call("GET", "/healthz", None)
        assert health[1]["rooms"] == 0 and health[1]["connections"] == 0, health
        assert await _owner(redis, room) == new_owner
        p2, joined = await _rejoin(paused.server.ws_url, paused.tokens, room, Role.PATIENT, "Pat",
                                   time.monotonic() + 30)
        assert joined["session_id"] == room and [c["name"] for c in joined["connections"]] == ["Doc"]
        await p2.close()
    finally:
        await p.close()
        await g.close()
        if d is not None:
            await d.close()
