"""H264 through a real `openconsult serve`: two aiortc clients that offer only H264 decode
each other, a late joiner starts on an IDR access unit, the server builds no codec, and a
client that cannot receive H264 gets `codec_not_supported` on the wire."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from media import aiortc_internals
from rooms.model import Role
from loadtest.client import RequestFailed
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import wait_until
from tests.media.h264_checks import starts_idr_access_unit
from tests.media.peers import Subscriber, publisher_offer
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


async def test_h264_call_between_aiortc_clients(probed_server: tuple[ServerProcess, Path]) -> None:
    server, probe = probed_server
    tokens = authority(server.data_dir)
    room = f"room-{uuid.uuid4().hex[:8]}"
    alice, bob, carol = (Participant(server.ws_url, name) for name in ("Alice", "Bob", "Carol"))
    try:
        joined = await alice.join(tokens, room, Role.CLINICIAN)
        await bob.join(tokens, room, Role.PATIENT)
        stream_a = await alice.publish(video_codec="video/H264")
        stream_b = await bob.publish(video_codec="video/H264")
        assert alice.publisher is not None and bob.publisher is not None
        for publisher in (alice.publisher, bob.publisher):
            assert "H264/90000" in publisher.remoteDescription.sdp and "VP8" not in publisher.remoteDescription.sdp
        await bob.client.wait_event("streamCreated", stream__stream_id=stream_a)
        await alice.client.wait_event("streamCreated", stream__stream_id=stream_b)
        sub_ab = await alice.subscribe(stream_b)
        sub_ba = await bob.subscribe(stream_a)
        await wait_until(lambda: len(sub_ab.received.frames) > 10 and len(sub_ba.received.frames) > 10,
                         timeout=60, message="H264 frames both ways")
        for sub in (sub_ab, sub_ba):
            assert {(w, h) for _, w, h, _ in sub.received.frames} == {(640, 480)}
            assert "H264/90000" in sub.pc.remoteDescription.sdp and "VP8" not in sub.pc.remoteDescription.sdp

        # A late joiner's first video packet heads an IDR access unit, and decodes as a keyframe.
        await carol.join(tokens, room)
        sub_ca = await carol.subscribe(stream_a)
        await wait_until(lambda: bool(sub_ca.received.frames), timeout=30, message="Carol's first frame")
        assert starts_idr_access_unit(sub_ca.first_payload["video"])
        assert sub_ca.received.frames[0][1:] == (640, 480, True)

        # A client that cannot receive H264 gets a coded error at answer time, not black video.
        data = await carol.client.request("subscribe", stream_id=stream_b)
        refusing = Subscriber()
        try:
            answer = (await refusing.answer(data["offer"]["sdp"])).replace("H264/90000", "VP8/90000")
            with pytest.raises(RequestFailed) as refused:
                await carol.client.request("answer", subscription_id=data["subscription_id"],
                                           answer={"type": "answer", "sdp": answer})
            assert refused.value.code == "codec_not_supported"
            assert f'cannot receive H264 (profile-level-id 42e01f, packetization-mode 1), the video codec stream ' \
                f'"{stream_b}" is published in' in refused.value.message
        finally:
            await refusing.close()
        # A publish offering no codec the SFU relays is refused the same way.
        publisher = await publisher_offer(video_codec="video/H264")
        try:
            offer = publisher.localDescription.sdp.replace("packetization-mode=1", "packetization-mode=0")
            with pytest.raises(RequestFailed) as refused:
                await carol.client.request("publish", offer={"type": "offer", "sdp": offer})
            assert refused.value.code == "codec_not_supported"
        finally:
            await publisher.close()

        # The timeline knows the frame size from the SPS.
        support = tokens.mint("support", Role.SUPPORT, "Support")
        events = get_json(f"{server.url}/api/sessions/{joined['session_id']}/events", support)["events"]
        sizes = [(e["payload"].get("width"), e["payload"].get("height"))
                 for e in events if e["kind"] == "dimensionsChanged"]
        assert sizes and set(sizes) == {(640, 480)}
        failures = [e for e in events if e["kind"] == "subscribeFailure"]
        assert len(failures) == 1 and "cannot receive H264" in failures[0]["text"]
    finally:
        for p in (carol, bob, alice):
            await p.close()

    # The clients in this process built H264 decoders and encoders; the server built none.
    assert probe.read_text() == "", probe.read_text()[:2000]
