"""The SFU: one aiortc peer connection per publish and per subscription, and RTP
forwarding between them at the packet level.

A publish's receivers hand every RTP packet to its ``PublishedTrack``, which
forwards it to each ``ForwardingSender`` (one per subscriber track) with the
subscriber's own SSRC, sequence numbers, timestamp offset, payload type and
header extension ids. No decoder or encoder ever runs. Each publish is relayed in the
codec ``media.codecs`` chooses from its offer (Opus; VP8, else H264), and its subscribers
are offered exactly that codec; keyframes and frame sizes are read from the VP8 payload
header or the H264 NAL units (``media.rtp``, ``media.h264``). The RTCP work a real SFU
does is here too: keyframe requests (PLI) upstream for new subscribers and for
subscribers' PLI/FIR, rate limited; subscribers' NACKs answered from a packet
cache (unanswerable ones are NACKed upstream); sender reports per subscriber
track whose RTP/NTP mapping follows the publisher's; REMB upstream as the
lowest estimate of the subscribers.

The decisions are the pure parts of ``media/forwarder.py`` (translation and the
keyframe gate per subscriber, the packet cache and NACK responder, the PLI limiter,
REMB aggregation, SR times); this module wires them to aiortc, reads the clock and
sends. The hot path (``PublishedTrack.on_rtp`` → ``ForwardingSender.forward``) does
no I/O but the datagram send, no logging and no awaits; counters are plain ints
folded into ``QualitySample`` and ``PacketsDropped`` events by one timer.

Every datagram reaches aiortc through an RFC 7983 demultiplexer on each ICE
socket (``aiortc_internals.demux_datagrams``): junk, and media from anyone but the
selected pair, is dropped and counted (``DatagramsDropped`` each second). A peer
connection not connected within ``connect_timeout_s`` is closed
(``PeerTimedOut``, with the candidates each side offered), and the node holds at most
``max_peer_connections``. ICE "completed" is reported only once DTLS is connected too:
aioice completes as soon as the far end nominates a pair, and a pair it nominated can
still carry nothing (seen with Firefox and loopback-only candidates).

With a ``UdpMux`` (``media.udp_port``) every peer connection's ICE agent is put on the
node's shared sockets before its SDP is written (``aiortc_internals.use_udp_mux``); the
mux routes datagrams to it and counts its drops in the same ``datagram_drops``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiortc import RTCConfiguration, RTCIceCandidate, RTCRtpReceiver, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
    unpack_remb_fci,
)
from aiortc.sdp import SessionDescription, candidate_from_sdp

from media import aiortc_internals as internals
from media import codecs
from media.errors import AlreadyAnswered, MediaError, OverCapacity, PeerNotFound
from media.events import (
    DatagramDropReason,
    DatagramsDropped,
    DimensionsChanged,
    ForwardDropReason,
    KeyframeRequested,
    MediaEvent,
    MediaFlowChanged,
    Observer,
    PacketsDropped,
    PeerClosedUnconnected,
    PeerFailed,
    PeerStateChanged,
    PeerTimedOut,
    QualitySample,
)
from media.forwarder import NackResponder, PacketCache, PliLimiter, RembAggregator, RtpTranslator, sender_report_rtp_time
from media.h264 import find_sps, h264_is_keyframe, sps_frame_size
from media.rtp import (
    NTP_EPOCH_OFFSET,
    RtpWriter,
    nack,
    ntp_now,
    pli,
    remb,
    sender_report,
    vp8_is_keyframe,
    vp8_keyframe_size,
)
from media.udpmux import UdpMux

logger = logging.getLogger(__name__)

# Codecs the SFU relays (media/codecs.py): Opus, and VP8 or H264 chosen per publish. Both
# legs of a forwarded track use the publisher's codec.
#: The NACK cache of a published video track holds at least this much media at the track's
#: packet rate (rounded up to a power of two of slots), within these bounds: 1 Mbit/s VP8
#: (~120 packets/s) keeps 128 packets, about 150 KB.
NACK_CACHE_SECONDS = 1.0
NACK_CACHE_MIN_SLOTS = 64
NACK_CACHE_MAX_SLOTS = 2048
#: A publisher's H264 SPS is parsed (for its frame size) at most this often.
SPS_PARSE_INTERVAL_S = 1.0
#: Remote ICE candidates one peer connection accepts (a browser offers a handful to a few dozen).
MAX_REMOTE_CANDIDATES = 64
#: Candidates of one side kept in a failure report.
MAX_REPORTED_CANDIDATES = 64
URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
URI_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"


class PublishedTrack:
    """One incoming track of a publish and the subscribers it is forwarded to."""

    def __init__(self, router: Router, publish: PublishPeer, kind: str, receiver: RTCRtpReceiver,
                 rtcp_ssrc: int, codec: Any) -> None:
        self.router = router
        self.publish = publish
        self.kind = kind
        #: The codec this track is published (and relayed) in: an aiortc codec capability.
        self.codec = codec
        self.h264 = codec.mimeType.lower() == codecs.H264.lower()
        self.sps = b""  # the last SPS parsed (H264): its size is parsed once, not per keyframe
        self.sps_parsed_at = 0.0
        self.receiver = receiver
        self.rtcp_ssrc = rtcp_ssrc
        self.clock_rate = 90000 if kind == "video" else 48000
        self.video = kind == "video"
        self.media_ssrc = 0
        self.subscribers: tuple[ForwardingSender, ...] = ()
        self.cache = PacketCache(NACK_CACHE_SECONDS, NACK_CACHE_MIN_SLOTS, NACK_CACHE_MAX_SLOTS)
        # Publisher's last sender report: (NTP, RTP timestamp), the clock mapping.
        self.publisher_sr: tuple[int, int] | None = None
        self.pli = PliLimiter(router.pli_interval_s)
        self.remb = RembAggregator()
        self._rate_base = (0, 0.0)  # packets and monotonic time at the last cache sizing
        self.size: tuple[int, int] | None = None
        # Counters, folded into samples by the router's timer.
        self.packets = 0
        self.octets = 0
        self.frames = 0
        self.last_arrival = 0.0  # wall time of the last packet, for SR extrapolation
        self.idle = False  # reported as stopped (no packet for router.idle_after_s)
        self.plis_sent = 0
        self.nacks_sent = 0
        self._sample_base = (0, 0, 0, 0, 0, 0, 0)

    # --- hot path -------------------------------------------------------------

    def on_rtp(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        payload = packet.payload
        self.packets += 1
        self.octets += len(payload)
        self.media_ssrc = packet.ssrc
        self.last_arrival = now = time.time()
        keyframe = False
        if self.video:
            self.cache.put(packet.sequence_number, packet.timestamp, packet.marker, payload)
            if packet.marker:
                self.frames += 1
            if self.h264:
                # A packet with the SPS or the start of an IDR slice opens an IDR access unit.
                if h264_is_keyframe(payload):
                    keyframe = True
                    self.pli.keyframe_received()
                    size = self._h264_size(payload, now)
                    if size is not None and size != self.size:
                        self.size = size
                        self.router.emit(DimensionsChanged(self.publish.stream_id, size[0], size[1]))
            # Only a packet that starts partition 0 can start a keyframe (S=1, PID=0).
            elif payload and payload[0] & 0x17 == 0x10 and vp8_is_keyframe(payload):
                keyframe = True
                self.pli.keyframe_received()
                size = vp8_keyframe_size(payload)
                if size is not None and size != self.size:
                    self.size = size
                    self.router.emit(DimensionsChanged(self.publish.stream_id, size[0], size[1]))
            # abs-send-time (6.18 fixed-point seconds of NTP time), the same for every subscriber.
            variable = (int((now + NTP_EPOCH_OFFSET) * 262144.0) & 0x00FFFFFF).to_bytes(3, "big")
        else:
            # The audio level (V bit and level, RFC 6464) passes through; none: 127, silence.
            level = packet.extensions.audio_level
            variable = _LEVEL_BYTES[(0x80 if level[0] else 0) | (level[1] & 0x7F)] if level is not None \
                else _LEVEL_BYTES[0x7F]
        for sub in self.subscribers:
            sub.forward(packet, keyframe, variable, now)

    def _h264_size(self, payload: bytes, now: float) -> tuple[int, int] | None:
        """The frame size from an SPS this keyframe packet carries, parsed only when the SPS
        differs from the last one parsed (an encoder repeats the same SPS before every IDR),
        and at most once per ``SPS_PARSE_INTERVAL_S`` (~10 µs each: a publisher changing its SPS
        in every packet costs no more; a real change is read from the next keyframe's SPS)."""
        sps = find_sps(payload)
        if sps is None or sps == self.sps or now - self.sps_parsed_at < SPS_PARSE_INTERVAL_S:
            return None
        self.sps, self.sps_parsed_at = sps, now
        return sps_frame_size(sps)

    # --- RTCP towards the publisher -------------------------------------------

    def request_keyframe(self, reason: str, subscription_id: str | None = None) -> None:
        """Send a PLI upstream, at most once per ``pli_interval_s`` (held back until the
        publisher's first packet tells us its SSRC)."""
        if self.kind != "video":
            return
        if not self.media_ssrc:
            self.pli.hold()
            return
        if self.pli.request(time.monotonic()):
            self.send_pli(reason, subscription_id)

    def send_pli(self, reason: str, subscription_id: str | None = None) -> None:
        if self.publish.send_rtcp(pli(self.rtcp_ssrc, self.media_ssrc)):
            self.plis_sent += 1
            self.router.emit(KeyframeRequested(self.publish.stream_id, reason, subscription_id))

    def nack_upstream(self, lost: list[int]) -> None:
        if self.media_ssrc and self.publish.send_rtcp(nack(self.rtcp_ssrc, self.media_ssrc, lost)):
            self.nacks_sent += 1

    def on_rtcp(self, packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket):
            self.publisher_sr = (packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)

    def tick(self, now: float, monotonic: float) -> None:
        """Once a second (wall time ``now``): report media that stopped or resumed, retry a
        rate-limited PLI, send REMB as the subscribers' minimum, size the NACK cache."""
        if self.packets:
            silent = now - self.last_arrival
            if silent >= self.router.idle_after_s and not self.idle:
                self.idle = True
                self.router.emit(MediaFlowChanged(self.publish.stream_id, self.kind, False, self.router.idle_after_s))
            elif silent < self.router.idle_after_s and self.idle:
                self.idle = False
                self.router.emit(MediaFlowChanged(self.publish.stream_id, self.kind, True, 0.0))
        if self.kind != "video":
            return
        if self.media_ssrc and self.pli.retry(monotonic):
            self.send_pli("retry")
        if self.media_ssrc:
            estimate = self.remb.estimate(monotonic)
            if estimate is not None:
                self.publish.send_rtcp(remb(self.rtcp_ssrc, estimate, [self.media_ssrc]))
        base_packets, base_time = self._rate_base
        if base_time and monotonic > base_time:
            self.cache.resize_for_rate((self.packets - base_packets) / (monotonic - base_time))
        self._rate_base = (self.packets, monotonic)

    def add_subscriber(self, sub: ForwardingSender) -> None:
        self.subscribers = (*self.subscribers, sub)
        if self.kind == "video":
            self.request_keyframe("new subscriber", sub.subscription.peer_id)

    def remove_subscriber(self, sub: ForwardingSender) -> None:
        self.subscribers = tuple(s for s in self.subscribers if s is not sub)
        self.remb.remove(sub.ssrc)

    def sample(self, now_ms: int, interval: float) -> QualitySample:
        streams = internals.receiver_statistics(self.receiver)
        stats = streams.get(self.media_ssrc)
        expected = stats.packets_expected if stats else 0
        lost = stats.packets_lost if stats else 0
        jitter = stats.jitter / self.clock_rate * 1000 if stats else None
        b_packets, b_octets, b_frames, b_expected, b_lost, b_plis, b_nacks = self._sample_base
        d_expected = expected - b_expected
        d_lost = max(0, lost - b_lost)
        self._sample_base = (self.packets, self.octets, self.frames, expected, lost, self.plis_sent, self.nacks_sent)
        return QualitySample(
            peer_id=self.publish.peer_id, stream_id=self.publish.stream_id, direction="in", kind=self.kind,
            time_ms=now_ms, interval_s=interval,
            bitrate_kbps=round((self.octets - b_octets) * 8 / interval / 1000, 1),
            packets=self.packets - b_packets, packets_lost=d_lost,
            loss_pct=round(100.0 * d_lost / d_expected, 2) if d_expected > 0 else 0.0,
            jitter_ms=round(jitter, 2) if jitter is not None else None,
            rtt_ms=round(self.publish.stun_rtt.rtt_ms, 1) if self.publish.stun_rtt.rtt_ms is not None else None,
            frame_rate=round((self.frames - b_frames) / interval, 1) if self.kind == "video" else None,
            width=self.size[0] if self.size else None, height=self.size[1] if self.size else None,
            nacks=self.nacks_sent - b_nacks, plis=self.plis_sent - b_plis, octets=self.octets - b_octets,
        )


class ForwardingSender:
    """One subscriber's copy of a published track: rewrites and sends RTP, handles its RTCP."""

    def __init__(self, subscription: SubscribePeer, track: PublishedTrack, sender: Any) -> None:
        self.subscription = subscription
        self.track = track
        self.sender = sender
        self.kind = track.kind
        self.ssrc = internals.local_ssrc(sender)
        self.clock_rate = track.clock_rate
        #: Sends an RTP packet (SRTP-protected), and an RTCP one, to the subscriber.
        self.send_rtp: Callable[[bytes], bool] = _never_send
        self.send: Callable[[bytes], bool] = _never_send
        self.payload_type = 0
        #: Builds the subscriber's packets (``configure``); its variable extension is the track's
        #: (abs-send-time for video, audio level for audio) or none.
        self.writer = RtpWriter(0, self.ssrc, [])
        self.write = self.writer.write
        self.ready = False
        self.translator = RtpTranslator(self.clock_rate, track.kind == "video", random.randint(0, 32767),
                                        random.randint(0, 0xFFFFFFFF))
        self.drops = subscription.router.forward_drops
        self.packets = 0
        self.octets = 0
        self.frames = 0
        self.nacks_received = 0
        self.retransmitted = 0
        self.plis_received = 0
        self.remb_bps = 0
        self.rtt_ms: float | None = None
        self.loss_fraction: float | None = None
        #: Cumulative packets lost the subscriber's receiver reports give (RFC 3550 6.4.1).
        self.rr_packets_lost = 0
        self.jitter_ms: float | None = None
        self.lsr = 0
        self.lsr_time = 0.0
        self._sample_base = (0, 0, 0, 0, 0, 0, 0)

    def start(self, parameters: RTCRtpSendParameters) -> None:
        """DTLS is up and the sender's parameters are negotiated: start forwarding."""
        self.configure(parameters.codecs[0].payloadType or 0,
                       {ext.uri: ext.id for ext in parameters.headerExtensions}, parameters.muxId)
        self.send_rtp = internals.rtp_sender(self.sender.transport)
        self.send = internals.raw_sender(self.sender.transport)
        self.ready = True
        self.track.add_subscriber(self)

    def configure(self, payload_type: int, extension_ids: dict[str, int], mid: str | None) -> None:
        """The subscriber's payload type and header extensions (ids by URI), as negotiated: its
        packets carry the MID and the track's variable extension when it accepted them."""
        self.payload_type = payload_type
        fixed = [(extension_ids[URI_MID], mid.encode())] if URI_MID in extension_ids and mid else []
        video = self.kind == "video"
        variable_id = extension_ids.get(URI_ABS_SEND_TIME if video else URI_AUDIO_LEVEL, 0)
        self.writer = RtpWriter(payload_type, self.ssrc, fixed, variable_id, 3 if video else 1)
        self.write = self.writer.write

    def forward(self, packet: RtpPacket, keyframe: bool, variable: bytes, now: float) -> None:
        """Send ``packet`` to this subscriber if its translator admits it; ``variable`` is the
        track's variable extension value for this packet (abs-send-time or audio level)."""
        if not self.ready:
            return
        t = self.translator
        seq = packet.sequence_number
        ts = packet.timestamp
        verdict = t.admit(packet.ssrc, seq, ts, keyframe, now)
        if verdict is not None:
            self.drops[verdict] += 1
            if verdict is ForwardDropReason.WAITING_KEYFRAME:
                self.track.request_keyframe("new subscriber", self.subscription.peer_id)
            return
        ts = (ts + t.ts_offset) & 0xFFFFFFFF
        payload = packet.payload
        if self.send_rtp(self.write(packet.marker, (seq + t.seq_offset) & 0xFFFF, ts,
                                    variable, payload)):
            self.packets += 1
            self.octets += len(payload)
            self.frames += packet.marker
            t.last_out_ts = ts
        else:
            self.drops[ForwardDropReason.NOT_SENT] += 1

    # --- RTCP from the subscriber ---------------------------------------------

    async def on_rtcp(self, packet: Any) -> None:
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc != self.ssrc:
                    continue
                self.loss_fraction = report.fraction_lost / 256
                self.rr_packets_lost = max(0, report.packets_lost)
                self.jitter_ms = report.jitter / self.clock_rate * 1000
                if report.lsr and report.lsr == self.lsr:
                    rtt = time.time() - self.lsr_time - report.dlsr / 65536
                    if rtt >= 0:
                        self.rtt_ms = rtt * 1000
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            self.nacks_received += 1
            self._answer_nack(packet.lost)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            self.plis_received += 1
            self.track.request_keyframe("subscriber PLI", self.subscription.peer_id)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            if self.ssrc in ssrcs:
                self.remb_bps = bitrate
                self.track.remb.update(self.ssrc, bitrate, time.monotonic())

    def _answer_nack(self, lost: Iterable[int]) -> None:
        if self.kind != "video":
            return
        resend, upstream = NACK_RESPONDER.respond(lost, self.track.cache, self.translator)
        # Video's variable extension is abs-send-time; a retransmission carries zero.
        for packet in resend:
            if self.send_rtp(self.write(packet.marker, packet.seq, packet.timestamp, b"", packet.payload)):
                self.retransmitted += 1
        if upstream:
            self.track.nack_upstream(upstream)

    @property
    def last_ts(self) -> int:
        """The RTP timestamp of the last packet sent to this subscriber."""
        return self.translator.last_out_ts

    def sender_report(self, ntp: int, now: float) -> bytes:
        """This track's SR at NTP time ``ntp`` (wall time ``now``); empty before the first
        forwarded packet."""
        if not self.ready or not self.packets:
            return b""
        track = self.track
        rtp_ts = sender_report_rtp_time(ntp, now, self.clock_rate, self.translator.ts_offset, track.publisher_sr,
                                        self.translator.last_out_ts, track.last_arrival)
        self.lsr = (ntp >> 16) & 0xFFFFFFFF
        self.lsr_time = now
        return sender_report(self.ssrc, ntp, rtp_ts, self.packets, self.octets)

    def close(self) -> None:
        self.ready = False
        self.track.remove_subscriber(self)

    def sample(self, now_ms: int, interval: float) -> QualitySample:
        b_packets, b_octets, b_frames, b_nacks, b_plis, b_resent, b_lost = self._sample_base
        self._sample_base = (self.packets, self.octets, self.frames, self.nacks_received, self.plis_received,
                             self.retransmitted, self.rr_packets_lost)
        size = self.track.size
        return QualitySample(
            peer_id=self.subscription.peer_id, stream_id=self.track.publish.stream_id, direction="out",
            kind=self.kind, time_ms=now_ms, interval_s=interval,
            bitrate_kbps=round((self.octets - b_octets) * 8 / interval / 1000, 1),
            packets=self.packets - b_packets, packets_lost=max(0, self.rr_packets_lost - b_lost),
            loss_pct=round(100.0 * self.loss_fraction, 2) if self.loss_fraction is not None else 0.0,
            jitter_ms=round(self.jitter_ms, 2) if self.jitter_ms is not None else None,
            rtt_ms=round(self.rtt_ms, 1) if self.rtt_ms is not None else None,
            frame_rate=round((self.frames - b_frames) / interval, 1) if self.kind == "video" else None,
            width=size[0] if size and self.kind == "video" else None,
            height=size[1] if size and self.kind == "video" else None,
            nacks=self.nacks_received - b_nacks, plis=self.plis_received - b_plis,
            remb_kbps=round(self.remb_bps / 1000, 1) if self.remb_bps else None,
            octets=self.octets - b_octets, retransmitted=self.retransmitted - b_resent,
        )


def _never_send(data: bytes) -> bool:
    return False


#: The one-byte audio level extension values, built once.
_LEVEL_BYTES = [bytes([value]) for value in range(256)]


NACK_RESPONDER = NackResponder()


class Peer:
    """One server-side RTCPeerConnection (a publish or a subscription)."""

    def __init__(self, router: Router, peer_id: str, stream_id: str) -> None:
        self.router = router
        self.peer_id = peer_id
        self.stream_id = stream_id
        self.pc = internals.new_peer_connection(RTCConfiguration(iceServers=[]),
                                                router.certificates.current(time.monotonic()))
        self.closed = False
        self.created = time.monotonic()
        #: ICE and DTLS are up (connectionState "connected" was reached once).
        self.connected = False
        self._last_state: dict[str, str] = {}
        self._remote_candidates = 0
        #: The candidates the client trickled with ``ice`` (at most MAX_REMOTE_CANDIDATES), for reports.
        self._trickled: list[dict[str, str]] = []
        #: ICE "completed"/"connected" held back until DTLS is connected too.
        self._held_ice: str | None = None
        #: Round trip from the ICE agent's STUN checks (the RTT of a publish, which RTCP lacks).
        self.stun_rtt = internals.StunRtt()

        @self.pc.on("iceconnectionstatechange")
        def _ice() -> None:
            self._state("ice", self.pc.iceConnectionState)

        @self.pc.on("connectionstatechange")
        def _conn() -> None:
            state = self.pc.connectionState
            if state == "connected":
                self.connected = True
            self._state("connection", state)
            if state in ("failed", "closed") and not self.closed:
                router.emit(PeerFailed(peer_id, stream_id, state))

    def _state(self, layer: str, state: str) -> None:
        if self._last_state.get(layer) == state:
            return
        self._last_state[layer] = state
        if layer == "ice":
            self._held_ice = None
            if state in ("completed", "connected") and not self.connected:
                # aioice says "completed" once the far end nominated a pair, before DTLS ran
                # over it: not reported as such until the connection is up (a timeout reports
                # it as a DTLS failure instead).
                self._held_ice = state
                return
        if layer == "connection" and state == "connected" and self._held_ice is not None:
            held, self._held_ice = self._held_ice, None
            self._emit_state("ice", held)
        self._emit_state(layer, state)

    def _emit_state(self, layer: str, state: str) -> None:
        pair = None
        local: tuple[dict[str, str], ...] = ()
        remote: tuple[dict[str, str], ...] = ()
        if state in ("completed", "connected"):
            transport = self._dtls_transport()
            if transport is not None:
                pair = internals.selected_candidate_pair(transport)
        elif state == "failed":
            local, remote = self.offered_candidates()
        self.router.emit(PeerStateChanged(self.peer_id, self.stream_id, layer, state, pair, local, remote))

    def offered_candidates(self) -> tuple[tuple[dict[str, str], ...], tuple[dict[str, str], ...]]:
        """What each side offered, for failure reports: the server's candidates as its SDP
        announced them, and the client's (in its SDP and trickled with ``ice``), at most
        MAX_REPORTED_CANDIDATES each; ``{"type", "protocol", "address"}`` like a candidate pair's."""
        local = _sdp_candidates(self.local_sdp()) if self.pc.localDescription is not None else []
        remote = _sdp_candidates(self.pc.remoteDescription.sdp) if self.pc.remoteDescription is not None else []
        remote += [c for c in self._trickled if c not in remote]
        return tuple(local[:MAX_REPORTED_CANDIDATES]), tuple(remote[:MAX_REPORTED_CANDIDATES])

    def _dtls_transport(self) -> Any:
        for t in self.pc.getTransceivers():
            return t.receiver.transport
        return None

    def send_rtcp(self, data: bytes) -> bool:
        transport = self._dtls_transport()
        if transport is None:
            return False
        return internals.raw_sender(transport)(data)

    async def add_ice_candidate(self, candidate: dict[str, Any] | None) -> None:
        if candidate is None or not candidate.get("candidate"):
            await self.pc.addIceCandidate(None)  # type: ignore[arg-type]
            return
        text = str(candidate["candidate"])
        # Each remote candidate is a pair the ICE agent checks (STUN sent to that address):
        # a bound keeps one client from growing the check list, or aiming checks anywhere, at will.
        if self._remote_candidates >= MAX_REMOTE_CANDIDATES:
            raise MediaError(f"this peer already has {MAX_REMOTE_CANDIDATES} remote candidates, the most accepted")
        try:
            parsed: RTCIceCandidate = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
        except (AssertionError, ValueError, IndexError):
            raise MediaError(f'"{text[:80]}" is not an ICE candidate') from None
        parsed.sdpMid = candidate.get("sdpMid")
        parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
        if parsed.sdpMid is None and parsed.sdpMLineIndex is None:
            parsed.sdpMLineIndex = 0
        self._remote_candidates += 1
        self._trickled.append(_candidate_summary(parsed))
        await self.pc.addIceCandidate(parsed)

    def share_port(self) -> None:
        """Put this peer connection's ICE agents on the node's shared UDP port, if there is one
        (before createOffer/createAnswer: the SDP carries the ufrag the mux routes by)."""
        mux = self.router.udp_mux
        if mux is not None:
            for connection in internals.ice_connections(self.pc):
                internals.use_udp_mux(connection, mux)

    def demux(self) -> None:
        """Candidates are gathered: put the datagram demultiplexer on their sockets."""
        for transport in internals.dtls_transports(self.pc):
            connection = internals.ice_connection(transport)
            internals.demux_datagrams(connection, self.router.datagram_drops, transport)
            internals.measure_stun_rtt(connection, self.stun_rtt)

    def local_sdp(self) -> str:
        sdp = self.pc.localDescription.sdp
        return announce_ip(sdp, self.router.announced_ip) if self.router.announced_ip else sdp

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.pc.close()


class PublishPeer(Peer):
    """The server end of one publish: receives a stream's audio and/or video."""

    def __init__(self, router: Router, stream_id: str) -> None:
        super().__init__(router, stream_id, stream_id)
        self.tracks: dict[str, PublishedTrack] = {}

    async def negotiate(self, offer_sdp: str) -> str:
        chosen = _offer_codecs(offer_sdp)
        for kind, codec in chosen.items():
            transceiver = internals.add_transceiver(self.pc, kind, direction="recvonly")
            transceiver.setCodecPreferences(codecs.preferences(codec, with_rtx=True))
            track = PublishedTrack(self.router, self, kind, transceiver.receiver,
                                   internals.local_ssrc(transceiver.sender), codec)
            internals.hook_receiver(transceiver.receiver, track.on_rtp, _async(track.on_rtcp))
            self.tracks[kind] = track
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            self.share_port()  # after BUNDLE dropped the extra transports, before the answer
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:  # aiortc raises ValueError/OperationError/InvalidStateError
            raise MediaError(f"cannot apply the offer: {exc}") from None
        self.demux()
        return self.local_sdp()

    async def close(self) -> None:
        for track in self.tracks.values():
            for sub in track.subscribers:
                sub.close()
        await super().close()


class SubscribePeer(Peer):
    """The server end of one subscription: sends one published stream's tracks."""

    def __init__(self, router: Router, subscription_id: str, publish: PublishPeer) -> None:
        super().__init__(router, subscription_id, publish.stream_id)
        self.publish = publish
        self.senders: list[ForwardingSender] = []
        self.answered = False
        self.created = time.monotonic()

    async def make_offer(self) -> str:
        for kind, track in self.publish.tracks.items():
            transceiver = internals.add_transceiver(self.pc, kind, direction="sendonly")  # its receiver never runs
            # The publisher's codec with its fmtp (H264: profile-level-id, packetization-mode).
            transceiver.setCodecPreferences(codecs.preferences(track.codec, with_rtx=False))
            fwd = ForwardingSender(self, track, transceiver.sender)
            internals.hook_sender(transceiver.sender, fwd.start, fwd.on_rtcp)
            self.senders.append(fwd)
        self.share_port()
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.demux()
        return self.local_sdp()

    def send_sender_reports(self, ntp: int, now: float) -> None:
        """One compound RTCP datagram with the SR of every track of this subscription."""
        reports = b"".join(fwd.sender_report(ntp, now) for fwd in self.senders)
        if reports:
            self.senders[0].send(reports)

    async def accept_answer(self, answer_sdp: str) -> None:
        # Claimed before the await: a second answer racing the first is refused the same way.
        if self.answered:
            raise AlreadyAnswered(f'subscription "{self.peer_id}" already has an answer')
        self.answered = True
        try:
            self._check_codecs(answer_sdp)
        except MediaError:
            self.answered = False
            raise
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer_sdp, type="answer"))
        except Exception as exc:
            self.answered = False  # the offer still stands: a corrected answer may follow
            raise MediaError(f"cannot apply the answer: {exc}") from None

    def _check_codecs(self, answer_sdp: str) -> None:
        """Refuse an answer that cannot receive a track's codec (``CodecNotSupported``), before
        aiortc would fail on it or the subscriber would get black video."""
        try:
            description = SessionDescription.parse(answer_sdp)
        except Exception:
            raise MediaError("the answer is not valid SDP") from None
        for media in description.media:
            track = self.publish.tracks.get(media.kind)
            if track is not None:
                codecs.check_answer(media.kind, track.codec, media.rtp.codecs if media.port else [],
                                    self.publish.stream_id)

    async def close(self) -> None:
        if not self.closed:
            # The last, partial interval: what was sent since the timer's last sample.
            interval = max(time.monotonic() - self.router.last_sample_at, 0.001)
            now_ms = int(time.time() * 1000)
            for fwd in self.senders:
                if fwd.ready and fwd.packets:
                    self.router.emit(fwd.sample(now_ms, interval))
        for fwd in self.senders:
            fwd.close()
        await super().close()


def _async(fn: Any) -> Any:
    async def wrapper(packet: Any) -> None:
        fn(packet)

    return wrapper


def _offer_codecs(offer_sdp: str) -> dict[str, Any]:
    """Validate a publish offer (at most one audio and one video section, each sending) and
    choose the codec of each section (``codecs.choose``: Opus; VP8, else H264)."""
    try:
        description = SessionDescription.parse(offer_sdp)
    except Exception:
        raise MediaError("the offer is not valid SDP") from None
    kinds = [m.kind for m in description.media]
    if not kinds:
        raise MediaError("the offer has no media sections")
    for kind in kinds:
        if kind not in ("audio", "video"):
            raise MediaError(f'the offer has a "{kind}" section; only audio and video can be published')
        if kinds.count(kind) > 1:
            raise MediaError(f"the offer has more than one {kind} section")
    chosen: dict[str, Any] = {}
    for media in description.media:
        if media.direction not in (None, "sendonly", "sendrecv"):
            raise MediaError(f"the offer's {media.kind} section is {media.direction}, it must send")
        chosen[media.kind] = codecs.choose(media.kind, media.rtp.codecs)
    return chosen


def _candidate_summary(candidate: RTCIceCandidate) -> dict[str, str]:
    return {"type": str(candidate.type), "protocol": str(candidate.protocol).lower(),
            "address": f"{candidate.ip}:{candidate.port}"}


def _sdp_candidates(sdp: str) -> list[dict[str, str]]:
    """The candidates of an SDP's ``a=candidate`` lines, each once (a bundle repeats them in
    every section; one that does not parse is left out)."""
    found: list[dict[str, str]] = []
    for line in sdp.splitlines():
        if not line.startswith("a=candidate:"):
            continue
        try:
            candidate = _candidate_summary(candidate_from_sdp(line[len("a=candidate:"):]))
        except (AssertionError, ValueError, IndexError):
            continue
        if candidate not in found:
            found.append(candidate)
        if len(found) >= MAX_REPORTED_CANDIDATES:
            break
    return found


_CANDIDATE_RE = re.compile(r"^(a=candidate:\S+ \d+ \S+ \d+ )(\S+)( \d+ typ host)", re.M)


def announce_ip(sdp: str, ip: str) -> str:
    """Replace the address of host candidates with the announced (1:1 NAT) address."""
    return _CANDIDATE_RE.sub(lambda m: m.group(1) + ip + m.group(3), sdp)


class Router:
    """All publishes and subscriptions of this node, by peer id."""

    def __init__(self, observer: Observer | None = None, pli_interval_s: float = 0.5, sample_interval_s: float = 2.0,
                 announced_ip: str = "", answer_timeout_s: float = 30.0, idle_after_s: float = 5.0,
                 connect_timeout_s: float = 15.0, max_peer_connections: int = 500,
                 udp_mux: UdpMux | None = None) -> None:
        self.observer = observer
        self.pli_interval_s = pli_interval_s
        #: A subscription whose answer has not come by then fails (its owner cleans up).
        self.answer_timeout_s = answer_timeout_s
        #: A published track with no packet for this long is reported as stopped.
        self.idle_after_s = idle_after_s
        self.sample_interval_s = sample_interval_s
        #: A peer connection not connected (ICE and DTLS) by then is closed.
        self.connect_timeout_s = connect_timeout_s
        #: Publishes plus subscriptions this node holds at most (each holds UDP sockets).
        self.max_peer_connections = max_peer_connections
        self.announced_ip = announced_ip
        #: The node's shared media sockets (``media.udp_port``); None: a socket per peer connection.
        self.udp_mux = udp_mux
        #: Datagrams the demultiplexer (and the mux) dropped, by reason (plain ints, read by the timer).
        self.datagram_drops: dict[DatagramDropReason, int] = (
            udp_mux.drops if udp_mux is not None else dict.fromkeys(DatagramDropReason, 0))
        self._drops_reported: dict[DatagramDropReason, int] = dict.fromkeys(DatagramDropReason, 0)
        #: RTP packets not forwarded to a subscriber, by reason (plain ints, read by the timer).
        self.forward_drops: dict[ForwardDropReason, int] = dict.fromkeys(ForwardDropReason, 0)
        self._forward_drops_reported: dict[ForwardDropReason, int] = dict.fromkeys(ForwardDropReason, 0)
        self.publishes: dict[str, PublishPeer] = {}
        self.subscriptions: dict[str, SubscribePeer] = {}
        #: The DTLS certificate of every peer connection of this node, rotated daily.
        self.certificates = internals.CertificateRotation()
        self._timer: asyncio.Task[None] | None = None
        #: When the timer last sampled every track (monotonic): a closing subscription reports what
        #: it sent since then, so no forwarded packet goes uncounted.
        self.last_sample_at = time.monotonic()

    def emit(self, event: MediaEvent) -> None:
        if self.observer is None:
            return
        try:
            self.observer(event)
        except Exception:
            logger.exception("media observer failed on %r", event)

    def start(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._run_timer())

    def _check_capacity(self) -> None:
        if len(self.publishes) + len(self.subscriptions) >= self.max_peer_connections:
            raise OverCapacity(f"this node already holds {self.max_peer_connections} peer connections, the most "
                               "allowed (media.max_peer_connections)")

    async def publish(self, stream_id: str, offer_sdp: str) -> str:
        """Accept a publish offer; returns the answer SDP (with all our candidates)."""
        self.start()
        self._check_capacity()
        peer = PublishPeer(self, stream_id)
        self.publishes[stream_id] = peer
        try:
            return await peer.negotiate(offer_sdp)
        except BaseException:
            self.publishes.pop(stream_id, None)
            await peer.close()
            raise

    async def subscribe(self, subscription_id: str, stream_id: str) -> str:
        """Start a subscription to a published stream; returns the server's offer SDP."""
        publish = self.publishes.get(stream_id)
        if publish is None:
            raise PeerNotFound(f'No published stream "{stream_id}" on this node')
        self._check_capacity()
        peer = SubscribePeer(self, subscription_id, publish)
        self.subscriptions[subscription_id] = peer
        try:
            return await peer.make_offer()
        except BaseException:
            self.subscriptions.pop(subscription_id, None)
            await peer.close()
            raise

    async def answer(self, subscription_id: str, answer_sdp: str) -> None:
        peer = self.subscriptions.get(subscription_id)
        if peer is None:
            raise PeerNotFound(f'No subscription "{subscription_id}"')
        await peer.accept_answer(answer_sdp)

    def peer(self, peer_id: str) -> Peer:
        peer: Peer | None = self.publishes.get(peer_id) or self.subscriptions.get(peer_id)
        if peer is None:
            raise PeerNotFound(f'No peer "{peer_id}"')
        return peer

    async def add_ice_candidate(self, peer_id: str, candidate: dict[str, Any] | None) -> None:
        await self.peer(peer_id).add_ice_candidate(candidate)

    def report_unconnected(self, peer_id: str) -> None:
        """Its owner is about to close ``peer_id``: if it never connected, say how far it got and
        what each side offered (``PeerClosedUnconnected``), while the owner can still be found."""
        peer: Peer | None = self.publishes.get(peer_id) or self.subscriptions.get(peer_id)
        if peer is None or peer.connected or peer.closed:
            return
        local, remote = peer.offered_candidates()
        self.emit(PeerClosedUnconnected(peer.peer_id, peer.stream_id, round(time.monotonic() - peer.created, 1),
                                        peer.pc.iceConnectionState, local, remote))

    async def close_peer(self, peer_id: str) -> None:
        peer: Peer | None = self.publishes.pop(peer_id, None) or self.subscriptions.pop(peer_id, None)
        if peer is not None:
            await peer.close()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        peers: list[Peer] = [*self.subscriptions.values(), *self.publishes.values()]
        self.subscriptions.clear()
        self.publishes.clear()
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)

    def _reap_unconnected(self, now: float) -> None:
        """Close every peer connection still not connected ``connect_timeout_s`` after it was
        created: it holds sockets and would otherwise live as long as its signalling socket."""
        for peers in (self.publishes, self.subscriptions):
            for peer in [p for p in peers.values() if not p.connected and now - p.created > self.connect_timeout_s]:
                del peers[peer.peer_id]
                # What each side offered and how far it got, read before the close clears it.
                local, remote = peer.offered_candidates()
                ice_state = peer.pc.iceConnectionState
                asyncio.ensure_future(peer.close())
                self.emit(PeerTimedOut(peer.peer_id, peer.stream_id, self.connect_timeout_s, ice_state,
                                       local, remote))

    def _report_drops(self) -> None:
        drops, reported = self.datagram_drops, self._drops_reported
        if drops != reported:
            self.emit(DatagramsDropped({reason: drops[reason] - reported[reason] for reason in drops}))
            self._drops_reported = dict(drops)
        forward, forward_reported = self.forward_drops, self._forward_drops_reported
        if forward != forward_reported:
            self.emit(PacketsDropped({reason: forward[reason] - forward_reported[reason] for reason in forward}))
            self._forward_drops_reported = dict(forward)

    async def _run_timer(self) -> None:
        last_sample = self.last_sample_at = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            tracks = [t for p in list(self.publishes.values()) for t in p.tracks.values()]
            wall = time.time()
            now = time.monotonic()
            for track in tracks:
                track.tick(wall, now)
            ntp = ntp_now(wall)
            for subscription in list(self.subscriptions.values()):
                subscription.send_sender_reports(ntp, wall)
                if not subscription.answered and now - subscription.created > self.answer_timeout_s:
                    # The client never answered: free its sockets, tell the owner.
                    del self.subscriptions[subscription.peer_id]
                    asyncio.ensure_future(subscription.close())
                    self.emit(PeerFailed(subscription.peer_id, subscription.stream_id, "failed"))
            self._reap_unconnected(now)
            self._report_drops()
            if now - last_sample >= self.sample_interval_s:
                interval, last_sample = now - last_sample, now
                self.last_sample_at = now
                now_ms = int(time.time() * 1000)
                for track in tracks:
                    if track.packets:
                        self.emit(track.sample(now_ms, interval))
                for sub in list(self.subscriptions.values()):
                    for fwd in sub.senders:
                        if fwd.ready:
                            self.emit(fwd.sample(now_ms, interval))

