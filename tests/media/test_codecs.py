"""Codec choice per publish and the subscriber's answer check (media/codecs.py), on the
codec lists browsers offer."""

from __future__ import annotations

import itertools

import pytest
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from media import codecs
from media.errors import CodecNotSupported

PT = itertools.cycle(range(96, 128))


def h264(profile_level_id: str | None, mode: int | None = 1) -> RTCRtpCodecParameters:
    parameters: dict[str, str | int | None] = {"level-asymmetry-allowed": 1}
    if mode is not None:
        parameters["packetization-mode"] = mode
    if profile_level_id is not None:
        parameters["profile-level-id"] = profile_level_id
    return RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=next(PT), parameters=parameters)


def codec(mime_type: str, clock_rate: int = 90000) -> RTCRtpCodecParameters:
    return RTCRtpCodecParameters(mimeType=mime_type, clockRate=clock_rate, payloadType=next(PT))


#: Chromium's video offer (as `RTCRtpSender.getCapabilities` lists it here), in order.
CHROMIUM_H264 = [h264("42001f"), h264("42001f", 0), h264("42e01f"), h264("42e01f", 0), h264("4d001f"),
                 h264("4d001f", 0)]
CHROMIUM = [codec("video/VP8"), codec("video/rtx"), *CHROMIUM_H264, codec("video/AV1"), codec("video/VP9")]


def chosen(kind: str, offered: list[RTCRtpCodecParameters]) -> str:
    return codecs.describe(codecs.choose(kind, offered))


def test_vp8_is_preferred_when_offered_with_h264() -> None:
    assert chosen("video", CHROMIUM) == "VP8"
    assert chosen("video", [*CHROMIUM_H264, codec("video/VP8")]) == "VP8"


@pytest.mark.parametrize(("offered", "expected"), [
    (CHROMIUM_H264, "42e01f"),  # constrained baseline first, whatever the offer's order
    ([h264("42e034")], "42e01f"),  # another level of the same profile
    ([h264("640c1f"), h264("42001f")], "42001f"),  # constrained high is not relayed; baseline is
    ([h264("4d801f")], "42e01f"),  # main with constraint_set0: constrained baseline (RFC 6184)
    ([h264(None)], "42e01f"),  # no profile-level-id: constrained baseline 3.1
])
def test_h264_only_offers(offered: list[RTCRtpCodecParameters], expected: str) -> None:
    assert chosen("video", offered) == f"H264 (profile-level-id {expected}, packetization-mode 1)"


@pytest.mark.parametrize(("kind", "offered", "named"), [
    ("video", [h264("42e01f", 0), h264("42e01f", None)], "H264 (profile-level-id 42e01f, packetization-mode 0)"),
    ("video", [h264("64001f"), h264("4d001f")],
     "H264 (profile-level-id 64001f, packetization-mode 1), H264 (profile-level-id 4d001f, packetization-mode 1)"),
    ("video", [h264("zz\u202ezz\nz" + "z" * 100)], "H264 (profile-level-id zz?zz?zzzzzzzzzz, packetization-mode 1)"),
    ("video", [codec(f"video/X{i}") for i in range(20)], "X0, X1, X2, X3, X4, X5, X6, X7 and 12 more"),
    ("video", [codec("video/VP9"), codec("video/AV1")], "VP9, AV1"),
    ("video", [codec("video/rtx")], "none"),
    ("audio", [codec("audio/PCMU", 8000)], "PCMU"),
])
def test_offers_without_a_relayed_codec_are_refused(kind: str, offered: list[RTCRtpCodecParameters],
                                                    named: str) -> None:
    with pytest.raises(CodecNotSupported) as refused:
        codecs.choose(kind, offered)
    assert f"(offered: {named};" in str(refused.value)
    assert refused.value.code == "codec_not_supported"


def test_the_answer_check() -> None:
    ours = codecs.choose("video", [h264("42e01f")])
    codecs.check_answer("video", ours, [h264("42e01f")], "st1")
    codecs.check_answer("video", ours, [codec("video/VP8"), h264("42e02a")], "st1")  # a level up: fine
    for answered in ([], [codec("video/VP8")], [h264("42e01f", 0)], [h264("42001f")], [h264("64001f")]):
        with pytest.raises(CodecNotSupported, match='cannot receive H264 .* stream "st1"'):
            codecs.check_answer("video", ours, answered, "st1")
    vp8 = codecs.choose("video", CHROMIUM)
    codecs.check_answer("video", vp8, [codec("video/VP8")], "st1")
    with pytest.raises(CodecNotSupported, match="cannot receive VP8"):
        codecs.check_answer("video", vp8, CHROMIUM_H264, "st1")


def test_preferences_are_aiortc_capabilities() -> None:
    chosen_codec = codecs.choose("video", CHROMIUM_H264)
    assert [c.mimeType for c in codecs.preferences(chosen_codec, with_rtx=True)] == ["video/H264", "video/rtx"]
    assert codecs.preferences(chosen_codec, with_rtx=False) == [chosen_codec]
    opus = codecs.choose("audio", [codec("audio/opus", 48000)])
    assert codecs.preferences(opus, with_rtx=True) == [opus]
