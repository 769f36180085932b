"""A real call through a real `openconsult serve`: aiortc clients over the wire
protocol, ICE/DTLS/SRTP on loopback, media relayed by the SFU without transcoding."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from media import aiortc_internals
from rooms.model import Role
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


@pytest.fixture
def probed_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    probe = tmp_path / "codec-probe.txt"
    probe.write_text("")
    server = start_server(tmp_path, module="tests.codec_probe", env={"CODEC_PROBE_FILE": str(probe)})
    yield server, probe
    server.stop()


async def test_three_party_call_forwards_media_without_codecs(probed_server: tuple[ServerProcess, Path]) -> None:
    server, probe = probed_server
    tokens = authority(server.data_dir)
    room = f"room-{uuid.uuid4().hex[:8]}"
    alice, bob, carol = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob"), \
        Participant(server.ws_url, "Carol")
    try:
        joined_a = await alice.join(tokens, room, Role.CLINICIAN)
        joined_b = await bob.join(tokens, room, Role.PATIENT)
        assert joined_a["session_id"] == joined_b["session_id"]
        assert [c["name"] for c in joined_b["connections"]] == ["Alice"]
        await alice.client.wait_event("connectionCreated", connection__name="Bob")

        stream_a = await alice.publish()
        stream_b = await bob.publish()
        await bob.client.wait_event("streamCreated", stream__stream_id=stream_a)
        await alice.client.wait_event("streamCreated", stream__stream_id=stream_b)
        sub_ab = await alice.subscribe(stream_b)
        sub_ba = await bob.subscribe(stream_a)

        await wait_until(lambda: len(sub_ab.received.frames) > 5 and len(sub_ba.received.frames) > 5,
                         timeout=60, message="first video frames both ways")
        start = time.monotonic()
        await wait_until(lambda: time.monotonic() - start >= 5, timeout=10)
        for sub in (sub_ab, sub_ba):
            frames = sub.received.video_frames_since(start)
            assert {(w, h) for _, w, h, _ in frames} == {(640, 480)}
            print(f"{len(frames) / 5:.1f} fps, {sub.received.audio_frames} audio frames")
            assert len(frames) / 5 >= 25, f"{len(frames) / 5:.1f} fps"
            assert sub.received.audio_frames >= 200  # 20 ms frames: ≥ 4 s of the 5 s

        # A third participant joins late: its first decoded frame comes within 1 s.
        joined_c = await carol.join(tokens, room)
        assert {s["stream_id"] for s in joined_c["streams"]} == {stream_a, stream_b}
        sub_ca = await carol.subscribe(stream_a)
        await wait_until(lambda: sub_ca.received.first_frame_at is not None, timeout=30, message="Carol's frame")
        assert sub_ca.received.first_frame_at is not None
        delay = sub_ca.received.first_frame_at - carol.answered_at[stream_a]
        print(f"late joiner: first frame {delay * 1000:.0f} ms after its answer")
        assert delay < 1.0, f"first frame {delay:.2f}s after the answer"
        assert sub_ca.received.frames[0][1:3] == (640, 480)

        # Support sees the call: the event log in order, and a quality timeline per track.
        support = tokens.mint("support", Role.SUPPORT, "Support")
        session_id = joined_a["session_id"]
        events = get_json(f"{server.url}/api/sessions/{session_id}/events", support)["events"]
        kinds = [e["kind"] for e in events]
        for kind in ("serverDetectedConnect", "successfullyJoined", "publishSuccess", "streamCreated",
                     "subscribeSuccess", "iceStateChanged", "dtlsStateChanged", "keyframeRequested",
                     "dimensionsChanged"):
            assert kind in kinds, kind
        assert "qualitySample" not in kinds
        assert kinds.index("publishAttempt") < kinds.index("publishSuccess") < kinds.index("subscribeSuccess")
        pairs = [e["payload"]["candidate_pair"] for e in events
                 if e["kind"] == "iceStateChanged" and e["payload"]["state"] == "completed"]
        assert pairs and pairs[0]["local_type"] == "host" and pairs[0]["protocol"] == "udp"
        samples = get_json(f"{server.url}/api/sessions/{session_id}/quality", support)["samples"]
        video_out = [s for s in samples if s["kind"] == "video" and s["direction"] == "out" and s["packets"]]
        video_in = [s for s in samples if s["kind"] == "video" and s["direction"] == "in" and s["packets"]]
        assert video_out and video_in
        assert max(s["frame_rate"] for s in video_out) >= 25 and {s["width"] for s in video_in} == {640}
        assert all(s["bitrate_kbps"] > 0 for s in video_out)
        # Operators see the same traffic in Prometheus, folded from the samples.
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        forwarded = re.search(r'^openconsult_rtp_packets_forwarded_total\{kind="video"\} (\S+)$', exposition, re.M)
        assert forwarded and float(forwarded.group(1)) >= sum(s["packets"] for s in video_out) > 0
    finally:
        for p in (carol, bob, alice):
            await p.close()

    # The clients in this process built decoders; the server must have built none.
    assert probe.read_text() == "", probe.read_text()[:2000]
