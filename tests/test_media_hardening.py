"""The media plane against junk datagrams and stuck peers, through a real `openconsult serve`:
junk UDP from a stranger's socket to a live publish's port never ends it (RFC 7983 demux,
drops counted on /metrics, no traceback); peer connections that never connect are reaped
after media.connect_timeout_s with a reason support can read, are never announced, and the
node refuses peer connections over media.max_peer_connections."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiortc import RTCPeerConnection

from loadtest.client import RequestFailed
from media import aiortc_internals
from rooms.model import Role
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import wait_until
from tests.media.peers import publisher_offer
from tests.server import ServerProcess, start_server

CONNECT_TIMEOUT_S = 5
MAX_PEERS = 3


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("hardening"),
                          f"connect_timeout_s = {CONNECT_TIMEOUT_S}\nmax_peer_connections = {MAX_PEERS}\n")
    yield server
    server.stop()


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^openconsult_{name}" + (rf"\{{{re.escape(selector)}\}}" if selector else "") + r" (\S+)$"
    found = re.search(pattern, exposition, re.M)
    assert found, f"{name} {labels} not exported"
    return float(found.group(1))


def host_port(sdp: str) -> int:
    ports = {int(p) for p in re.findall(r"a=candidate:\S+ \d+ udp \d+ 127\.0\.0\.1 (\d+) typ host", sdp, re.I)}
    assert len(ports) == 1, sdp
    return ports.pop()


def stun(body: bytes, length: int | None = None, message_type: int = 0x0001) -> bytes:
    """A STUN header (magic cookie, random transaction id) before ``body``."""
    return struct.pack("!HHI", message_type, len(body) if length is None else length, 0x2112A442) \
        + os.urandom(12) + body


def junk() -> list[bytes]:
    """One round of every kind of junk: empty, random, STUN-like, DTLS-like, RTP/RTCP-like."""
    return [
        b"",
        os.urandom(1),
        os.urandom(200),
        bytes([0xC0 + os.urandom(1)[0] % 64]) + os.urandom(40),  # first byte outside every range
        stun(b""),  # a bare header: no credentials
        stun(b"", length=64),  # length says more than there is
        stun(struct.pack("!HH", 0x0020, 2) + b"\x00\x01"),  # XOR-MAPPED-ADDRESS far too short
        stun(struct.pack("!HH", 0x0001, 300) + os.urandom(8)),  # attribute longer than the message
        stun(struct.pack("!HH", 0x0006, 4) + b"\xff\xfe\xfd\xfc"  # USERNAME not UTF-8 ...
             + struct.pack("!HH", 0x0008, 3) + b"abc\x00"),  # ... and a 3-byte MESSAGE-INTEGRITY
        stun(os.urandom(24), message_type=0x0FFF),  # unknown method
        b"\x16\xfe\xfd" + os.urandom(60),  # DTLS handshake record
        b"\x17\xfe\xfd" + os.urandom(60),  # DTLS application data
        b"\x80\x60" + os.urandom(160),  # RTP
        b"\x80\xe0" + os.urandom(12),  # RTP, marker set
        b"\x81\xc9" + os.urandom(30),  # RTCP receiver report
    ]


async def test_junk_datagrams_to_a_publish_port_do_not_stop_its_media(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    room = f"room-{uuid.uuid4().hex[:8]}"
    alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.setblocking(False)
    try:
        await alice.join(tokens, room, Role.CLINICIAN)
        await bob.join(tokens, room, Role.PATIENT)
        stream_id = await alice.publish()
        await bob.client.wait_event("streamCreated", stream__stream_id=stream_id)
        subscriber = await bob.subscribe(stream_id)
        await wait_until(lambda: len(subscriber.received.frames) > 5, timeout=60, message="first frames")
        assert alice.publisher is not None
        port = host_port(alice.publisher.remoteDescription.sdp)

        # Junk for 3 s (bounded), then media must still flow for both kinds.
        start, sent = time.monotonic(), 0
        frames_before, audio_before = len(subscriber.received.frames), subscriber.received.audio_frames
        while time.monotonic() - start < 3.0 and sent < 20_000:
            for datagram in junk():
                stranger.sendto(datagram, ("127.0.0.1", port))
                sent += 1
            await asyncio.sleep(0.01)  # pace the flood; the call's own traffic shares the loop
        during = len(subscriber.received.frames) - frames_before
        assert during >= 30, f"only {during} frames while junk was sent"
        assert subscriber.received.audio_frames > audio_before
        after = len(subscriber.received.frames)
        await wait_until(lambda: len(subscriber.received.frames) > after + 30, timeout=20,
                         message="frames after the junk")

        events = [e["event"] for e in bob.client.events]
        assert "streamDestroyed" not in events and "subscriptionEnded" not in events
        # Every kind of drop was counted (the router folds its counters every second).
        for reason in ("empty", "unknown", "malformed_stun", "not_selected_pair"):
            await wait_until(lambda: metric(server, "media_datagrams_dropped_total", reason=reason) > 0,
                             timeout=10, message=f"{reason} drops on /metrics")
        total = sum(metric(server, "media_datagrams_dropped_total", reason=r)
                    for r in ("empty", "unknown", "malformed_stun", "not_selected_pair"))
        print(f"{sent} junk datagrams sent, {total:.0f} dropped")
        log = server.log_text()
        assert "Traceback" not in log and "Exception in callback" not in log, server.log_tail()
    finally:
        stranger.close()
        for p in (bob, alice):
            await p.close()


async def test_unconnected_peers_are_reaped_never_announced_and_capped(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    room = f"room-{uuid.uuid4().hex[:8]}"
    alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
    stuck: list[RTCPeerConnection] = []
    # The other test's peers are closed once the server saw its clients leave.
    for gauge in ("streams_active", "subscriptions_active"):
        await wait_until(lambda: metric(server, gauge) == 0, timeout=20, message=f"{gauge} at 0")
    try:
        joined = await alice.join(tokens, room, Role.CLINICIAN)
        await bob.join(tokens, room, Role.PATIENT)

        # Publishes whose client never applies the answer: they never connect.
        stuck_ids = []
        for _ in range(MAX_PEERS):
            pc = await publisher_offer()
            stuck.append(pc)
            data = await alice.client.request("publish", offer={"type": "offer", "sdp": pc.localDescription.sdp})
            stuck_ids.append(data["stream_id"])
        # The node holds MAX_PEERS peer connections: one more is refused, naming the cap.
        pc = await publisher_offer()
        stuck.append(pc)
        with pytest.raises(RequestFailed) as refused:
            await alice.client.request("publish", offer={"type": "offer", "sdp": pc.localDescription.sdp})
        assert refused.value.code == "over_capacity" and "media.max_peer_connections" in refused.value.message
        # Not announced: a member joining now lists no stream.
        carol = Participant(server.ws_url, "Carol")
        try:
            assert (await carol.join(tokens, room))["streams"] == []
        finally:
            await carol.close()

        # Reaped after the deadline, each with its reason in the event log.
        support = tokens.mint("support", Role.SUPPORT, "Support")
        url = f"{server.url}/api/sessions/{joined['session_id']}/events"

        def failures() -> list[dict[str, Any]]:
            return [e for e in get_json(url, support)["events"]
                    if e["kind"] == "publishFailure" and e["stream_id"] in stuck_ids]

        await wait_until(lambda: len(failures()) == MAX_PEERS, timeout=CONNECT_TIMEOUT_S + 20,
                         message="stuck publishes reaped")
        for entry in failures():
            assert f"not connected (ICE and DTLS) within {CONNECT_TIMEOUT_S} s" in entry["text"], entry
        refusals = [e["text"] for e in get_json(url, support)["events"] if e["kind"] == "publishFailure"
                    and "media.max_peer_connections" in e["text"]]
        assert len(refusals) == 1, refusals
        assert metric(server, "peer_connections_timed_out_total") >= MAX_PEERS
        kinds = [e["kind"] for e in get_json(url, support)["events"] if e.get("stream_id") in stuck_ids]
        assert "streamCreated" not in kinds and "streamDestroyed" not in kinds

        # Capacity is back; a publish that connects is announced, and only then.
        stream_id = await alice.publish()
        created = await bob.client.wait_event("streamCreated", stream__stream_id=stream_id)
        assert created["data"]["stream"]["stream_id"] == stream_id
        announced = {e["data"]["stream"]["stream_id"] for e in bob.client.events if e["event"] == "streamCreated"}
        assert announced == {stream_id}
        entries = [e for e in get_json(url, support)["events"] if e.get("stream_id") == stream_id]
        order = [e["kind"] for e in entries]
        connected = next(i for i, e in enumerate(entries) if e["kind"] == "dtlsStateChanged"
                         and e["payload"]["layer"] == "connection" and e["payload"]["state"] == "connected")
        assert order.index("publishSuccess") < connected < order.index("streamCreated"), order

        # A subscription whose client never answers is ended at the same deadline, with the reason.
        data = await bob.client.request("subscribe", stream_id=stream_id)
        ended = await bob.client.wait_event("subscriptionEnded", timeout=CONNECT_TIMEOUT_S + 20,
                                            subscription_id=data["subscription_id"])
        assert ended["data"]["reason"] == "networkDisconnected"
        texts = [e["text"] for e in get_json(url, support)["events"]
                 if e["kind"] == "unsubscribed" and e["payload"].get("subscription_id") == data["subscription_id"]]
        assert texts and "not connected (ICE and DTLS)" in texts[0], texts
        # The connected publish was not reaped.
        assert "streamDestroyed" not in [e["event"] for e in bob.client.events]
    finally:
        for pc in stuck:
            await pc.close()
        for p in (bob, alice):
            await p.close()
