"""What a test checks an H264 RTP payload against, read with aiortc's own depacketizer
(independent of media/h264.py): the NAL unit types that start in it."""

from __future__ import annotations

from aiortc.codecs.h264 import H264PayloadDescriptor


def starting_nal_types(payload: bytes) -> list[int]:
    """Types of the NAL units that start in this payload (none for an FU-A continuation)."""
    descriptor, annexb = H264PayloadDescriptor.parse(payload)
    if not descriptor.first_fragment:
        return []
    return [unit[0] & 0x1F for unit in annexb.split(b"\x00\x00\x00\x01") if unit]


def starts_idr_access_unit(payload: bytes) -> bool:
    """True if the payload is the head of an IDR access unit: it carries the SPS, or the
    first fragment of an IDR slice."""
    types = starting_nal_types(payload)
    return 7 in types or (bool(types) and types[0] == 5)
