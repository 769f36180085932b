"""Cluster metrics: the series exist up front, the Redis directory counts claims, lease conflicts
and failed heartbeats against a real redis-server, and two real ``openconsult serve`` nodes show
Redis up, the nodes they see, the rooms they own and their relayed connections in /metrics, and
all of it move when a node is killed and when Redis stops."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from loadtest.client import SignallingClient
from metrics import prometheus
from rooms.directory import DirectoryUnavailable, NodeId, NodeLoad, RoomOwnedElsewhere
from rooms.model import Role
from signalling.auth import TokenAuthority
from signalling.cluster import RedisDirectory
from tests.helpers import wait_until
from tests.redis_server import redis_server
from tests.server import ServerProcess, start_server

SECRET = "cluster-metrics-secret-0123456789abcdef"


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


def test_cluster_series_exist_up_front() -> None:
    body, _ = prometheus.render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("openconsult_cluster_redis_up", "openconsult_cluster_nodes", "openconsult_cluster_rooms_owned",
                 "openconsult_cluster_leases_lost", "openconsult_cluster_heartbeat_failures",
                 "openconsult_node_info"):
        assert name in families, name
    assert {s.labels["result"] for s in families["openconsult_cluster_claims"].samples} == {"won", "elsewhere", "error"}
    assert {s.labels["side"] for s in families["openconsult_cluster_relayed_connections"].samples} == {"door", "owner"}


@pytest.mark.redis
async def test_directory_counts_claims_conflicts_and_redis_loss() -> None:
    before = {r: sample("openconsult_cluster_claims_total", result=r) for r in ("won", "elsewhere", "error")}
    lost_before = sample("openconsult_cluster_leases_lost_total")
    failures_before = sample("openconsult_cluster_heartbeat_failures_total")
    ns = f"m{uuid.uuid4().hex[:8]}:"
    with redis_server() as server:
        a = RedisDirectory(server.url, node_id=NodeId("node-a"), lease_s=2.0, namespace=ns)
        b = RedisDirectory(server.url, node_id=NodeId("node-b"), lease_s=2.0, namespace=ns)
        await a.start(lambda n: None)
        await b.start(lambda n: None)
        assert sample("openconsult_cluster_redis_up") == 1
        await a.claim("r1")
        with pytest.raises(RoomOwnedElsewhere):
            await b.claim("r1")
        assert sample("openconsult_cluster_claims_total", result="won") == before["won"] + 1
        assert sample("openconsult_cluster_claims_total", result="elsewhere") == before["elsewhere"] + 1
        # A lease conflict: a's lease vanished (as when it was cut off past the lease) and b took the room.
        raw = aioredis.Redis.from_url(server.url)
        await raw.delete(f"{ns}room:r1")
        await raw.aclose()
        await b.claim("r1")
        await a.heartbeat(NodeLoad())
        assert sample("openconsult_cluster_leases_lost_total") == lost_before + 1
        assert "r1" not in a.held() and "r1" in b.held()
        # A healthy renewal counts nothing.
        await a.heartbeat(NodeLoad())
        await b.heartbeat(NodeLoad())
        assert sample("openconsult_cluster_leases_lost_total") == lost_before + 1

        server.process.terminate()
        server.process.wait(timeout=10)
        with pytest.raises(DirectoryUnavailable):
            await a.heartbeat(NodeLoad())
        assert sample("openconsult_cluster_redis_up") == 0
        assert sample("openconsult_cluster_heartbeat_failures_total") == failures_before + 1
        with pytest.raises(DirectoryUnavailable):
            await a.claim("r2")
        assert sample("openconsult_cluster_claims_total", result="error") == before["error"] + 1
        await a.close()
        await b.close()


def scrape(server: ServerProcess) -> dict[str, float]:
    """``name{label="value",...}`` -> value, from the node's /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return found


def http(server: ServerProcess, method: str, path: str, token: str | None,
         body: object = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(server.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"error": {"code": "?", "message": text.decode(errors="replace")[:300]}}


def node_info(metrics: dict[str, float]) -> str:
    (key,) = [k for k, v in metrics.items() if k.startswith("openconsult_node_info{") and v == 1]
    return key


@pytest.mark.slow
@pytest.mark.redis
async def test_two_nodes_export_the_cluster_and_see_a_node_and_redis_go(tmp_path: Path) -> None:
    config = f'[auth]\nsecret = "{SECRET}"\n[cluster]\nlease_s = 3.0\nnamespace = "mc{uuid.uuid4().hex[:6]}:"\n'
    tokens = TokenAuthority("HS256", SECRET, SECRET, leeway_s=30)
    clients: list[SignallingClient] = []
    with redis_server() as redis:
        env = {"OPENCONSULT_REDIS_URL": redis.url}
        a = start_server(tmp_path / "a", config, env=env)
        b = start_server(tmp_path / "b", config, env=env)
        try:
            await wait_until(lambda: all(scrape(n)["openconsult_cluster_nodes"] == 2 for n in (a, b)), timeout=30,
                             interval=0.2, message="both nodes seen by both")
            for node in (a, b):
                assert 'directory="redis"' in node_info(scrape(node))
                assert scrape(node)["openconsult_cluster_redis_up"] == 1
            assert node_info(scrape(a)) != node_info(scrape(b))  # each node names itself

            first = await SignallingClient(a.ws_url).connect()
            clients.append(first)
            await first.join(tokens.mint("room-m", Role.PATIENT, "Pat"))
            # Placement picks the less loaded of the two: the room lives on one of them.
            owned = [scrape(n)["openconsult_cluster_rooms_owned"] for n in (a, b)]
            assert sorted(owned) == [0, 1], owned
            owner, door = (a, b) if owned[0] else (b, a)
            assert scrape(owner)['openconsult_cluster_claims_total{result="won"}'] == 1
            # The second participant reaches the other node: its signalling is relayed to the owner.
            second = await SignallingClient(door.ws_url).connect()
            clients.append(second)
            await second.join(tokens.mint("room-m", Role.CLINICIAN, "Dr"))
            relayed = 1 if owner is a else 2
            assert scrape(door)['openconsult_cluster_relayed_connections{side="door"}'] == relayed
            await wait_until(lambda: scrape(owner)['openconsult_cluster_relayed_connections{side="owner"}'] == relayed,
                             timeout=10, interval=0.2, message="owner side of the relay")

            # The door node dies: the owner sees one node left and drops its relayed connections.
            door.stop(signal.SIGKILL)
            await wait_until(lambda: scrape(owner)["openconsult_cluster_nodes"] == 1, timeout=30, interval=0.2,
                             message="the dead node gone from the owner's view")
            await wait_until(lambda: scrape(owner)['openconsult_cluster_relayed_connections{side="owner"}'] == 0,
                             timeout=30, interval=0.2, message="relayed connections dropped")

            # Redis stops: the node says so, and counts its failed heartbeats.
            redis.process.terminate()
            redis.process.wait(timeout=10)
            await wait_until(lambda: scrape(owner)["openconsult_cluster_redis_up"] == 0, timeout=30, interval=0.2,
                             message="redis_up 0 after Redis stopped")
            await wait_until(lambda: scrape(owner)["openconsult_cluster_heartbeat_failures_total"] >= 1,
                             timeout=30, interval=0.2)
            # What needs Redis answers 503 cluster_unavailable, naming Redis (not a 500).
            staff = tokens.mint("staff", Role.DEPARTMENT_ADMIN, "dana", sub="dana", departments=["cardio"])
            for method, path, token, body in (
                    ("GET", "/api/departments/cardio/consultations", staff, None),
                    ("POST", "/api/waiting-rooms", staff, {"room_id": "wr-c", "name": "Cardiology", "department": "cardio"}),
                    ("POST", "/api/demo/token", None, {"room": "room-d", "name": "Demo"})):
                status, answer = http(owner, method, path, token, body)
                assert status == 503 and answer["error"]["code"] == "cluster_unavailable", (path, status, answer)
                assert "Redis" in answer["error"]["message"]
            # The owner's own participant (when it joined there directly) keeps its room meanwhile;
            # a room whose participants all came through the dead node ended with them.
            assert scrape(owner)["openconsult_cluster_rooms_owned"] == (1 if owner is a else 0)
        finally:
            for client in clients:
                await client.close()
            a.stop()
            b.stop()
