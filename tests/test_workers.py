"""``openconsult serve --workers 2`` with a real redis-server: one public port, two worker
processes (each a cluster node with its own media port), a supervisor that restarts a killed
worker with the same index and stops them all on SIGTERM, and /healthz and /metrics that answer
for the whole host whichever worker the request lands on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.error
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtest.runner import scrape_metrics
from rooms.model import Role
from signalling.auth import TokenAuthority
from tests.call_helpers import Participant, get_json
from tests.helpers import wait_until, wait_until_sync
from tests.redis_server import RedisServer, redis_server
from tests.server import ServerProcess, start_server
from tests.test_cluster import _owner, _rejoin
from tests.test_udp_port import udp_sockets

SECRET = "workers-test-secret-0123456789abcdef"
TOKENS = TokenAuthority("HS256", SECRET, SECRET, leeway_s=30)

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def free_udp_ports(count: int) -> int:
    """A first port P such that P .. P+count-1 are all free UDP ports on loopback."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count - 1 > 65535:
            continue
        held = []
        try:
            for port in range(first, first + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no run of free UDP ports")


def start_host(workdir: Path, redis: RedisServer, workers: int = 2,
               args: tuple[str, ...] = ()) -> tuple[ServerProcess, int]:
    """The supervisor with ``workers`` workers, ready when /healthz says every worker is ok."""
    udp_port = free_udp_ports(workers)
    ns = f"ocw{workdir.name[-12:]}:".replace("-", "")
    config = (f"udp_port = {udp_port}\n"
              f'[auth]\nsecret = "{SECRET}"\n'
              f'[cluster]\nlease_s = 3.0\nnamespace = "{ns}"\n')
    host = start_server(workdir, config, env={"OPENCONSULT_REDIS_URL": redis.url}, args=("--workers", str(workers), *args))
    try:
        wait_until_sync(lambda: health(host)["status"] == "ok", timeout=60, interval=0.2, message="every worker ok")
    except BaseException:
        host.stop(signal.SIGKILL)
        raise
    return host, udp_port


def health(host: ServerProcess) -> dict[str, Any]:
    body: dict[str, Any] = get_json(f"{host.url}/healthz", "")
    return body


def restarted(host: ServerProcess, dead: dict[str, Any]) -> bool:
    """Whether worker ``dead["index"]`` is back with another pid. A request the kernel queued
    for the worker as it was killed is reset: that is "not yet"."""
    try:
        row = health(host)["workers"][dead["index"]]
    except (urllib.error.URLError, ConnectionError):
        return False
    return bool(row["status"] == "ok" and row["pid"] != dead["pid"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[tuple[ServerProcess, int]]:
    server, udp_port = start_host(tmp_path_factory.mktemp("workers"), redis)
    try:
        yield server, udp_port
    finally:
        assert server.stop() == 0, server.log_tail()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _exposition(http: aiohttp.ClientSession, host: ServerProcess) -> str:
    async with http.get(f"{host.url}/metrics") as response:
        assert response.status == 200
        return await response.text()


def _value(exposition: str, sample: str) -> float:
    lines = [line for line in exposition.splitlines() if line.startswith(sample + " ")]
    assert len(lines) == 1, (sample, lines)
    return float(lines[0].rsplit(" ", 1)[1])


def test_every_worker_is_a_node_with_its_own_media_port(host: tuple[ServerProcess, int]) -> None:
    server, udp_port = host
    body = health(server)
    assert body["status"] == "ok" and body["version"] and body["uptime_s"] >= 0
    rows = body["workers"]
    assert [r["index"] for r in rows] == [0, 1]
    assert all(r["status"] == "ok" for r in rows), rows
    assert len({r["pid"] for r in rows}) == len({r["node_id"] for r in rows}) == 2
    for row in rows:
        assert udp_sockets(row["pid"]) == {("127.0.0.1", udp_port + row["index"])}
    # Whichever worker answers, it answers for both (ask a few times: requests spread over them).
    for _ in range(6):
        assert [(r["index"], r["pid"]) for r in health(server)["workers"]] == [(r["index"], r["pid"]) for r in rows]
    log = server.log_text()
    assert "worker 0: signalling.app: cluster: node " in log and "worker 1: signalling.app: cluster: node " in log


async def test_metrics_from_the_shared_port_carry_both_workers(host: tuple[ServerProcess, int],
                                                               http: aiohttp.ClientSession) -> None:
    server, _ = host
    before = await _exposition(http, server)
    invalid = [f'openconsult_ws_messages_total{{direction="in",result="invalid",worker="{i}"}}' for i in (0, 1)]
    start = [_value(before, s) for s in invalid]
    # Sixteen sockets on the shared port, one invalid message each: the kernel spreads them over
    # both workers (all on one would be a 1 in 2^15 chance), each worker counts its own.
    sockets = [await http.ws_connect(server.ws_url, protocols=("openconsult.v1",)) for _ in range(16)]
    try:
        for ws in sockets:
            await ws.send_str("not json")
        for ws in sockets:
            reply = await ws.receive_json(timeout=10)
            assert reply["ok"] is False and reply["error"]["code"] == "invalid_message", reply

        async def counted() -> bool:
            text = await _exposition(http, server)
            return sum(_value(text, s) for s in invalid) - sum(start) == 16

        await wait_until(counted, timeout=30, message="16 invalid messages counted over the workers")
        text = await _exposition(http, server)
        per_worker = [_value(text, s) - s0 for s, s0 in zip(invalid, start)]
        assert all(n > 0 for n in per_worker), per_worker
        assert _value(text, 'openconsult_worker_up{worker="0"}') == _value(text, 'openconsult_worker_up{worker="1"}') == 1
        for name in ("openconsult_connections_active", "process_resident_memory_bytes"):
            assert {f'{name}{{worker="{i}"}}' in text for i in (0, 1)} == {True}, name
        # The load tester reads the host's CPU from the same scrape: the workers' sum.
        scraped = await scrape_metrics(http, server.url)
        workers_cpu = [scraped[f'process_cpu_seconds_total{{worker="{i}"}}'] for i in (0, 1)]
        assert scraped["process_cpu_seconds_total"] == pytest.approx(sum(workers_cpu))
        assert min(workers_cpu) > 0
    finally:
        for ws in sockets:
            await ws.close()


async def test_a_call_through_the_shared_port_and_a_killed_worker_comes_back(
        host: tuple[ServerProcess, int], redis: RedisServer) -> None:
    server, udp_port = host
    room = "c-workers"
    p, d = Participant(server.ws_url, "Pat"), Participant(server.ws_url, "Doc")
    await p.client.connect()
    await d.client.connect()
    first = await p.client.join(TOKENS.mint(room, Role.PATIENT, "Pat", consultation=room))
    joined_d = await d.client.join(TOKENS.mint(room, Role.CLINICIAN, "Doc", consultation=room))
    assert first["session_id"] == joined_d["session_id"] == room
    stream_p, stream_d = await p.publish(), await d.publish()
    await d.client.wait_event("streamCreated", stream__stream_id=stream_p)
    await p.client.wait_event("streamCreated", stream__stream_id=stream_d)
    sub_d, sub_p = await d.subscribe(stream_p), await p.subscribe(stream_d)
    await wait_until(lambda: len(sub_d.received.frames) > 5 and len(sub_p.received.frames) > 5,
                     timeout=60, message="video both ways through the shared port")

    # Kill the worker that owns the room outright.
    owner = await _owner(redis, room)
    rows = health(server)["workers"]
    dead = next(r for r in rows if r["node_id"] == owner)
    assert udp_sockets(dead["pid"]) == {("127.0.0.1", udp_port + dead["index"])}
    os.kill(dead["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    await p.close()
    await d.close()

    # The supervisor starts it again: same index, a new pid and node, the same media port.
    await wait_until(lambda: asyncio.to_thread(restarted, server, dead), timeout=60, interval=0.3,
                     message="the worker restarted")
    row = health(server)["workers"][dead["index"]]
    assert row["node_id"] != dead["node_id"]
    assert udp_sockets(row["pid"]) == {("127.0.0.1", udp_port + dead["index"])}
    log = server.log_text()
    assert f"worker {dead['index']} (pid {dead['pid']}) killed by SIGKILL" in log, server.log_tail()
    assert f"worker {dead['index']} started (pid {row['pid']}, media.udp_port {udp_port + dead['index']}" in log

    # Both rejoin through the shared port and decode each other again.
    deadline = killed_at + 60
    (p2, joined_p), (d2, joined_d) = await asyncio.gather(
        _rejoin(server.ws_url, TOKENS, room, Role.PATIENT, "Pat", deadline),
        _rejoin(server.ws_url, TOKENS, room, Role.CLINICIAN, "Doc", deadline))
    try:
        assert joined_p["session_id"] == joined_d["session_id"] == room
        stream_p2, stream_d2 = await p2.publish(), await d2.publish()
        await d2.client.wait_event("streamCreated", stream__stream_id=stream_p2)
        await p2.client.wait_event("streamCreated", stream__stream_id=stream_d2)
        sub_d2, sub_p2 = await d2.subscribe(stream_p2), await p2.subscribe(stream_d2)
        await wait_until(lambda: len(sub_d2.received.frames) > 5 and len(sub_p2.received.frames) > 5,
                         timeout=max(1.0, deadline - time.monotonic()), message="video both ways again")
        new_owner = await _owner(redis, room)
        assert new_owner is not None and new_owner != owner
        assert new_owner in {r["node_id"] for r in health(server)["workers"]}
        # One event log for the host (the workers share the data dir): whichever worker answers,
        # the session holds both joins from before the kill and both from after.
        support = TOKENS.mint("support", Role.SUPPORT, "Support")
        for _ in range(4):
            events = (await asyncio.to_thread(get_json, f"{server.url}/api/sessions/{room}/events", support))["events"]
            assert sum(e["kind"] == "successfullyJoined" for e in events) == 4, [e["kind"] for e in events]
    finally:
        await p2.close()
        await d2.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_stops_every_worker_cleanly_and_exits_0(tmp_path: Path, redis: RedisServer,
                                                                    sig: signal.Signals) -> None:
    server, _ = start_host(tmp_path, redis)
    pids = [r["pid"] for r in health(server)["workers"]]
    p = Participant(server.ws_url, "Pat")
    try:
        await p.join(TOKENS, "r-stop", Role.PATIENT)
        assert server.proc.poll() is None
        server.proc.send_signal(sig)
        # The worker holding the socket closes it with 1001 (going away) before it exits.
        await asyncio.wait_for(p.client.closed.wait(), timeout=30)
        assert p.client.close_code == 1001
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
        assert not any(alive(pid) for pid in pids)
        log = server.log_text()
        assert f"{sig.name}: stopping the workers" in log and "all workers stopped" in log
        assert "killed by" not in log
    finally:
        await p.close()
        server.stop(signal.SIGKILL)


def test_workers_of_a_killed_supervisor_exit(tmp_path: Path, redis: RedisServer) -> None:
    server, _ = start_host(tmp_path, redis)
    pids = [r["pid"] for r in health(server)["workers"]]
    server.stop(signal.SIGKILL)
    try:
        wait_until_sync(lambda: not any(alive(pid) for pid in pids), timeout=30, interval=0.2,
                        message="the orphaned workers exited")
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert server.log_path.read_text().count("the supervisor (pid ") == 2  # both said why they stopped


def test_a_worker_that_cannot_start_stops_the_host_with_exit_2(tmp_path: Path, redis: RedisServer) -> None:
    udp_port = free_udp_ports(2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", udp_port + 1))  # worker 1's media port, held by someone else
        try:
            server = start_server(tmp_path, f"udp_port = {udp_port}\n", env={"OPENCONSULT_REDIS_URL": redis.url},
                                  args=("--workers", "2"), timeout=60)
        except AssertionError as exc:  # exited before anyone answered /healthz
            assert "server exited with 2" in str(exc)
        else:  # worker 0 answered first
            assert server.proc.wait(timeout=60) == 2
            server.stop()
    log = (tmp_path / next(p.name for p in tmp_path.glob("server-*.log"))).read_text()
    assert f"openconsult: worker 1: media.udp_port = {udp_port + 1}: cannot bind UDP" in log, log
    assert "worker 1 (pid " in log and "exited with code 2: it cannot start as configured" in log, log
    assert "restarting it" not in log


def test_json_logs_reach_the_workers_and_name_each_one(tmp_path: Path, redis: RedisServer) -> None:
    server, _ = start_host(tmp_path / "json", redis, args=("--log-format", "json"))
    try:
        wait_until_sync(lambda: server.log_text().count("cluster: node") >= 2, timeout=30, interval=0.2,
                        message="both workers' start-up lines")
        text = server.log_text()
    finally:
        assert server.stop() == 0, server.log_tail()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    unnamed = [line for line in lines if line["logger"] != "openconsult.supervisor" and "worker" not in line]
    assert not unnamed, unnamed
    assert {line["worker"] for line in lines if "worker" in line} == {"0", "1"}
    assert any("2 workers on" in line["message"] for line in lines)
    assert all(line.get("worker") in ("0", "1") and line.get("node_id") for line in lines
               if line["message"].startswith("cluster: node"))
