"""Pre-encoded media for synthetic clients: no encoder in the hot loop.

At start-up ``encode_media()`` encodes a few seconds of moving, textured video
(640x480 at 30 fps by default) to VP8 with libvpx through PyAV, configured as
aiortc's own ``Vp8Encoder`` is (real-time CBR) but without its 250 kbps-1.5 Mbps
clamp, at the target bitrate (up to two more passes at a corrected target when
a pass lands more than ``BITRATE_TOLERANCE`` off it), a keyframe every
``keyframe_interval`` frames and at frame 0; and a tone to Opus (aiortc's
``OpusEncoder`` at ``audio_bitrate``, 20 ms frames). The frames are raw VP8,
because aiortc's sender packetizes what a track hands it: when ``track.recv()`` returns an ``av.Packet``
instead of an ``av.Frame``, ``RTCRtpSender`` calls ``encoder.pack(packet)``,
which for VP8 splits ``bytes(packet)`` into RTP payloads (with a fresh picture
id) and for Opus sends it as is; ``pts``/``time_base`` give the RTP timestamp.

``PreEncodedTrack`` replays those frames in a loop at real-time pace with ever
increasing timestamps; ``set_muted(True)`` stops it sending (its ``recv()`` waits)
and ``set_muted(False)`` resumes at real-time pace, timestamps advanced by the
muted time (no catch-up burst), video with a keyframe. Keyframes: the sequence starts with one and has one
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
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_CLOCK = 90000
AUDIO_CLOCK = 48000
AUDIO_SAMPLES = 960  # 20 ms at 48 kHz, what aiortc's OpusEncoder produces per packet
BITRATE_TOLERANCE = 0.1


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
    """Camera-like content that moves every frame: a smooth texture scrolling, a
    sweeping bar, a slowly changing tint and a little sensor grain. Smooth enough
    that a keyframe is ~10x a delta frame, as from a camera, not ~25x as from noise."""
    rng = numpy.random.default_rng(1234)
    low = rng.integers(0, 256, (height // 4 + 1, width // 2 + 1, 3), dtype=numpy.uint8)
    texture = numpy.repeat(numpy.repeat(low, 4, axis=0), 4, axis=1)[:height, : width * 2].astype(numpy.int16)
    for _ in range(2):  # blur the blocks into texture
        texture = (texture + numpy.roll(texture, 2, axis=0) + numpy.roll(texture, 2, axis=1)
                   + numpy.roll(texture, 2, axis=(0, 1))) // 4
    grain = [rng.integers(-4, 5, (height, width, 3), dtype=numpy.int16) for _ in range(7)]
    frames = []
    for i in range(count):
        x = (i * 4) % width
        image = texture[:, x : x + width] + grain[i % len(grain)]
        bar = (i * 12) % width
        image[:, bar : bar + 40, 1] = 255
        image[:, :, 2] = image[:, :, 2] // 2 + (i * 3) % 128
        frame = av.VideoFrame.from_ndarray(numpy.clip(image, 0, 255).astype(numpy.uint8), format="bgr24")
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


def _encode_vp8(frames: list[av.VideoFrame], bitrate: int, keyframe_interval: int) -> list[EncodedFrame]:
    """libvpx in real-time CBR mode, settings as aiortc's ``Vp8Encoder`` (see its source)."""
    first = frames[0]
    codec = av.CodecContext.create("libvpx", "w")
    codec.width = first.width
    codec.height = first.height
    codec.bit_rate = bitrate
    codec.pix_fmt = "yuv420p"
    codec.gop_size = 3000  # keyframes only where forced
    codec.qmin = 2
    codec.qmax = 56
    codec.options = {"bufsize": str(bitrate), "cpu-used": "-6", "deadline": "realtime", "lag-in-frames": "0",
                     "minrate": str(bitrate), "maxrate": str(bitrate), "noise-sensitivity": "4",
                     "overshoot-pct": "15", "partitions": "0", "static-thresh": "1", "undershoot-pct": "100",
                     # As libwebrtc: a keyframe at most 9x a frame's share (its MaxIntraTarget at 30 fps).
                     "max-intra-rate": "900"}
    codec.thread_count = 2
    encoded: list[EncodedFrame] = []
    for i, frame in enumerate(frames):
        frame = frame.reformat(format="yuv420p")
        frame.pict_type = av.video.frame.PictureType.I if i % keyframe_interval == 0 else \
            av.video.frame.PictureType.NONE
        data = b"".join(bytes(packet) for packet in codec.encode(frame))
        encoded.append(EncodedFrame(data, vp8_is_keyframe(data)))
    return encoded


def encode_media(seconds: float = 10.0, fps: int = 30, width: int = 640, height: int = 480,
                 bitrate: int = 1_000_000, keyframe_interval: int = 60,
                 audio_bitrate: int = 96_000) -> EncodedMedia:
    """Encode ``seconds`` of video and audio once (a few seconds of CPU for 10 s).
    The video's mean bitrate lands within ``BITRATE_TOLERANCE`` of ``bitrate``
    when the content allows it (a second pass corrects the first's error)."""
    count = max(1, round(seconds * fps))
    frames = _video_frames(count, width, height, fps)
    target = bitrate
    video: list[EncodedFrame] = []
    for _ in range(3):
        video = _encode_vp8(frames, target, keyframe_interval)
        actual = sum(len(f.data) for f in video) * 8 * fps / count
        if abs(actual - bitrate) <= BITRATE_TOLERANCE * bitrate or actual <= 0:
            break
        target = max(10_000, round(target * bitrate / actual))
    opus = OpusEncoder()
    opus.codec.bit_rate = audio_bitrate  # aiortc's default is 96 kbps; its codec opens on first use
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
        self._unmuted = asyncio.Event()
        self._unmuted.set()
        self._muted_at = 0.0
        self.keyframe_requests = 0

    @property
    def muted(self) -> bool:
        return not self._unmuted.is_set()

    def set_muted(self, muted: bool) -> None:
        """Stop sending (``recv()`` waits) or resume at real-time pace: the frames
        the muted time would have held are skipped in the timestamps, not sent."""
        if muted == self.muted:
            return
        if muted:
            self._muted_at = time.monotonic()
            self._unmuted.clear()
            return
        if self._start is not None:
            self._sent += int((time.monotonic() - self._muted_at) / self._period)
            self._start = time.monotonic() - self._sent * self._period
        if self.kind == "video":
            self._index = self._keyframes[0]
        self._unmuted.set()

    def request_keyframe(self) -> None:
        """Make the next frame a keyframe: jump back to the sequence's first one."""
        self.keyframe_requests += 1
        self._index = self._keyframes[0]

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if not self._unmuted.is_set():
            await self._unmuted.wait()
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
