"""One UDP port for media (``media.udp_port``) through a real ``openconsult serve``: a 1:1
call of two aiortc clients (each publishes and subscribes to the other) runs on the one
port, the server holds exactly one UDP socket (per ICE address), strangers' datagrams at
the port are dropped and counted by reason, the routes go when the peers close, and
relay-only clients still reach the port through TURN."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from media import aiortc_internals
from rooms.model import Role
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import free_port, wait_until
from tests.server import ServerProcess, start_server
from tests.test_media_hardening import junk, metric, stun
from tests.turn_server import turn_server


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def udp_sockets(pid: int) -> set[tuple[str, int]]:
    """The local (address, port) of every UDP socket process ``pid`` holds: its socket inodes
    from /proc/<pid>/fd, matched against /proc/<pid>/net/udp and udp6."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table, family in (("udp", socket.AF_INET), ("udp6", socket.AF_INET6)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as host-order 32-bit words.
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, packed), int(hex_port, 16)))
    return found


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


@pytest.fixture(scope="module")
def udp_port() -> int:
    return free_udp_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, udp_port: int) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("udp-port"), f"udp_port = {udp_port}\n")
    yield server
    server.stop()


async def test_a_call_runs_on_one_udp_port(server: ServerProcess, udp_port: int) -> None:
    tokens = authority(server.data_dir)
    room = f"room-{uuid.uuid4().hex[:8]}"
    alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.setblocking(False)
    assert udp_sockets(server.proc.pid) == {("127.0.0.1", udp_port)}
    try:
        joined = await alice.join(tokens, room, Role.CLINICIAN)
        await bob.join(tokens, room, Role.PATIENT)
        stream_a, stream_b = await alice.publish(), await bob.publish()
        await bob.client.wait_event("streamCreated", stream__stream_id=stream_a)
        await alice.client.wait_event("streamCreated", stream__stream_id=stream_b)
        sub_ab, sub_ba = await alice.subscribe(stream_b), await bob.subscribe(stream_a)
        await wait_until(lambda: len(sub_ab.received.frames) > 10 and len(sub_ba.received.frames) > 10,
                         timeout=60, message="video both ways")
        assert sub_ab.received.audio_frames > 0 and sub_ba.received.audio_frames > 0

        # Every server candidate, in all four SDPs, is on the one port.
        sdps = [p.publisher.remoteDescription.sdp for p in (alice, bob) if p.publisher is not None]
        sdps += [s.pc.remoteDescription.sdp for s in (sub_ab, sub_ba)]
        ports = {int(p) for sdp in sdps for p in re.findall(r"a=candidate:\S+ \d+ udp \d+ \S+ (\d+) typ host", sdp)}
        assert len(sdps) == 4 and ports == {udp_port}
        # Four peer connections, one UDP socket in the server process.
        assert udp_sockets(server.proc.pid) == {("127.0.0.1", udp_port)}
        assert metric(server, "media_udp_routes", kind="username") >= 4
        support = tokens.mint("support", Role.SUPPORT, "Support")
        events = get_json(f"{server.url}/api/sessions/{joined['session_id']}/events", support)["events"]
        pairs = [e["payload"]["candidate_pair"] for e in events
                 if e["kind"] == "iceStateChanged" and e["payload"]["state"] == "completed"]
        assert len(pairs) == 4 and {p["local_address"] for p in pairs} == {f"127.0.0.1:{udp_port}"}, pairs

        # Strangers at the port: junk, and STUN naming no peer connection. Media keeps flowing.
        before = {r: metric(server, "media_datagrams_dropped_total", reason=r)
                  for r in ("unknown_address", "unknown_username")}
        for _ in range(20):
            for datagram in (*junk(), stun(b"\x00\x06\x00\x0anosuch:abc\x00\x00")):
                stranger.sendto(datagram, ("127.0.0.1", udp_port))
            await asyncio.sleep(0.01)  # pace the burst; the call shares the server's loop
        for reason, count in before.items():
            await wait_until(lambda: metric(server, "media_datagrams_dropped_total", reason=reason) > count,
                             timeout=10, message=f"{reason} drops on /metrics")
        with pytest.raises(BlockingIOError):
            stranger.recv(1500)  # nothing is ever answered to a stranger
        frames = len(sub_ab.received.frames), len(sub_ba.received.frames)
        await wait_until(lambda: len(sub_ab.received.frames) > frames[0] + 20
                         and len(sub_ba.received.frames) > frames[1] + 20, timeout=20, message="frames after junk")
    finally:
        stranger.close()
        for p in (bob, alice):
            await p.close()

    # The server closes the four peer connections when the clients leave: no route is left.
    for kind in ("username", "address"):
        await wait_until(lambda: metric(server, "media_udp_routes", kind=kind) == 0, timeout=30,
                         message=f"{kind} routes at 0")
    assert udp_sockets(server.proc.pid) == {("127.0.0.1", udp_port)}
    assert "Traceback" not in server.log_text(), server.log_tail()


def test_a_taken_udp_port_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    try:
        with pytest.raises(AssertionError) as failed:
            start_server(tmp_path, f"udp_port = {taken}\n", port=free_port(), timeout=30)
        assert f"media.udp_port = {taken}" in str(failed.value), failed.value
    finally:
        holder.close()


async def test_relay_only_clients_reach_the_one_port_through_turn(tmp_path: Path) -> None:
    # TURN stays optional with one port: a client whose network blocks UDP relays to it.
    port = free_udp_port()
    with turn_server(tmp_path / "turn") as turn:
        server = start_server(tmp_path, f'udp_port = {port}\nturn_urls = ["{turn.url}"]\n'
                              f'turn_secret = "{turn.secret}"\n')
        tokens = authority(server.data_dir)
        room = f"r-{uuid.uuid4().hex[:8]}"
        alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
        try:
            joined = await alice.join(tokens, room, Role.CLINICIAN)
            await bob.join(tokens, room)
            for p, data in ((alice, joined), (bob, bob.client.joined)):
                [s] = data["ice_servers"]
                p.rtc_config = RTCConfiguration(
                    iceServers=[RTCIceServer(urls=s["urls"][0], username=s["username"], credential=s["credential"])],
                    iceTransportPolicy=RTCIceTransportPolicy.RELAY)
            stream = await alice.publish()
            await bob.client.wait_event("streamCreated", stream__stream_id=stream)
            subscriber = await bob.subscribe(stream)
            await wait_until(lambda: len(subscriber.received.frames) > 10, timeout=60, message="video through TURN")
            support = tokens.mint("support", Role.SUPPORT, "Support")
            events = get_json(f"{server.url}/api/sessions/{joined['session_id']}/events", support)["events"]
            pairs = [e["payload"]["candidate_pair"] for e in events
                     if e["kind"] == "iceStateChanged" and e["payload"]["state"] == "completed"]
            assert len(pairs) == 2 and all(p["remote_type"] in ("relay", "prflx") for p in pairs), pairs
            assert {p["local_address"] for p in pairs} == {f"127.0.0.1:{port}"}, pairs
            assert udp_sockets(server.proc.pid) == {("127.0.0.1", port)}
        finally:
            await alice.close()
            await bob.close()
            server.stop()
