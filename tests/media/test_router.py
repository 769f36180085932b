"""The SFU router with real aiortc peers over loopback (no signalling in between)."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections.abc import AsyncIterator

import aioice
import pytest
from aiortc import RTCSessionDescription
from aiortc.rtp import RTCP_RTPFB_NACK, RtcpReceiverInfo, RtcpRrPacket, RtcpRtpfbPacket

from media import aiortc_internals
from media.errors import MediaError, OverCapacity
from media.events import (
    ForwardDropReason,
    KeyframeRequested,
    MediaEvent,
    MediaFlowChanged,
    PacketsDropped,
    PeerClosedUnconnected,
    PeerFailed,
    PeerStateChanged,
    PeerTimedOut,
    QualitySample,
)
from media.router import MAX_REMOTE_CANDIDATES, NACK_CACHE_MAX_SLOTS, NACK_CACHE_MIN_SLOTS, ForwardingSender, Router
from media.rtp import vp8_is_keyframe
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
        # Header extensions are rewritten for the subscriber's leg: mid, and the audio level kept.
        assert sub.first_extensions["audio"].audio_level is not None
        assert sub.first_extensions["audio"].mid == sub.pc.getTransceivers()[0].mid
        assert sub.first_extensions["video"].abs_send_time is not None
        # Both of the node's peer connections ran DTLS with its one certificate and one context.
        transports = [t for peer in (router.publishes["st1"], router.subscriptions["sub1"])
                      for t in aiortc_internals.dtls_transports(peer.pc)]
        assert len({t.getLocalParameters().fingerprints[0].value for t in transports}) == 1
        contexts = {id(t._ssl.get_context()) if t._ssl is not None else None for t in transports}
        assert len(contexts) == 1 and None not in contexts
        await wait_until(lambda: any(isinstance(e, QualitySample) and e.direction == "out" for e in events),
                         timeout=10, message="an outbound quality sample")
    finally:
        await sub.close()
        await pub.close()
        await router.close()


class Call:
    """One publisher and one subscriber through an in-process Router."""

    def __init__(self) -> None:
        self.events: list[MediaEvent] = []
        self.router = Router(observer=self.events.append, sample_interval_s=1.0, pli_interval_s=0.5)
        self.sub = Subscriber()

    async def start(self) -> Call:
        self.pub = await publisher_offer()
        answer = await self.router.publish("st1", self.pub.localDescription.sdp)
        await self.pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        offer = await self.router.subscribe("sub1", "st1")
        await self.router.answer("sub1", await self.sub.answer(offer))
        await wait_until(lambda: len(self.sub.received.frames) >= 3, timeout=30, message="video frames")
        return self

    def forwarder(self, kind: str) -> ForwardingSender:
        return next(f for f in self.router.subscriptions["sub1"].senders if f.kind == kind)

    async def close(self) -> None:
        await self.sub.close()
        await self.pub.close()
        await self.router.close()


@pytest.fixture
async def call() -> AsyncIterator[Call]:
    c = await Call().start()
    yield c
    await c.close()


async def test_published_tracks_start_no_decoder_thread_and_hold_no_unused_buffers(call: Call) -> None:
    # aiortc starts an (idle) decoder thread per received track; the SFU decodes nothing.
    receivers = [t.receiver for t in call.router.publishes["st1"].tracks.values()]
    assert len(receivers) == 2
    assert all(r._RTCRtpReceiver__started and r._RTCRtpReceiver__decoder_thread is None  # type: ignore[attr-defined]
               for r in receivers)
    # Nor do the server's receivers (a subscription's too) keep aiortc's bandwidth estimator.
    receivers += [t.receiver for t in call.router.subscriptions["sub1"].pc.getTransceivers()]
    assert all(r._RTCRtpReceiver__remote_bitrate_estimator is None for r in receivers)  # type: ignore[attr-defined]
    # The subscriber (a real aiortc client) decodes in its own threads: only the server's are absent.
    assert len([t for t in threading.enumerate() if t.name.endswith("-decoder")]) == 2


async def test_published_rtp_bypasses_aiortcs_receive_queue_and_keeps_receiver_statistics(call: Call) -> None:
    # The demultiplexer unprotects and delivers SRTP RTP itself: aiortc's DTLS receive task
    # (which counts every datagram it takes off aioice's queue) sees only DTLS and RTCP.
    publish = call.router.publishes["st1"]
    [transport] = aiortc_internals.dtls_transports(publish.pc)
    video = publish.tracks["video"]
    await wait_until(lambda: video.packets > 150, timeout=20, message="150 video packets")
    slow_path = transport._RTCDtlsTransport__rx_packets  # type: ignore[attr-defined]
    assert slow_path < video.packets / 5, (slow_path, video.packets)
    # The receiver reports and NACKs the publisher gets still come from the receiver's counters.
    stats = aiortc_internals.receiver_statistics(video.receiver)[video.media_ssrc]
    assert stats.packets_received >= video.packets > 150


async def test_forged_srtp_from_the_selected_pair_is_dropped_on_the_fast_path(call: Call) -> None:
    # Datagrams that look like RTP but fail SRTP (or are too short to be RTP) cost one
    # libsrtp check each: no exception in the datagram callback, no packet counted.
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        video = call.router.publishes["st1"].tracks["video"]
        stats = aiortc_internals.receiver_statistics(video.receiver)[video.media_ssrc]
        [client] = aiortc_internals.ice_connections(call.pub)
        pair = client._nominated[1]
        header = struct.pack("!BBHII", 0x80, 96, 1, 0, video.media_ssrc)
        received_before, frames_before = stats.packets_received, len(call.sub.received.frames)
        for datagram in (b"\x80\x60", header, header + os.urandom(100), header + os.urandom(1000)):
            for _ in range(10):
                pair.protocol.transport.sendto(datagram, pair.remote_addr)
        await wait_until(lambda: len(call.sub.received.frames) > frames_before + 30, timeout=20,
                         message="frames after the forged datagrams")
        assert errors == []
        # Only real packets were counted (≈ 30 frames of video and audio, never 40 more).
        assert video.packets <= stats.packets_received and stats.packets_received > received_before
    finally:
        loop.set_exception_handler(None)


async def test_late_subscriber_gets_a_pli_and_starts_on_a_keyframe(call: Call) -> None:
    late = Subscriber()
    try:
        offer = await call.router.subscribe("sub2", "st1")
        await call.router.answer("sub2", await late.answer(offer))
        await wait_until(lambda: bool(late.received.frames), timeout=10, message="the late subscriber's first frame")
        # The first video packet it got starts a VP8 keyframe, obtained with a PLI upstream.
        assert vp8_is_keyframe(late.first_payload["video"])
        requested = [e for e in call.events if isinstance(e, KeyframeRequested) and e.subscription_id == "sub2"]
        assert [e.reason for e in requested][:1] == ["new subscriber"]
    finally:
        await late.close()


async def test_nacks_are_answered_from_the_cache_or_sent_upstream(call: Call) -> None:
    fwd = call.forwarder("video")
    await wait_until(lambda: fwd.packets > 20, timeout=10)
    track = fwd.track
    newest = track.cache.seqs[track.cache.last]
    out_seqs = [fwd.translator.out_seq(newest - i) for i in range(5)]
    nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1234, media_ssrc=fwd.ssrc)
    nack.lost = out_seqs
    await fwd.on_rtcp(nack)
    assert fwd.retransmitted == len(out_seqs)
    # A sequence number long gone from the cache goes upstream as a NACK.
    before = track.nacks_sent
    gone = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1234, media_ssrc=fwd.ssrc)
    gone.lost = [(out_seqs[-1] + 30000) & 0xFFFF]
    await fwd.on_rtcp(gone)
    assert fwd.retransmitted == len(out_seqs) and track.nacks_sent == before + 1


async def test_keyframe_requests_are_rate_limited(call: Call) -> None:
    track = call.forwarder("video").track
    await wait_until(lambda: time.monotonic() - (track.pli.last or 0.0) > 0.6, timeout=5)
    sent = track.plis_sent
    track.request_keyframe("test")
    track.request_keyframe("test")
    track.request_keyframe("test")
    assert track.plis_sent == sent + 1 and track.pli.pending
    # A held-back request goes out on the router's next tick once the interval has passed
    # (unless a keyframe arrived meanwhile, which clears it).
    track.pli.pending = True
    track.tick(time.time(), time.monotonic() + 1.0)
    assert track.plis_sent == sent + 2 and not track.pli.pending


async def test_the_nack_cache_is_sized_by_the_tracks_packet_rate(call: Call) -> None:
    track = call.forwarder("video").track
    # Measure the publisher's packet rate over 2 s, then the cache must hold >= 1 s of it
    # without being more than 4x (the shrink hysteresis) above the power of two it needs.
    await wait_until(lambda: track.packets > 0, timeout=15)
    first, start = track.packets, time.monotonic()
    await wait_until(lambda: time.monotonic() - start >= 2.0, timeout=5)
    rate = (track.packets - first) / (time.monotonic() - start)
    await wait_until(lambda: track.cache.capacity >= min(rate, NACK_CACHE_MAX_SLOTS), timeout=5,
                     message=f"a cache of >= 1 s at {rate:.0f} packets/s")
    assert track.cache.capacity <= max(NACK_CACHE_MIN_SLOTS, 4 * track.cache.slots_for_rate(rate))
    assert track.cache.capacity < 2048  # what every video track held before, whatever its rate


async def test_drops_before_a_keyframe_are_counted_by_reason(call: Call) -> None:
    fwd = call.forwarder("video")
    await wait_until(lambda: fwd.packets > 20, timeout=10)
    frames = len(call.sub.received.frames)
    # The publisher's source changes (as its SSRC would): delta frames are held back until
    # the keyframe the subscriber asks for, each one counted; the timer reports them as an
    # event; the subscriber's numbering continues, so its decoder goes on.
    fwd.translator.source = 0
    fwd.translator.close()
    await wait_until(lambda: not fwd.translator.waiting, timeout=10, message="the keyframe")
    assert call.router.forward_drops[ForwardDropReason.WAITING_KEYFRAME] > 0
    assert [e.reason for e in call.events if isinstance(e, KeyframeRequested)][-1] == "new subscriber"
    await wait_until(lambda: any(isinstance(e, PacketsDropped) and e.counts[ForwardDropReason.WAITING_KEYFRAME]
                                 for e in call.events), timeout=5, message="a PacketsDropped event")
    await wait_until(lambda: len(call.sub.received.frames) > frames + 5, timeout=10, message="video again")


async def test_subscriber_gets_sender_reports_and_rtt(call: Call) -> None:
    fwd = call.forwarder("video")
    await wait_until(lambda: fwd.rtt_ms is not None, timeout=15, message="RTT from the subscriber's RR")
    assert fwd.rtt_ms is not None and 0 <= fwd.rtt_ms < 1000
    stats = await call.sub.pc.getStats()
    remote_out = [s for s in stats.values() if s.type == "remote-outbound-rtp" and s.kind == "video"]
    assert remote_out and 0 < remote_out[0].packetsSent <= fwd.packets


async def test_publisher_leg_samples_carry_an_rtt_from_stun(call: Call) -> None:
    """A publish only receives media: its RTT comes from the ICE agent's STUN round trips."""
    track = call.forwarder("video").track
    await wait_until(lambda: track.publish.stun_rtt.rtt_ms is not None, timeout=20,
                     message="a STUN round trip on the publish")
    await wait_until(lambda: any(isinstance(e, QualitySample) and e.direction == "in" and e.rtt_ms is not None
                                 for e in call.events), timeout=10, message="an upstream sample with an RTT")
    sample = next(e for e in call.events if isinstance(e, QualitySample) and e.direction == "in"
                  and e.rtt_ms is not None)
    assert sample.rtt_ms is not None and 0 <= sample.rtt_ms < 500


async def test_subscriber_leg_samples_count_loss_from_receiver_reports(call: Call) -> None:
    fwd = call.forwarder("audio")
    fwd.sample(0, 1.0)  # a fresh base
    report = RtcpRrPacket(ssrc=4321, reports=[RtcpReceiverInfo(
        ssrc=fwd.ssrc, fraction_lost=25, packets_lost=fwd.rr_packets_lost + 7, highest_sequence=0, jitter=0,
        lsr=0, dlsr=0)])
    await fwd.on_rtcp(report)
    sample = fwd.sample(1_000, 1.0)
    assert sample.packets_lost == 7 and sample.loss_pct == round(100 * 25 / 256, 2)
    assert fwd.sample(2_000, 1.0).packets_lost == 0  # cumulative: only the increase counts


async def test_an_unanswered_subscription_times_out() -> None:
    events: list[MediaEvent] = []
    router = Router(observer=events.append, answer_timeout_s=0.5)
    pub = await publisher_offer()
    try:
        answer = await router.publish("st1", pub.localDescription.sdp)
        await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await router.subscribe("sub1", "st1")  # and never answer
        await wait_until(lambda: any(isinstance(e, PeerFailed) and e.peer_id == "sub1" for e in events),
                         timeout=10, message="the subscription to fail")
        assert "sub1" not in router.subscriptions
    finally:
        await pub.close()
        await router.close()


async def test_stopped_and_resumed_media_is_reported() -> None:
    events: list[MediaEvent] = []
    router = Router(observer=events.append, idle_after_s=1.0)
    pub = await publisher_offer()
    try:
        answer = await router.publish("st1", pub.localDescription.sdp)
        await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        track = router.publishes["st1"].tracks["video"]
        await wait_until(lambda: track.packets > 10, timeout=30, message="video from the publisher")
        video_sender = next(s for s in pub.getSenders() if s.kind == "video")
        camera = video_sender.track
        video_sender.replaceTrack(None)  # the camera stops; the connection stays up

        def flow() -> list[tuple[str, bool]]:
            return [(e.kind, e.flowing) for e in events if isinstance(e, MediaFlowChanged)]

        await wait_until(lambda: flow() == [("video", False)], timeout=10, message="video reported stopped")
        video_sender.replaceTrack(camera)
        await wait_until(lambda: flow() == [("video", False), ("video", True)], timeout=10,
                         message="video reported flowing again")
    finally:
        await pub.close()
        await router.close()


async def test_unconnected_peers_are_reaped_and_the_node_is_capped() -> None:
    events: list[MediaEvent] = []
    router = Router(observer=events.append, connect_timeout_s=3.0, max_peer_connections=2)
    stuck, live = await publisher_offer(), await publisher_offer()
    try:
        await router.publish("stuck", stuck.localDescription.sdp)  # its client never applies the answer
        answer = await router.publish("live", live.localDescription.sdp)
        with pytest.raises(OverCapacity, match="media.max_peer_connections"):
            await router.subscribe("sub1", "live")
        await live.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_until(lambda: "stuck" not in router.publishes, timeout=10, message="the stuck publish reaped")
        assert [(e.peer_id, e.timeout_s) for e in events if isinstance(e, PeerTimedOut)] == [("stuck", 3.0)]
        assert router.publishes["live"].connected  # connected in time: kept
        await router.subscribe("sub1", "live")  # room again
    finally:
        for pc in (stuck, live):
            await pc.close()
        await router.close()


async def test_remote_candidates_per_peer_are_bounded() -> None:
    router = Router()
    pub = await publisher_offer()
    try:
        await router.publish("st1", pub.localDescription.sdp)
        for port in range(40000, 40000 + MAX_REMOTE_CANDIDATES):
            await router.add_ice_candidate("st1", {"candidate": f"candidate:{port} 1 udp 2122260223 127.0.0.1 {port} "
                                                                "typ host", "sdpMid": "0"})
        with pytest.raises(MediaError, match=f"{MAX_REMOTE_CANDIDATES} remote candidates"):
            await router.add_ice_candidate("st1", {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 39999 typ host",
                                                   "sdpMid": "0"})
        await router.add_ice_candidate("st1", None)  # the end-of-candidates marker still goes through
    finally:
        await pub.close()
        await router.close()


async def test_a_closing_subscription_reports_what_it_sent_since_the_last_sample(call: Call) -> None:
    """Every forwarded packet is in some outbound sample (and so in the forwarded-packets counter),
    the last partial interval included."""
    await wait_until(lambda: call.forwarder("video").packets > 50, timeout=30, message="video forwarded")
    sent = {kind: call.forwarder(kind).packets for kind in ("audio", "video")}
    await call.router.close_peer("sub1")
    reported = {kind: sum(e.packets for e in call.events
                          if isinstance(e, QualitySample) and e.direction == "out" and e.kind == kind)
                for kind in ("audio", "video")}
    # Packets may still go out between the read above and the close: at least what was read.
    assert all(reported[kind] >= sent[kind] for kind in sent), (reported, sent)
    assert all(reported[kind] <= sent[kind] + 20 for kind in sent), (reported, sent)


def _ice_only_offer(sdp: str, username: str, password: str) -> str:
    """A real publish offer with another ICE agent's credentials and no candidates: the agent
    answers ICE for it, and nothing ever answers DTLS."""
    lines = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:") or line == "a=end-of-candidates":
            continue
        if line.startswith("a=ice-ufrag:"):
            line = f"a=ice-ufrag:{username}"
        elif line.startswith("a=ice-pwd:"):
            line = f"a=ice-pwd:{password}"
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


async def test_ice_completed_is_not_reported_before_dtls_and_a_timeout_names_both_sides_candidates() -> None:
    # The far end nominates a pair (aioice: ICE "completed") but never speaks DTLS: the server must
    # not log ICE "completed", and the timeout reports how far it got and what each side offered.
    events: list[MediaEvent] = []
    router = Router(observer=events.append, connect_timeout_s=3.0)
    pub = await publisher_offer()
    agent = aioice.Connection(ice_controlling=True, components=1)
    try:
        await agent.gather_candidates()
        answer = await router.publish("st1", _ice_only_offer(pub.localDescription.sdp, agent.local_username,
                                                             agent.local_password))
        for candidate in agent.local_candidates:
            await router.add_ice_candidate("st1", {"candidate": "candidate:" + candidate.to_sdp(), "sdpMid": "0"})
        await router.add_ice_candidate("st1", None)
        for line in answer.splitlines():
            if line.startswith("a=ice-ufrag:"):
                agent.remote_username = line.split(":", 1)[1]
            elif line.startswith("a=ice-pwd:"):
                agent.remote_password = line.split(":", 1)[1]
            elif line.startswith("a=candidate:"):
                await agent.add_remote_candidate(aioice.Candidate.from_sdp(line[len("a=candidate:"):]))
        await agent.add_remote_candidate(None)
        await asyncio.wait_for(agent.connect(), timeout=10)  # ICE is done on both ends

        await wait_until(lambda: any(isinstance(e, PeerTimedOut) for e in events), timeout=10,
                         message="the publish reaped")
        timed_out = [e for e in events if isinstance(e, PeerTimedOut)]
        states = [(e.layer, e.state) for e in events if isinstance(e, PeerStateChanged)]
        assert ("ice", "completed") not in states and ("connection", "connected") not in states, states
        [event] = timed_out
        assert (event.peer_id, event.ice_state, event.timeout_s) == ("st1", "completed", 3.0)
        server_port = router_answer_port(answer)
        assert event.local_candidates == ({"type": "host", "protocol": "udp", "address": f"127.0.0.1:{server_port}"},)
        assert event.remote_candidates == tuple(
            {"type": c.type, "protocol": "udp", "address": f"{c.host}:{c.port}"} for c in agent.local_candidates)
    finally:
        await agent.close()
        await pub.close()
        await router.close()


def router_answer_port(sdp: str) -> int:
    ports = {line.split()[5] for line in sdp.splitlines() if line.startswith("a=candidate:")}
    assert len(ports) == 1, sdp
    return int(ports.pop())


async def test_a_connection_is_logged_ice_then_connected_once_dtls_is_up() -> None:
    # The held-back ICE state comes out, with its pair, right before the connection's "connected".
    events: list[MediaEvent] = []
    router = Router(observer=events.append)
    pub = await publisher_offer()
    try:
        answer = await router.publish("st1", pub.localDescription.sdp)
        await pub.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_until(lambda: router.publishes["st1"].connected, timeout=20, message="connected")
        states = [(e.layer, e.state) for e in events if isinstance(e, PeerStateChanged)]
        assert states == [("ice", "checking"), ("connection", "connecting"), ("ice", "completed"),
                          ("connection", "connected")], states
        pairs = [e.pair for e in events if isinstance(e, PeerStateChanged) and e.state in ("completed", "connected")]
        assert all(p is not None and p["local_type"] == "host" for p in pairs), pairs
    finally:
        await pub.close()
        await router.close()


async def test_a_peer_closed_before_it_connected_reports_what_each_side_offered() -> None:
    events: list[MediaEvent] = []
    router = Router(observer=events.append)
    stuck, live = await publisher_offer(), await publisher_offer()
    try:
        answer = await router.publish("stuck", stuck.localDescription.sdp)  # its client never applies it
        await router.add_ice_candidate("stuck", {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 9 typ host",
                                                 "sdpMid": "0"})
        peer = router.publishes["stuck"]
        await wait_until(lambda: peer.pc.iceConnectionState == "checking", timeout=10, message="ICE checking")
        router.report_unconnected("stuck")
        live_answer = await router.publish("live", live.localDescription.sdp)
        await live.setRemoteDescription(RTCSessionDescription(sdp=live_answer, type="answer"))
        await wait_until(lambda: router.publishes["live"].connected, timeout=20, message="connected")
        router.report_unconnected("live")  # connected: nothing to report
        router.report_unconnected("nobody")
        [event] = [e for e in events if isinstance(e, PeerClosedUnconnected)]
        assert (event.peer_id, event.ice_state) == ("stuck", "checking")
        assert event.local_candidates == ({"type": "host", "protocol": "udp",
                                           "address": f"127.0.0.1:{router_answer_port(answer)}"},)
        # The offer's own candidates (aiortc puts them in its SDP) and the trickled one, each once.
        assert {"type": "host", "protocol": "udp", "address": "127.0.0.1:9"} in event.remote_candidates
        assert len(event.remote_candidates) >= 2, event.remote_candidates
        assert len(set(map(str, event.remote_candidates))) == len(event.remote_candidates)
    finally:
        for pc in (stuck, live):
            await pc.close()
        await router.close()
