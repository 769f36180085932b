"""The SFU router with real aiortc peers over loopback (no signalling in between)."""

from __future__ import annotations

import time

import pytest
from aiortc import RTCSessionDescription

from media import aiortc_internals
from media.events import MediaEvent, QualitySample
from media.router import Router
from tests.helpers import wait_until
from tests.media.peers import Subscriber, publisher_offer


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


async def test_forwards_vp8_and_opus_without_transcoding() -> None:
    events: list[MediaEvent] = []
    router = Router(observer=events.append, sample_interval_s=1.0)
    pub = await publisher_offer()
    answer = await router.publish("st1", pub.localDescription.sdp)
    await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    sub = Subscriber()
    offer = await router.subscribe("sub1", "st1")
    await router.answer("sub1", await sub.answer(offer))
    try:
        await wait_until(lambda: len(sub.received.frames) >= 10, timeout=30, message="10 video frames")
        start = time.monotonic()
        await wait_until(lambda: time.monotonic() - start > 3, timeout=10)
        frames = sub.received.video_frames_since(start)
        assert {(w, h) for _, w, h, _ in frames} == {(640, 480)}
        assert len(frames) / 3 >= 25
        assert sub.received.audio_frames > 50
        await wait_until(lambda: any(isinstance(e, QualitySample) and e.direction == "out" for e in events),
                         timeout=10, message="an outbound quality sample")
    finally:
        await sub.close()
        await pub.close()
        await router.close()
