"""H264 through the SFU router with real aiortc peers over loopback: relayed without
transcoding, new subscribers start on an IDR access unit, the frame size comes from the
SPS, and the codec is chosen per publish (VP8 first) or refused with a coded error."""

from __future__ import annotations

import re

import pytest
from aiortc import RTCSessionDescription

from media import aiortc_internals
from media.errors import CodecNotSupported
from media.events import DimensionsChanged, MediaEvent
from media.router import Router
from tests.helpers import wait_until
from tests.media.h264_checks import starts_idr_access_unit
from tests.media.peers import MovingVideoTrack, Subscriber, publisher_offer


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


def video_codecs(sdp: str) -> list[str]:
    """The video section's rtpmap codec names and fmtp lines, in order."""
    video = sdp.split("m=video", 1)[1].split("\nm=", 1)[0]
    return [a or b for a, b in re.findall(r"^a=(?:rtpmap:\d+ (\S+)|fmtp:\d+ (.*?))\r?$", video, re.M)]


async def test_h264_is_relayed_and_a_late_subscriber_starts_on_an_idr() -> None:
    events: list[MediaEvent] = []
    # Keyframe requests at most every 3 s: when the late subscriber starts, delta frames flow
    # and only the keyframe gate keeps them from it (without the gate its first packet is a
    # delta frame's).
    router = Router(observer=events.append, sample_interval_s=1.0, pli_interval_s=3.0)
    pub = await publisher_offer(video_codec="video/H264")
    subs = [Subscriber(), Subscriber()]
    try:
        answer = await router.publish("st1", pub.localDescription.sdp)
        assert [c for c in video_codecs(answer) if not c.startswith("apt=")] == [
            "H264/90000", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f", "rtx/90000"]
        await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

        offer = await router.subscribe("sub1", "st1")
        # The subscriber is offered the publisher's codec and fmtp, nothing else.
        assert video_codecs(offer) == [
            "H264/90000", "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"]
        await router.answer("sub1", await subs[0].answer(offer))
        # 60 frames (2 s): the keyframes of the start are behind, delta frames flow.
        await wait_until(lambda: len(subs[0].received.frames) >= 60, timeout=30, message="60 H264 frames")
        assert {(w, h) for _, w, h, _ in subs[0].received.frames} == {(640, 480)}

        # A late subscriber: its first video packet heads an IDR access unit (the one its PLI
        # asked for, or an earlier one if the publisher sent it first).
        offer = await router.subscribe("sub2", "st1")
        await router.answer("sub2", await subs[1].answer(offer))
        await wait_until(lambda: bool(subs[1].received.frames), timeout=30, message="the late subscriber's frame")
        assert starts_idr_access_unit(subs[1].first_payload["video"])
        assert subs[1].received.frames[0][1:] == (640, 480, True)  # decoded as a keyframe
        # The timeline's frame size comes from the SPS, reported once.
        assert [(e.width, e.height) for e in events if isinstance(e, DimensionsChanged)] == [(640, 480)]
    finally:
        for sub in subs:
            await sub.close()
        await pub.close()
        await router.close()


async def test_vp8_is_chosen_when_both_are_offered() -> None:
    router = Router()
    pub = await publisher_offer()  # aiortc offers VP8, then H264
    try:
        assert "H264/90000" in video_codecs(pub.localDescription.sdp)
        answer = await router.publish("st1", pub.localDescription.sdp)
        assert [c for c in video_codecs(answer) if not c.startswith("apt=")] == ["VP8/90000", "rtx/90000"]
        assert video_codecs(await router.subscribe("sub1", "st1")) == ["VP8/90000"]
    finally:
        await pub.close()
        await router.close()


@pytest.mark.parametrize("munge", [
    pytest.param(lambda sdp: re.sub(r"^m=video \d+", "m=video 0", sdp, flags=re.M), id="video rejected"),
    pytest.param(lambda sdp: sdp.replace("H264/90000", "VP8/90000"), id="VP8 only"),
    pytest.param(lambda sdp: sdp.replace("packetization-mode=1", "packetization-mode=0"), id="mode 0"),
    pytest.param(lambda sdp: sdp.replace("profile-level-id=42e01f", "profile-level-id=64001f"), id="high"),
])
async def test_a_subscriber_that_cannot_receive_h264_gets_a_coded_error(munge: object) -> None:
    router = Router()
    pub = await publisher_offer(video_codec="video/H264")
    sub = Subscriber()
    try:
        answer = await router.publish("st1", pub.localDescription.sdp)
        await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        offer = await router.subscribe("sub1", "st1")
        good = await sub.answer(offer)
        assert callable(munge)
        with pytest.raises(CodecNotSupported) as refused:
            await router.answer("sub1", munge(good))
        assert refused.value.code == "codec_not_supported"
        assert 'cannot receive H264 (profile-level-id 42e01f, packetization-mode 1), the video codec stream "st1"' \
            in str(refused.value)
        # The offer still stands: a client that can receive it answers and gets video.
        await router.answer("sub1", good)
        await wait_until(lambda: bool(sub.received.frames), timeout=30, message="a frame after the good answer")
    finally:
        await sub.close()
        await pub.close()
        await router.close()


async def test_a_publish_without_a_relayed_video_codec_is_refused() -> None:
    router = Router()
    pub = await publisher_offer(video_codec="video/H264")
    try:
        sdp = pub.localDescription.sdp.replace("packetization-mode=1", "packetization-mode=0")
        with pytest.raises(CodecNotSupported) as refused:
            await router.publish("st1", sdp)
        assert "no codec the server relays (offered: H264 (profile-level-id 42001f, packetization-mode 0), " \
            "H264 (profile-level-id 42e01f, packetization-mode 0); accepted: VP8, or H264" in str(refused.value)
        assert not router.publishes
    finally:
        await pub.close()
        await router.close()


async def test_a_new_frame_size_is_read_from_the_new_sps() -> None:
    events: list[MediaEvent] = []
    router = Router(observer=events.append)
    pub = await publisher_offer(video_codec="video/H264")
    sub = Subscriber()
    try:
        answer = await router.publish("st1", pub.localDescription.sdp)
        await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await router.answer("sub1", await sub.answer(await router.subscribe("sub1", "st1")))
        # 40 frames (> 1 s, SPS_PARSE_INTERVAL_S) at 640x480 first.
        await wait_until(lambda: len(sub.received.frames) >= 40, timeout=30, message="640x480 frames")
        # The camera switches to 320x240: aiortc's encoder restarts with a new SPS and an IDR.
        track = next(s.track for s in pub.getSenders() if s.track is not None and s.track.kind == "video")
        assert isinstance(track, MovingVideoTrack)
        track.width, track.height = 320, 240
        await wait_until(lambda: (320, 240) in {(w, h) for _, w, h, _ in sub.received.frames}, timeout=30,
                         message="320x240 frames")
        await wait_until(lambda: len([e for e in events if isinstance(e, DimensionsChanged)]) >= 2, timeout=30,
                         message="a second dimensionsChanged")
        assert [(e.width, e.height) for e in events if isinstance(e, DimensionsChanged)] == [(640, 480), (320, 240)]
    finally:
        await sub.close()
        await pub.close()
        await router.close()
