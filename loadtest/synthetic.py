"""Synthetic participants for the load tester: one wire-protocol connection, a
publish of pre-encoded media and subscriptions that behave like a browser's,
without an encoder or a decoder anywhere.

- Media is encoded once per (codec, width, height, fps, bitrate) and cached on
  disk (``encoded_media``; default ``~/.cache/openconsult/media``, or
  ``$XDG_CACHE_HOME/openconsult/media``), and once per process in memory.
- A publisher sends it in real time (``loadtest.media.PreEncodedTrack``), answers
  PLI/FIR with a keyframe and NACKs from aiortc's 128-packet history (RTX when
  negotiated, as the server's publish answer does), and can mute one kind.
- A subscriber takes each RTP packet off aiortc before its jitter buffer
  (``loadtest.hooks.receive_like_a_browser``): aiortc still sends receiver reports
  and REMB from it; this module counts it (``loadtest.rtpstats``), NACKs gaps,
  assembles VP8 frames from the payload descriptors, sends PLI when rendering is
  stuck, and detects freezes with the W3C rule.
- A ``NetworkProfile`` impairs the client's own UDP path (``loadtest.netem``).

``TrackStats.loss_pct`` is the loss the network inflicted on first transmissions,
(expected - packets) / expected, what a profile's ``loss_pct`` shows; packets that
arrived only as a retransmission after a NACK are ``recovered``, and
``residual_loss_pct`` is what stayed lost after NACK recovery.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, RTCSessionDescription
from aiortc.rtp import RtpPacket

from loadtest import hooks
from loadtest.client import SignallingClient
from loadtest.media import EncodedMedia, PreEncodedTrack, encode_media, load_media, save_media
from loadtest.netem import BurstLoss, NetworkImpairment, NetworkProfile
from loadtest.rtpstats import Arrival, ReceiveCounter, Vp8Frames

__all__ = ["BurstLoss", "EncodedMedia", "MediaSpec", "NetworkProfile", "Participant", "TrackStats",
           "default_cache_dir", "encoded_media"]

CODECS = ("vp8",)
MEDIA_SECONDS = 10.0
KEYFRAME_INTERVAL_S = 2.0
AUDIO_BITRATE = 32_000  # Opus voice, as browsers send it
CACHE_FORMAT = 2  # bump when the encoding or the file layout changes


@dataclass(frozen=True)
class MediaSpec:
    audio: bool = True
    video: bool = True
    codec: str = "vp8"          # "vp8" today; "h264" once the server relays it
    width: int = 640
    height: int = 480
    fps: int = 30
    bitrate_kbps: int = 1000    # video target; audio is Opus ~32 kbps

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {self.codec!r}")
        if not (16 <= self.width <= 4096 and 16 <= self.height <= 4096 and self.width % 2 == 0
                and self.height % 2 == 0):
            raise ValueError(f"resolution must be even and within 16..4096, not {self.width}x{self.height}")
        if not 1 <= self.fps <= 60:
            raise ValueError(f"fps must be within 1..60, not {self.fps}")
        if not 50 <= self.bitrate_kbps <= 20_000:
            raise ValueError(f"bitrate_kbps must be within 50..20000, not {self.bitrate_kbps}")
        if not (self.audio or self.video):
            raise ValueError("a publish needs audio or video")


@dataclass
class TrackStats:
    stream_id: str
    kind: str                   # "audio" | "video"
    direction: str              # "send" | "recv"
    peer_name: str              # the participant on the other end (publisher's name for recv)
    packets_expected: int       # recv: from RTP sequence numbers (highest - first + 1); send: sent
    packets: int                # recv: received on first transmission; send: sent
    bytes: int
    bitrate_kbps: float         # average over the time the track was active
    loss_pct: float             # recv: (expected - packets) / expected: the network's loss before NACK recovery
    jitter_ms: float            # recv: RFC 3550 interarrival jitter
    frames: int                 # video: complete frames rendered (VP8 parsed, not decoded); audio: 0
    freezes: int                # W3C rule
    freeze_duration_s: float
    first_packet_at: float | None   # time.monotonic()
    first_frame_at: float | None    # time.monotonic(), first complete (key)frame
    recovered: int = 0          # recv: packets that arrived only after a NACK (retransmissions)
    residual_loss_pct: float = 0.0  # recv: still lost after NACK recovery
    nacks: int = 0              # recv: NACK packets sent
    plis: int = 0               # recv: PLIs sent; send: keyframe requests answered
    duplicates: int = 0         # recv: packets received twice


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "openconsult" / "media"


_memory: dict[tuple[Path, str], EncodedMedia] = {}
_locks: dict[tuple[Path, str], asyncio.Lock] = {}


def media_key(spec: MediaSpec) -> str:
    return f"{spec.codec}-{spec.width}x{spec.height}-{spec.fps}fps-{spec.bitrate_kbps}kbps-v{CACHE_FORMAT}"


async def encoded_media(spec: MediaSpec, cache_dir: Path | None = None) -> EncodedMedia:
    """The media for ``spec``: from this process's memory, else from the cache
    file, else encoded (in a thread, ``MEDIA_SECONDS`` long) and written there
    atomically, so concurrent processes at worst encode twice, never read half a file."""
    directory = (cache_dir or default_cache_dir()).resolve()
    key = (directory, media_key(spec))
    if key in _memory:
        return _memory[key]
    lock = _locks.setdefault(key, asyncio.Lock())
    async with lock:
        if key in _memory:
            return _memory[key]
        path = directory / f"{key[1]}.media"
        media: EncodedMedia | None = None
        if path.exists():
            try:
                media = await asyncio.to_thread(load_media, path)
            except (OSError, ValueError, KeyError):
                media = None  # a damaged file: encode again
        if media is None:
            media = await asyncio.to_thread(
                encode_media, seconds=MEDIA_SECONDS, fps=spec.fps, width=spec.width, height=spec.height,
                bitrate=spec.bitrate_kbps * 1000, keyframe_interval=max(1, round(KEYFRAME_INTERVAL_S * spec.fps)),
                audio_bitrate=AUDIO_BITRATE)
            directory.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            await asyncio.to_thread(save_media, media, partial)
            os.replace(partial, path)
        _memory[key] = media
        return media


def _peer_connection() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def _rate_kbps(octets: int, start: float | None, end: float | None) -> float:
    if start is None or end is None or end - start <= 0:
        return 0.0
    return octets * 8 / (end - start) / 1000.0


class _RecvTrack:
    """One received track: counts, NACKs, frames and freezes (see ``loadtest.rtpstats``)."""

    def __init__(self, receiver: RTCRtpReceiver, kind: str, stream_id: str, peer_name: str) -> None:
        self.receiver = receiver
        self.kind = kind
        self.stream_id = stream_id
        self.peer_name = peer_name
        self.counter = ReceiveCounter(90000 if kind == "video" else 48000)
        self.frames = Vp8Frames() if kind == "video" else None
        self.first_packet_at: float | None = None
        self.last_packet_at: float | None = None
        self.nacks = 0
        self.ssrc = 0
        hooks.receive_like_a_browser(receiver, self.on_rtp)

    async def on_rtp(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        now = time.monotonic()
        if self.first_packet_at is None:
            self.first_packet_at = now
            self.ssrc = packet.ssrc
        elif packet.ssrc != self.ssrc:
            return  # one source per track; another would be a different stream
        self.last_packet_at = now
        counter = self.counter
        arrival, ext = counter.add(packet.sequence_number, packet.timestamp, len(packet.payload), now)
        pli = False
        if arrival is not Arrival.DUPLICATE and self.frames is not None:
            pli = self.frames.add(ext, packet.timestamp, bool(packet.marker), packet.payload, now)
        if self.kind == "video":
            lost = counter.nacks_due(now)
            if lost:
                self.nacks += 1
                await hooks.send_nack(self.receiver, self.ssrc, lost)
        if pli:
            await hooks.send_pli(self.receiver, self.ssrc)

    def stats(self) -> TrackStats:
        c = self.counter
        expected = c.expected
        frames = self.frames
        return TrackStats(
            stream_id=self.stream_id, kind=self.kind, direction="recv", peer_name=self.peer_name,
            packets_expected=expected, packets=c.packets, bytes=c.bytes,
            bitrate_kbps=_rate_kbps(c.bytes, self.first_packet_at, self.last_packet_at),
            loss_pct=100.0 * max(0, expected - c.packets) / expected if expected else 0.0,
            jitter_ms=c.jitter_ms,
            frames=frames.frames if frames else 0,
            freezes=frames.freeze.freezes if frames else 0,
            freeze_duration_s=frames.freeze.freeze_duration_s if frames else 0.0,
            first_packet_at=self.first_packet_at,
            first_frame_at=frames.first_frame_at if frames else self.first_packet_at,
            recovered=c.recovered,
            residual_loss_pct=100.0 * max(0, expected - c.packets - c.recovered) / expected if expected else 0.0,
            nacks=self.nacks, plis=frames.plis if frames else 0, duplicates=c.duplicates)


@dataclass
class _SendTrack:
    sender: RTCRtpSender
    track: PreEncodedTrack
    stream_id: str
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    final: tuple[int, int] | None = None  # (packets, bytes) when the publish ended

    def stats(self) -> TrackStats:
        packets, octets = self.final if self.final is not None else hooks.sent_counts(self.sender)
        end = self.ended_at if self.ended_at is not None else time.monotonic()
        return TrackStats(
            stream_id=self.stream_id, kind=self.track.kind, direction="send", peer_name="",
            packets_expected=packets, packets=packets, bytes=octets,
            bitrate_kbps=_rate_kbps(octets, self.started_at, end), loss_pct=0.0, jitter_ms=0.0,
            frames=0, freezes=0, freeze_duration_s=0.0, first_packet_at=None, first_frame_at=None,
            plis=self.track.keyframe_requests)


@dataclass
class _Subscription:
    subscription_id: str
    pc: RTCPeerConnection
    tracks: list[_RecvTrack]


class Participant:
    """One signalling connection, its publish and its subscriptions."""

    def __init__(self, ws_url: str, name: str, network: NetworkProfile | None = None,
                 cache_dir: Path | None = None) -> None:
        self.client = SignallingClient(ws_url)
        self.name = name
        self.network = NetworkImpairment(network) if network is not None else None
        self.cache_dir = cache_dir
        self.stream_id: str | None = None
        self._publish_pc: RTCPeerConnection | None = None
        self._send: dict[str, _SendTrack] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._finished: list[TrackStats] = []  # tracks of ended publishes and subscriptions
        self._closed = False

    async def join(self, token: str) -> dict[str, Any]:
        await self.client.connect()
        return await self.client.join(token)

    async def publish(self, spec: MediaSpec) -> str:
        """Publish ``spec``'s kinds; returns the stream id once the server answered
        (media connects right after; subscribers wait for ``streamCreated``)."""
        if self._publish_pc is not None:
            raise RuntimeError(f"{self.name} already publishes {self.stream_id}")
        media = await encoded_media(spec, self.cache_dir)
        self._publish_pc = pc = _peer_connection()
        tracks: list[tuple[RTCRtpSender, PreEncodedTrack]] = []
        for kind, wanted in (("audio", spec.audio), ("video", spec.video)):
            if wanted:
                track = PreEncodedTrack(kind, media)
                sender = pc.addTransceiver(track, direction="sendonly").sender
                hooks.on_keyframe_request(sender, track.request_keyframe)
                tracks.append((sender, track))
        await pc.setLocalDescription(await pc.createOffer())
        if self.network is not None:
            self.network.install(pc)
        data = await self.client.request("publish", offer={"type": "offer", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=data["answer"]["sdp"], type="answer"))
        self.stream_id = str(data["stream_id"])
        self._send = {track.kind: _SendTrack(sender, track, self.stream_id) for sender, track in tracks}
        return self.stream_id

    async def set_muted(self, kind: str, muted: bool) -> None:
        """Stop or resume sending ``kind`` ("audio" or "video") of the publish."""
        send = self._send.get(kind)
        if send is None:
            raise ValueError(f"{self.name} publishes no {kind!r} track")
        send.track.set_muted(muted)

    async def unpublish(self) -> None:
        if self._publish_pc is None:
            return
        stream_id, pc = self.stream_id, self._publish_pc
        self._publish_pc, self.stream_id = None, None
        try:
            if stream_id is not None and not self.client.closed.is_set():
                await self.client.request("unpublish", stream_id=stream_id)
        finally:
            await self._end_publish(pc)

    async def _end_publish(self, pc: RTCPeerConnection) -> None:
        for send in self._send.values():
            send.final = hooks.sent_counts(send.sender)
            send.ended_at = time.monotonic()
            send.track.stop()
            self._finished.append(send.stats())
        self._send = {}
        await pc.close()

    async def subscribe(self, stream_id: str, peer_name: str = "") -> str:
        """Subscribe to a live stream; returns the subscription id."""
        if stream_id in self._subscriptions:
            raise RuntimeError(f"{self.name} already subscribes to {stream_id}")
        data = await self.client.request("subscribe", stream_id=stream_id)
        pc = _peer_connection()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=data["offer"]["sdp"], type="offer"))
            tracks = [_RecvTrack(t.receiver, t.kind, stream_id, peer_name) for t in pc.getTransceivers()]
            await pc.setLocalDescription(await pc.createAnswer())
            if self.network is not None:
                self.network.install(pc)
            subscription_id = str(data["subscription_id"])
            self._subscriptions[stream_id] = _Subscription(subscription_id, pc, tracks)
            await self.client.request("answer", subscription_id=subscription_id,
                                      answer={"type": "answer", "sdp": pc.localDescription.sdp})
        except BaseException:
            self._subscriptions.pop(stream_id, None)
            await pc.close()
            raise
        return subscription_id

    async def unsubscribe(self, stream_id: str) -> None:
        sub = self._subscriptions.pop(stream_id, None)
        if sub is None:
            return
        try:
            if not self.client.closed.is_set():
                await self.client.request("unsubscribe", subscription_id=sub.subscription_id)
        finally:
            self._finished.extend(t.stats() for t in sub.tracks)
            await sub.pc.close()

    def track_stats(self) -> list[TrackStats]:
        """Every track this participant sent or received so far (ended ones too)."""
        stats = list(self._finished)
        stats.extend(send.stats() for send in self._send.values())
        for sub in self._subscriptions.values():
            stats.extend(t.stats() for t in sub.tracks)
        return stats

    async def leave(self) -> None:
        """Say "leave" to the server, then close the peers and the socket."""
        if not self._closed and self.client.ws is not None and not self.client.closed.is_set():
            try:
                await self.client.request("leave", timeout=5.0)
            except (ConnectionError, asyncio.TimeoutError):
                pass
        await self.close()

    async def close(self) -> None:
        """Close every peer connection and the socket; idempotent. Stats stay readable."""
        if self._closed:
            return
        self._closed = True
        if self._publish_pc is not None:
            pc, self._publish_pc, self.stream_id = self._publish_pc, None, None
            await self._end_publish(pc)
        for stream_id in list(self._subscriptions):
            sub = self._subscriptions.pop(stream_id)
            self._finished.extend(t.stats() for t in sub.tracks)
            await sub.pc.close()
        await self.client.close()
