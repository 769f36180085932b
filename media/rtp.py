"""Pure RTP/RTCP helpers for forwarding: VP8 keyframe and size detection, the
rewritten header a subscriber gets, and the RTCP packets an SFU sends."""

from __future__ import annotations

import struct
import time
from typing import Final

from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtcpSenderInfo,
    RtcpSrPacket,
    pack_remb_fci,
)

NTP_EPOCH_OFFSET: Final = 2208988800
_HEADER = struct.Struct("!BBHII")


def ntp_now(now: float | None = None) -> int:
    """Wall time (``now``, default the current time) as a 64-bit NTP timestamp."""
    return int(((time.time() if now is None else now) + NTP_EPOCH_OFFSET) * 4294967296.0)


def vp8_payload_start(payload: bytes) -> int:
    """Offset of the VP8 payload header after the payload descriptor (RFC 7741 §4.2),
    or -1 if this packet does not start a partition 0."""
    if len(payload) < 1:
        return -1
    first = payload[0]
    # S bit set and partition index 0: this packet starts a frame.
    if not (first & 0x10) or (first & 0x07):
        return -1
    pos = 1
    if first & 0x80:  # X: extension byte follows
        if len(payload) < 2:
            return -1
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if len(payload) <= pos:
                return -1
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            pos += 1
        if ext & 0x30:  # T or K: TID/KEYIDX
            pos += 1
    return pos if pos < len(payload) else -1


def vp8_is_keyframe(payload: bytes) -> bool:
    """True if this RTP payload starts a VP8 keyframe (P bit of the frame tag is 0)."""
    pos = vp8_payload_start(payload)
    return pos >= 0 and not (payload[pos] & 0x01)


def vp8_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) from the start of a VP8 keyframe, else None."""
    pos = vp8_payload_start(payload)
    if pos < 0 or payload[pos] & 0x01 or len(payload) < pos + 10:
        return None
    if payload[pos + 3 : pos + 6] != b"\x9d\x01\x2a":
        return None
    width, height = struct.unpack_from("<HH", payload, pos + 6)
    return width & 0x3FFF, height & 0x3FFF


def one_byte_extensions(elements: list[tuple[int, bytes]]) -> bytes:
    """An RFC 8285 one-byte-header extension block (profile 0xBEDE), padded to 32 bits."""
    body = b"".join(bytes([(ext_id << 4) | (len(value) - 1)]) + value for ext_id, value in elements)
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("!HH", 0xBEDE, len(body) // 4) + body


def rtp_header(marker: int, payload_type: int, seq: int, timestamp: int, ssrc: int, extensions: bytes) -> bytes:
    """The 12-byte RTP header (X bit set when there are extensions) plus the extension block."""
    return _HEADER.pack(0x90 if extensions else 0x80, (marker << 7) | payload_type, seq, timestamp, ssrc) + extensions


def sender_report(ssrc: int, ntp: int, rtp_timestamp: int, packets: int, octets: int) -> bytes:
    return bytes(
        RtcpSrPacket(
            ssrc=ssrc,
            sender_info=RtcpSenderInfo(
                ntp_timestamp=ntp,
                rtp_timestamp=rtp_timestamp & 0xFFFFFFFF,
                packet_count=packets & 0xFFFFFFFF,
                octet_count=octets & 0xFFFFFFFF,
            ),
        )
    )


def pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    return bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=sender_ssrc, media_ssrc=media_ssrc))


def nack(sender_ssrc: int, media_ssrc: int, lost: list[int]) -> bytes:
    packet = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=sender_ssrc, media_ssrc=media_ssrc)
    packet.lost = sorted(lost)
    return bytes(packet)


def remb(sender_ssrc: int, bitrate: int, media_ssrcs: list[int]) -> bytes:
    return bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=sender_ssrc, media_ssrc=0,
                                fci=pack_remb_fci(bitrate, media_ssrcs)))
