"""Real aiortc client peers for media tests: a publisher with synthetic camera and
microphone, and a subscriber that decodes and records what it gets."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from av import VideoFrame


class MovingVideoTrack(VideoStreamTrack):
    """640x480 frames at 30 fps whose content changes every frame."""

    def __init__(self, width: int = 640, height: int = 480) -> None:
        super().__init__()
        self.width, self.height = width, height
        self.counter = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        image = numpy.zeros((self.height, self.width, 3), numpy.uint8)
        x = (self.counter * 8) % self.width
        image[:, x : x + 32, 1] = 255
        image[:, :, 2] = self.counter % 256
        self.counter += 1
        frame = VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts = pts
        frame.time_base = time_base
        return frame


def client_pc(config: RTCConfiguration | None = None) -> RTCPeerConnection:
    return RTCPeerConnection(config or RTCConfiguration(iceServers=[]))


def only_codec(transceiver: Any, mime_type: str) -> None:
    """Offer only ``mime_type`` (every profile aiortc has of it) on a video transceiver, plus RTX."""
    caps = RTCRtpSender.getCapabilities("video")
    assert caps is not None
    transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType.lower() in (mime_type.lower(), "video/rtx")])


async def publisher_offer(video: bool = True, audio: bool = True, config: RTCConfiguration | None = None,
                          video_codec: str = "") -> RTCPeerConnection:
    """A publisher's peer connection with its offer set; ``video_codec`` (e.g. "video/H264")
    makes it offer only that video codec."""
    pc = client_pc(config)
    if audio:
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    if video:
        transceiver = pc.addTransceiver(MovingVideoTrack(), direction="sendonly")
        if video_codec:
            only_codec(transceiver, video_codec)
    await pc.setLocalDescription(await pc.createOffer())
    return pc


@dataclass
class Received:
    frames: list[tuple[float, int, int, bool]] = field(default_factory=list)  # (time, w, h, keyframe)
    audio_frames: int = 0
    first_frame_at: float | None = None

    def video_frames_since(self, t: float) -> list[tuple[float, int, int, bool]]:
        return [f for f in self.frames if f[0] >= t]


class Subscriber:
    """Answers a server offer and decodes every track it receives."""

    def __init__(self, config: RTCConfiguration | None = None) -> None:
        self.pc = client_pc(config)
        self.received = Received()
        self.tasks: list[asyncio.Task[None]] = []
        self.first_payload: dict[str, bytes] = {}
        self.first_extensions: dict[str, Any] = {}

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tasks.append(asyncio.ensure_future(self._consume(track)))

    async def answer(self, offer_sdp: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        for receiver in self.pc.getReceivers():
            self._record_first_packet(receiver)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp

    def _record_first_packet(self, receiver: Any) -> None:
        """Keep the first RTP payload of each kind (to check what the SFU started with)."""
        original = receiver._handle_rtp_packet

        async def handle(packet: Any, arrival_time_ms: int) -> None:
            self.first_payload.setdefault(receiver.track.kind, packet.payload)
            self.first_extensions.setdefault(receiver.track.kind, packet.extensions)
            await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = handle

    async def _consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame: Any = await track.recv()
                now = time.monotonic()
                if track.kind == "video":
                    if self.received.first_frame_at is None:
                        self.received.first_frame_at = now
                    key = bool(getattr(frame, "key_frame", False))
                    self.received.frames.append((now, frame.width, frame.height, key))
                else:
                    self.received.audio_frames += 1
        except Exception:
            return

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await self.pc.close()
