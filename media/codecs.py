"""Which codec a publish is relayed in, and whether a subscriber can receive it.

The SFU never transcodes, so both legs of a forwarded track carry the publisher's codec.
Audio is Opus. Video is VP8 or H264 (packetization-mode 1, constrained baseline or
baseline profile: what every browser offers and decodes). VP8 is preferred when a publisher
offers both: every WebRTC endpoint must decode it (RFC 7742), so any subscriber can receive
it. A publisher that offers only H264 is relayed in H264, and a subscriber whose answer
cannot receive that gets ``CodecNotSupported`` instead of black video.

Pure functions over aiortc's parsed SDP; the codec objects are aiortc's own capabilities,
so ``setCodecPreferences`` accepts them and the SDP carries their fmtp unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

from aiortc import RTCRtpReceiver
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.sdp import parse_h264_profile_level_id

from media.errors import CodecNotSupported

VP8: Final = "video/VP8"
H264: Final = "video/H264"
OPUS: Final = "audio/opus"
RTX: Final = "video/rtx"
#: What an H264 offer without profile-level-id means (RFC 6184 §8.1: baseline, level 1.0
#: in the RFC; WebRTC stacks read it as constrained baseline 3.1, and so does aiortc).
_DEFAULT_PROFILE_LEVEL_ID: Final = "42e01f"
#: The H264 profile-level-ids relayed, in order of preference: constrained baseline first
#: (every browser decodes it), then baseline.
H264_PROFILES: Final = ("42e01f", "42001f")


def _capabilities(kind: str) -> list[RTCRtpCodecCapability]:
    caps = RTCRtpReceiver.getCapabilities(kind)
    assert caps is not None
    return list(caps.codecs)


#: Offered codecs an error message names at most (an offer may list dozens).
MAX_NAMED: Final = 8


def _token(value: object) -> str:
    """A value from a client's SDP made safe to quote: letters, digits, '-', '.', at most 16."""
    return re.sub(r"[^0-9A-Za-z.\-]", "?", str(value)[:16])


def describe(codec: Any) -> str:
    """A codec as a person reads it: "VP8", or "H264 (profile-level-id 42e01f, packetization-mode 1)"."""
    name = _token(str(codec.mimeType).split("/")[-1])
    if str(codec.mimeType).lower() != H264.lower():
        return name
    return (f"{name} (profile-level-id {_token(codec.parameters.get('profile-level-id', _DEFAULT_PROFILE_LEVEL_ID))}, "
            f"packetization-mode {_token(codec.parameters.get('packetization-mode', 0))})")


def _h264_profile(codec: Any) -> Any:
    """The profile of an H264 codec (level ignored), or None if its profile-level-id is invalid."""
    try:
        return parse_h264_profile_level_id(str(codec.parameters.get("profile-level-id", _DEFAULT_PROFILE_LEVEL_ID)))[0]
    except ValueError:
        return None


def compatible(ours: Any, theirs: Any) -> bool:
    """True if a remote codec (from an SDP) is the same codec as one of ours: same MIME type
    and clock rate, and for H264 the same packetization mode and profile (levels may differ:
    level-asymmetry-allowed)."""
    if str(ours.mimeType).lower() != str(theirs.mimeType).lower() or ours.clockRate != theirs.clockRate:
        return False
    if str(ours.mimeType).lower() != H264.lower():
        return True
    mode = str(theirs.parameters.get("packetization-mode", "0"))
    profile = _h264_profile(theirs)
    return mode == str(ours.parameters.get("packetization-mode", "0")) and profile is not None \
        and profile == _h264_profile(ours)


def choose(kind: str, offered: Iterable[Any]) -> RTCRtpCodecCapability:
    """The codec a publish's ``kind`` section is relayed in, from the codecs it offers:
    Opus for audio; for video VP8 if offered, else the first relayed H264 profile offered
    with packetization-mode 1. Raises ``CodecNotSupported`` naming what was offered."""
    offered = [c for c in offered if str(c.mimeType).lower() != RTX]
    caps = _capabilities(kind)
    if kind == "audio":
        wanted = [c for c in caps if c.mimeType.lower() == OPUS]
    else:
        wanted = [c for c in caps if c.mimeType.lower() == VP8.lower()]
        wanted += sorted((c for c in caps if c.mimeType.lower() == H264.lower()
                          and c.parameters.get("profile-level-id") in H264_PROFILES
                          and str(c.parameters.get("packetization-mode")) == "1"),
                         key=lambda c: H264_PROFILES.index(str(c.parameters["profile-level-id"])))
    for ours in wanted:
        if any(compatible(ours, theirs) for theirs in offered):
            return ours
    named = list(dict.fromkeys(describe(c) for c in offered))
    names = ", ".join(named[:MAX_NAMED]) + (f" and {len(named) - MAX_NAMED} more" if len(named) > MAX_NAMED else "")
    names = names or "none"
    accepted = "Opus" if kind == "audio" else \
        "VP8, or H264 with packetization-mode 1 in the constrained baseline or baseline profile"
    raise CodecNotSupported(f"the offer's {kind} section has no codec the server relays (offered: {names}; "
                            f"accepted: {accepted})")


def preferences(codec: RTCRtpCodecCapability, with_rtx: bool) -> list[RTCRtpCodecCapability]:
    """The list to pass to ``setCodecPreferences`` to negotiate exactly ``codec`` (plus RTX)."""
    rtx = [c for c in _capabilities("video") if c.mimeType.lower() == RTX] if with_rtx and codec.mimeType.lower() \
        .startswith("video/") else []
    return [codec, *rtx]


def check_answer(kind: str, codec: RTCRtpCodecCapability, answered: Iterable[Any], stream_id: str) -> None:
    """Raise ``CodecNotSupported`` unless a subscriber's answer for ``kind`` can receive
    ``codec``, the codec the stream is published in."""
    if not any(compatible(codec, theirs) for theirs in answered):
        raise CodecNotSupported(f'this client cannot receive {describe(codec)}, the {kind} codec stream '
                                f'"{stream_id}" is published in; the SFU does not transcode')
