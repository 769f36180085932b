"""Synthetic clients against a real ``openconsult serve``: their TrackStats show what
their network profiles and the publisher did, and the server sees them behave like
browsers (receiver reports, REMB, NACK). Packet counts and bitrates only; no timing
assertions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest import synthetic
from loadtest.synthetic import MediaSpec, NetworkProfile, Participant, TrackStats, encoded_media
from media import aiortc_internals
from rooms.model import Role
from tests.call_helpers import authority, get_json
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server

pytestmark = pytest.mark.slow

#: 2 Mbit/s gives ~200 video packets a second, so a few thousand take seconds.
FAST = MediaSpec(bitrate_kbps=2000)
#: Enough video packets that 10 % random loss lands within 10 +- 2 % (about 3 standard deviations).
LOSS_SAMPLE = 2500


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


@pytest.fixture(scope="module")
def media_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One encode for the module, of a 4 s loop (a run loops it; 10 s by default)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "MEDIA_SECONDS", 4.0)
        yield tmp_path_factory.mktemp("media-cache")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(tmp_path)
    yield server
    server.stop()


def track(p: Participant, kind: str, direction: str = "recv") -> TrackStats:
    [stats] = [s for s in p.track_stats() if s.direction == direction and s.kind == kind]
    return stats


def quality(server: ServerProcess, session_id: str, peer_id: str, kind: str) -> list[dict[str, Any]]:
    """The server's downstream quality samples of one subscription's track."""
    support = authority(server.data_dir).mint("support", Role.SUPPORT, "Support")
    samples: list[dict[str, Any]] = get_json(f"{server.url}/api/sessions/{session_id}/quality", support)["samples"]
    return [s for s in samples if s["peer_id"] == peer_id and s["kind"] == kind and s["direction"] == "out"]


async def joined(server: ServerProcess, room: str, *participants: Participant) -> str:
    tokens = authority(server.data_dir)
    session_id = ""
    for i, p in enumerate(participants):
        data = await p.join(tokens.mint(room, Role.CLINICIAN if i == 0 else Role.PATIENT, p.name))
        session_id = data["session_id"]
    return session_id


async def test_downstream_loss_shows_on_the_lossy_subscriber_only_and_mute_stops_one_kind(
        server: ServerProcess, media_cache: Path) -> None:
    room = f"room-{uuid.uuid4().hex[:8]}"
    pub = Participant(server.ws_url, "Pub", cache_dir=media_cache)
    clean = Participant(server.ws_url, "Clean", cache_dir=media_cache)
    lossy = Participant(server.ws_url, "Lossy", NetworkProfile(loss_pct=10, direction="down"), media_cache)
    try:
        session_id = await joined(server, room, pub, clean, lossy)
        stream = await pub.publish(FAST)
        assert pub.stream_id == stream
        subscriptions = {}
        for p in (clean, lossy):
            await p.client.wait_event("streamCreated", stream__stream_id=stream)
            subscriptions[p.name] = await p.subscribe(stream, "Pub")
        await wait_until(lambda: min(track(p, "video").packets_expected for p in (clean, lossy)) >= LOSS_SAMPLE,
                         timeout=60, message=f"{LOSS_SAMPLE} video packets at both subscribers")

        # The clean subscriber got what was sent: expected and received agree within 2 %.
        for kind in ("audio", "video"):
            stats = track(clean, kind)
            assert stats.packets_expected > 0 and stats.peer_name == "Pub" and stats.stream_id == stream
            assert stats.packets >= 0.98 * stats.packets_expected, stats
            assert stats.loss_pct < 2 and stats.recovered <= 0.02 * stats.packets_expected, stats
            assert stats.first_packet_at is not None and stats.first_frame_at is not None
        video = track(clean, "video")
        assert video.frames > 0 and video.bitrate_kbps > 0 and video.bytes > 0
        # The lossy one: 10 +- 2 % on video before recovery, NACKed back to (nearly) nothing after.
        video = track(lossy, "video")
        assert 8 <= video.loss_pct <= 12, video
        assert video.recovered > 0.5 * (video.packets_expected - video.packets) and video.nacks > 0, video
        assert video.residual_loss_pct < 2, video
        assert video.frames > 0
        audio = track(lossy, "audio")  # no NACK for audio: the loss stays (fewer packets, wider bounds)
        assert 4 <= audio.loss_pct <= 16 and audio.recovered == 0, audio
        # Only receive tracks at the subscribers; the publisher's send tracks count what it sent.
        assert {(s.kind, s.direction) for s in lossy.track_stats()} == {("audio", "recv"), ("video", "recv")}
        sent = track(pub, "video", "send")
        assert sent.packets >= video.packets_expected and sent.peer_name == "" and sent.plis >= 1

        # The server saw browser-like RTCP: receiver reports (jitter) and REMB from
        # both, and NACKs it answered from the lossy one only.
        def rtcp_seen() -> bool:
            for name, nacked in (("Clean", False), ("Lossy", True)):
                samples = quality(server, session_id, subscriptions[name], "video")
                if not (any(s["jitter_ms"] is not None for s in samples)
                        and any(s["remb_kbps"] for s in samples)
                        and any(s["nacks"] and s["retransmitted"] for s in samples) == nacked):
                    return False
            return True
        await wait_until(rtcp_seen, timeout=30, message="receiver reports, REMB and NACKs at the server")

        # Muting video stops it at the publisher and the subscriber while audio goes on;
        # unmuting resumes it with a keyframe, and the gap shows as a freeze.
        await pub.set_muted("video", True)
        muted_at, muted_packets = time.monotonic(), track(pub, "video", "send").packets
        audio_at = track(clean, "audio").packets
        await wait_until(lambda: track(clean, "audio").packets >= audio_at + 100, message="two seconds of audio")
        assert track(pub, "video", "send").packets <= muted_packets + 20  # at most the frame on its way
        before = track(clean, "video")
        await pub.set_muted("video", False)
        muted_for = time.monotonic() - muted_at
        await wait_until(lambda: track(clean, "video").frames >= before.frames + 30, message="video again")
        after = track(clean, "video")
        assert after.freezes > before.freezes, (before, after)
        assert after.freeze_duration_s - before.freeze_duration_s >= 0.5 * muted_for, (muted_for, before, after)
        assert track(pub, "video", "send").packets > muted_packets + 20
        with pytest.raises(ValueError, match="screen"):
            await pub.set_muted("screen", True)

        await lossy.unsubscribe(stream)
        await pub.unpublish()
        assert [pub.stream_id] == [None]  # (a list: mypy still holds the str from above)
        assert {s.direction for s in pub.track_stats()} == {"send"}  # ended tracks stay readable
        assert len(lossy.track_stats()) == 2
    finally:
        for p in (pub, clean, lossy):
            await p.leave()
        await pub.close()  # idempotent


async def test_upstream_loss_shows_at_the_subscriber_and_a_bandwidth_cap_as_bitrate(
        server: ServerProcess, media_cache: Path) -> None:
    room = f"room-{uuid.uuid4().hex[:8]}"
    pub = Participant(server.ws_url, "Pub", NetworkProfile(loss_pct=10, direction="up"), media_cache)
    sub = Participant(server.ws_url, "Sub", cache_dir=media_cache)
    capped = Participant(server.ws_url, "Capped", NetworkProfile(bandwidth_kbps=300, direction="down"),
                         media_cache)
    try:
        await joined(server, room, pub, sub, capped)
        stream = await pub.publish(FAST)
        for p in (sub, capped):
            await p.client.wait_event("streamCreated", stream__stream_id=stream)
            await p.subscribe(stream, "Pub")
        await wait_until(lambda: track(sub, "video").packets_expected >= LOSS_SAMPLE,
                         timeout=60, message=f"{LOSS_SAMPLE} video packets at the subscriber")
        # Lost on the publisher's uplink: the gaps reach the subscriber; the server
        # NACKs the publisher, which resends from its history, so most come back late.
        video = track(sub, "video")
        assert 8 <= video.loss_pct <= 12, video
        assert video.recovered > 0.5 * (video.packets_expected - video.packets), video
        assert 4 <= track(sub, "audio").loss_pct <= 16
        # The publisher's own stats are what it sent: the loss is not on its side.
        assert track(pub, "video", "send").loss_pct == 0
        # 2 Mbit/s offered through a 300 kbit/s downlink: what arrives stays under the cap.
        received = sum(track(capped, kind).bitrate_kbps for kind in ("audio", "video"))
        assert 0 < received < 300, received
        assert track(capped, "video").loss_pct > 50
    finally:
        for p in (pub, sub, capped):
            await p.close()


async def test_media_is_encoded_once_near_its_target_and_then_read_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "MEDIA_SECONDS", 3.0)
    spec = MediaSpec(width=320, height=240, bitrate_kbps=400)
    media = await encoded_media(spec, tmp_path)
    files = list(tmp_path.glob("*.media"))
    assert [f.name for f in files] == [f"{synthetic.media_key(spec)}.media"]
    assert abs(media.video_bitrate - 400_000) <= 0.15 * 400_000, media.video_bitrate
    assert media.video[0].keyframe and (media.width, media.height, media.fps) == (320, 240, 30)
    assert await encoded_media(spec, tmp_path) is media  # this process: from memory

    def no_encoding(**kwargs: Any) -> None:
        raise AssertionError("encoded again instead of reading the cache")

    monkeypatch.setattr(synthetic, "encode_media", no_encoding)
    monkeypatch.setattr(synthetic, "_memory", {})
    assert await encoded_media(spec, tmp_path) == media  # another process: from the file
    with pytest.raises(AssertionError, match="encoded again"):
        await encoded_media(MediaSpec(width=320, height=240, bitrate_kbps=500), tmp_path)
    with pytest.raises(ValueError, match="codec"):
        MediaSpec(codec="h265")
