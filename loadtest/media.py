"""Pre-encoded media for synthetic clients: no encoder in the hot loop.

At start-up ``encode_media()`` encodes a few seconds of moving, textured 640x480
video at 30 fps to VP8 (aiortc's own ``Vp8Encoder``, ~1 Mbps, a keyframe every
``keyframe_interval`` frames and at frame 0) and a tone to Opus (aiortc's
``OpusEncoder``, 20 ms frames). The VP8 RTP payloads the encoder returns are
depayloaded back to raw VP8 frames, because aiortc's sender re-packetizes what
a track hands it: when ``track.recv()`` returns an ``av.Packet`` instead of an
``av.Frame``, ``RTCRtpSender`` calls ``encoder.pack(packet)``, which for VP8
splits ``bytes(packet)`` into RTP payloads (with a fresh picture id) and for
Opus sends it as is; ``pts``/``time_base`` give the RTP timestamp.

``PreEncodedTrack`` replays those frames in a loop at real-time pace with ever
increasing timestamps. Keyframes: the sequence starts with one and has one
every ``keyframe_interval`` frames (2 s by default), and ``request_keyframe()``
(hooked to the sender's PLI/FIR handling by ``loadtest.hooks``) makes the next
frame the sequence's first keyframe, so a new subscriber does not wait 2 s.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_CLOCK = 90000
AUDIO_CLOCK = 48000
AUDIO_SAMPLES = 960  # 20 ms at 48 kHz, what aiortc's OpusEncoder produces per packet


@dataclass(frozen=True)
class EncodedFrame:
    """One encoded frame: its codec bitstream and whether a decoder can start at it."""

    data: bytes
    keyframe: bool


@dataclass(frozen=True)
class EncodedMedia:
    """The encoded sequences a ``PreEncodedTrack`` loops over."""

    video: tuple[EncodedFrame, ...]
    audio: tuple[bytes, ...]
    fps: int
    width: int
    height: int

    @property
    def video_seconds(self) -> float:
        return len(self.video) / self.fps

    @property
    def video_bitrate(self) -> float:
        """Mean VP8 bitstream rate in bits per second (RTP overhead not counted)."""
        return sum(len(f.data) for f in self.video) * 8 / self.video_seconds


def vp8_is_keyframe(frame: bytes) -> bool:
    """A raw VP8 frame is a keyframe when bit 0 of its first byte is 0 (RFC 6386 §9.1)."""
    return bool(frame) and not frame[0] & 0x01


def _video_frames(count: int, width: int, height: int, fps: int) -> list[av.VideoFrame]:
    """Textured content that moves every frame (a scrolling noise field, a sweeping
    bar and a slowly changing tint), so the encoder has real work at 1 Mbps."""
    rng = numpy.random.default_rng(1234)
    texture = rng.integers(0, 256, (height, width * 2, 3), dtype=numpy.uint8)
    # Blur the noise a little so it behaves like texture, not like sensor noise.
    texture = ((texture.astype(numpy.uint16) + numpy.roll(texture, 1, axis=0) + numpy.roll(texture, 1, axis=1)
                + numpy.roll(texture, 1, axis=(0, 1))) // 4).astype(numpy.uint8)
    frames = []
    for i in range(count):
        x = (i * 4) % width
        image = numpy.ascontiguousarray(texture[:, x : x + width])
        bar = (i * 12) % width
        image[:, bar : bar + 40, 1] = 255
        image[:, :, 2] = (image[:, :, 2] // 2 + (i * 3) % 128).astype(numpy.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="bgr24")
        frame.pts = i * (VIDEO_CLOCK // fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        frames.append(frame)
    return frames


def _audio_frames(count: int) -> list[av.AudioFrame]:
    """A 440 Hz tone with a slow tremolo, stereo s16, 20 ms per frame."""
    frames = []
    t = numpy.arange(count * AUDIO_SAMPLES) / AUDIO_CLOCK
    signal = (0.3 * numpy.sin(2 * numpy.pi * 440 * t) * (0.6 + 0.4 * numpy.sin(2 * numpy.pi * 0.5 * t)))
    samples = (signal * 32767).astype(numpy.int16)
    for i in range(count):
        chunk = samples[i * AUDIO_SAMPLES : (i + 1) * AUDIO_SAMPLES]
        interleaved = numpy.repeat(chunk, 2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout="stereo")
        frame.sample_rate = AUDIO_CLOCK
        frame.pts = i * AUDIO_SAMPLES
        frame.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        frames.append(frame)
    return frames


def encode_media(seconds: float = 10.0, fps: int = 30, width: int = 640, height: int = 480,
                 bitrate: int = 1_000_000, keyframe_interval: int = 60) -> EncodedMedia:
    """Encode ``seconds`` of video and audio once (a few seconds of CPU for 10 s)."""
    count = max(1, round(seconds * fps))
    encoder = Vp8Encoder()
    encoder.target_bitrate = bitrate
    video = []
    for i, frame in enumerate(_video_frames(count, width, height, fps)):
        payloads, _ = encoder.encode(frame, force_keyframe=i % keyframe_interval == 0)
        data = b"".join(vp8_depayload(p) for p in payloads)
        video.append(EncodedFrame(data, vp8_is_keyframe(data)))
    opus = OpusEncoder()
    audio: list[bytes] = []
    for audio_frame in _audio_frames(max(1, round(seconds * AUDIO_CLOCK / AUDIO_SAMPLES))):
        packets, _ = opus.encode(audio_frame)
        audio.extend(packets)
    return EncodedMedia(tuple(video), tuple(audio), fps, width, height)


class PreEncodedTrack(MediaStreamTrack):
    """A track whose ``recv()`` returns pre-encoded ``av.Packet``s in a loop, paced
    in real time; aiortc's sender only packetizes them (see the module docstring)."""

    def __init__(self, kind: str, media: EncodedMedia) -> None:
        super().__init__()
        self.kind = kind
        if kind == "video":
            self._frames = [f.data for f in media.video]
            self._keyframes = [i for i, f in enumerate(media.video) if f.keyframe]
            self._step = VIDEO_CLOCK // media.fps
            self._time_base = fractions.Fraction(1, VIDEO_CLOCK)
            self._period = 1.0 / media.fps
        else:
            self._frames = list(media.audio)
            self._keyframes = [0]
            self._step = AUDIO_SAMPLES
            self._time_base = fractions.Fraction(1, AUDIO_CLOCK)
            self._period = AUDIO_SAMPLES / AUDIO_CLOCK
        if not self._frames or not self._keyframes:
            raise ValueError(f"no {kind} frames to send (or no keyframe among them)")
        self._index = 0
        self._sent = 0
        self._start: float | None = None
        self.keyframe_requests = 0

    def request_keyframe(self) -> None:
        """Make the next frame a keyframe: jump back to the sequence's first one."""
        self.keyframe_requests += 1
        self._index = self._keyframes[0]

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        delay = self._start + self._sent * self._period - now
        if delay > 0:
            await asyncio.sleep(delay)
        packet = av.Packet(self._frames[self._index])
        packet.pts = self._sent * self._step
        packet.time_base = self._time_base
        self._sent += 1
        self._index = (self._index + 1) % len(self._frames)
        return packet


def save_media(media: EncodedMedia, path: Path) -> None:
    """Write ``media`` to one file (a JSON header line, then the frames' bytes), so
    several client processes can share one encode."""
    header = {"fps": media.fps, "width": media.width, "height": media.height,
              "video": [[len(f.data), f.keyframe] for f in media.video], "audio": [len(a) for a in media.audio]}
    with path.open("wb") as out:
        out.write(json.dumps(header).encode() + b"\n")
        for frame in media.video:
            out.write(frame.data)
        for packet in media.audio:
            out.write(packet)


def load_media(path: Path) -> EncodedMedia:
    """Read a file written by ``save_media``."""
    with path.open("rb") as source:
        header = json.loads(source.readline())
        video = tuple(EncodedFrame(source.read(size), bool(key)) for size, key in header["video"])
        audio = tuple(source.read(size) for size in header["audio"])
    return EncodedMedia(video, audio, int(header["fps"]), int(header["width"]), int(header["height"]))
