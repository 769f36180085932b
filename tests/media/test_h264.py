"""H264 keyframe detection and SPS frame size (media/h264.py) on real libx264 output, as
Annex-B NAL units and as aiortc's RTP payloads (single NAL, STAP-A, FU-A), and on hostile bytes."""

from __future__ import annotations

import fractions

import av
import numpy
import pytest
from aiortc.codecs.h264 import H264Encoder
from hypothesis import given
from hypothesis import strategies as st

from media.h264 import (
    find_sps,
    h264_is_keyframe,
    h264_keyframe_size,
    nal_types,
    sps_frame_size,
)


def annexb_nals(width: int, height: int, pix_fmt: str = "yuv420p", profile: str | None = None,
                params: str = "") -> list[bytes]:
    """The NAL units libx264 writes for one frame (its first: SPS, PPS, SEI, IDR)."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, pix_fmt
    codec.time_base = fractions.Fraction(1, 30)
    if profile:
        codec.profile = profile
    codec.options = {"tune": "zerolatency", **({"x264-params": params} if params else {})}
    frame = av.VideoFrame.from_ndarray(numpy.zeros((height, width, 3), numpy.uint8), format="rgb24")
    frame = frame.reformat(format=pix_fmt)
    frame.pts = 0
    data = b"".join(bytes(p) for p in codec.encode(frame)) + b"".join(bytes(p) for p in codec.encode(None))
    return [n for n in (part.rstrip(b"\x00") for part in data.split(b"\x00\x00\x01")) if n]


def sps_of(nals: list[bytes]) -> bytes:
    return next(n for n in nals if n[0] & 0x1F == 7)


@pytest.mark.parametrize(("width", "height", "pix_fmt", "profile", "params", "profile_idc"), [
    (640, 480, "yuv420p", "Baseline", "", 66),  # constrained baseline, what aiortc sends
    (1280, 720, "yuv420p", "Main", "", 77),
    (1920, 1080, "yuv420p", "High", "", 100),  # 1088 coded rows cropped to 1080
    (330, 250, "yuv420p", None, "", 100),  # cropping on both axes
    (330, 250, "yuv422p", None, "", 122),  # 4:2:2 crop units
    (320, 240, "yuv444p", None, "", 244),  # 4:4:4 crop units
    (64, 64, "gray", None, "", 100),  # monochrome (chroma_format_idc 0)
    (1920, 1080, "yuv420p", None, "interlaced=1", 100),  # field pairs: crop unit 4 rows
    (640, 360, "yuv420p", "High", "cqm=jvt", 100),  # scaling matrices in the SPS
])
def test_sps_frame_size_of_libx264_streams(width: int, height: int, pix_fmt: str, profile: str | None,
                                           params: str, profile_idc: int) -> None:
    sps = sps_of(annexb_nals(width, height, pix_fmt, profile, params))
    assert sps[1] == profile_idc
    assert sps_frame_size(sps) == (width, height)


def test_rtp_payloads_of_a_keyframe_and_a_delta_frame() -> None:
    """aiortc's packetizer: SPS+PPS(+SEI) aggregated in a STAP-A, then the IDR in FU-A
    fragments; a delta frame starts with no SPS and no IDR."""
    encoder = H264Encoder()
    image = numpy.random.default_rng(1).integers(0, 255, (480, 640, 3), numpy.uint8)
    frames = []
    for i in range(3):
        frame = av.VideoFrame.from_ndarray(numpy.roll(image, i * 8, axis=1), format="bgr24")
        frame.pts, frame.time_base = i * 3000, fractions.Fraction(1, 90000)
        frames.append(encoder.encode(frame, force_keyframe=i == 0)[0])
    key, delta = frames[0], frames[2]
    assert key[0][0] & 0x1F == 24 and 7 in nal_types(key[0])
    assert h264_is_keyframe(key[0])
    assert h264_keyframe_size(key[0]) == (640, 480)
    fu_starts = [p for p in key if p[0] & 0x1F == 28 and p[1] & 0x80]
    assert fu_starts and all(h264_is_keyframe(p) for p in fu_starts)  # the IDR's first fragment
    assert not any(h264_is_keyframe(p) for p in key if p[0] & 0x1F == 28 and not p[1] & 0x80)
    assert not any(h264_is_keyframe(p) for p in delta)
    assert all(h264_keyframe_size(p) is None for p in delta)


def test_single_nal_payloads() -> None:
    nals = annexb_nals(176, 144, profile="Baseline")
    types = [n[0] & 0x1F for n in nals]
    assert types[:2] == [7, 8]
    for nal in nals:
        assert nal_types(nal) == [nal[0] & 0x1F]
        assert h264_is_keyframe(nal) == (nal[0] & 0x1F in (5, 7))
    assert h264_keyframe_size(nals[0]) == (176, 144)
    assert find_sps(nals[1]) is None  # a PPS


def test_stap_a_with_the_sps_after_other_units() -> None:
    nals = annexb_nals(320, 240)
    sps, pps = sps_of(nals), next(n for n in nals if n[0] & 0x1F == 8)
    stap = bytes([0x78]) + b"".join(len(n).to_bytes(2, "big") + n for n in (pps, sps))
    assert nal_types(stap) == [8, 7]
    assert h264_is_keyframe(stap)
    assert find_sps(stap) == sps
    assert h264_keyframe_size(stap) == (320, 240)


@pytest.mark.parametrize("payload", [
    b"", b"\x00", b"\x1c", b"\x1c\x05", b"\x1c\x45", b"\x18", b"\x18\x00\x00", b"\x18\xff\xff\x67",
    b"\x67", b"\x67\x42", b"\x67\x42\xc0\x1e", b"\x67" + b"\x00" * 40, b"\x67" + b"\xff" * 40,
    b"\x1f\x00", b"\x1e\x00",
])
def test_hostile_payloads_give_false_or_none(payload: bytes) -> None:
    h264_is_keyframe(payload)  # no exception; the verdict on junk does not matter
    assert nal_types(payload) is not None
    size = h264_keyframe_size(payload)
    assert size is None or (size[0] > 0 and size[1] > 0)


def test_truncated_sps_gives_none_or_the_true_size() -> None:
    """The size fields come before the VUI: a cut inside them gives None, a cut after them
    (in the VUI) still the right size, and never a wrong one."""
    sps = sps_of(annexb_nals(640, 480))
    sizes = [sps_frame_size(sps[:n]) for n in range(len(sps) + 1)]
    assert set(sizes) == {None, (640, 480)}
    assert sizes[:6] == [None] * 6


def test_fu_a_start_of_a_non_idr_slice_is_not_a_keyframe() -> None:
    assert not h264_is_keyframe(bytes([0x7C, 0x81, 0x00]))  # FU-A, S=1, type 1
    assert h264_is_keyframe(bytes([0x7C, 0x85, 0x00]))  # FU-A, S=1, type 5
    assert not h264_is_keyframe(bytes([0x7C, 0x05, 0x00]))  # FU-A, S=0, type 5 (a middle part)


@given(st.binary(max_size=300))
def test_any_bytes_are_safe(payload: bytes) -> None:
    h264_is_keyframe(payload)
    nal_types(payload)
    size = h264_keyframe_size(payload)
    assert size is None or (0 < size[0] <= 16384 and 0 < size[1] <= 16384)
    sps_frame_size(bytes([0x67]) + payload)
