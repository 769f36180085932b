"""Pure RTP/RTCP helpers for forwarding: parsing an incoming packet with only what the
forwarder reads (``parse_rtp``), VP8 keyframe and size detection, the rewritten packet a
subscriber gets (``RtpWriter``), and the RTCP packets an SFU sends."""

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
    HeaderExtensions,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
)

NTP_EPOCH_OFFSET: Final = 2208988800
_HEADER = struct.Struct("!BBHII")
_unpack_header = _HEADER.unpack_from
#: The ``extensions`` of every parsed packet that carries no audio level (shared, never written).
NO_EXTENSIONS: Final = HeaderExtensions()


class ParsedRtp(RtpPacket):
    """An incoming RTP packet as ``parse_rtp`` leaves it: aiortc's ``RtpPacket`` (what its
    receiver statistics, NACK generator and RTX unwrapping read), built without the
    per-packet ``HeaderExtensions`` and CSRC list aiortc's parser allocates."""

    def __init__(self, marker: int, payload_type: int, sequence_number: int, timestamp: int, ssrc: int,
                 payload: bytes, padding_size: int, extensions: HeaderExtensions) -> None:
        self.version = 2
        self.marker = marker
        self.payload_type = payload_type
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.csrc = []
        self.extensions = extensions
        self.payload = payload
        self.padding_size = padding_size


def parse_rtp(data: bytes, audio_level_id: int = 0) -> RtpPacket:
    """Parse an (unprotected) RTP packet for forwarding: aiortc's ``RtpPacket.parse`` with the
    same checks (version 2, CSRC list, extension block and padding within the packet: a
    ``ValueError`` otherwise), but of the header extensions only the audio level is read, and
    only when ``audio_level_id`` is set (the forwarder rewrites every other extension). The
    CSRC list is skipped: nothing downstream reads it."""
    length = len(data)
    if length < 12:
        raise ValueError("RTP packet length is less than 12 bytes")
    first, m_pt, seq, ts, ssrc = _unpack_header(data)
    if first >> 6 != 2:
        raise ValueError("RTP packet has invalid version")
    pos = 12 + 4 * (first & 0x0F)
    if length < pos:
        raise ValueError("RTP packet has truncated CSRC")
    extensions = NO_EXTENSIONS
    if first & 0x10:
        if length < pos + 4:
            raise ValueError("RTP packet has truncated extension profile / length")
        profile = (data[pos] << 8) | data[pos + 1]
        end = pos + 4 + 4 * ((data[pos + 2] << 8) | data[pos + 3])
        if length < end:
            raise ValueError("RTP packet has truncated extension value")
        if audio_level_id:
            level = _audio_level(data, profile, pos + 4, end, audio_level_id)
            if level is not None:
                extensions = HeaderExtensions(audio_level=(level & 0x80 == 0x80, level & 0x7F))
        pos = end
    padding = 0
    if first & 0x20:
        padding = data[-1]
        if not padding or padding > length - pos:
            raise ValueError("RTP packet padding length is invalid")
    return ParsedRtp(m_pt >> 7, m_pt & 0x7F, seq, ts, ssrc, data[pos:length - padding], padding, extensions)


def _audio_level(data: bytes, profile: int, pos: int, end: int, wanted: int) -> int | None:
    """The first byte of extension ``wanted`` in an RFC 8285 block (``data[pos:end]``,
    one-byte or two-byte headers), or None; a truncated element raises ``ValueError``."""
    one_byte = profile == 0xBEDE
    if not one_byte and profile != 0x1000:
        return None
    while pos < end:
        head = data[pos]
        if head == 0:  # padding
            pos += 1
            continue
        if one_byte:
            ext_id, size = head >> 4, (head & 0x0F) + 1
            pos += 1
        else:
            if end < pos + 2:
                raise ValueError("RTP two-byte header extension is truncated")
            ext_id, size = head, data[pos + 1]
            pos += 2
        if end < pos + size:
            raise ValueError("RTP header extension value is truncated")
        if ext_id == wanted and size:
            return data[pos]
        pos += size
    return None


class RtpWriter:
    """A subscriber's outgoing RTP packets: its payload type and SSRC, and its header
    extension block (``head``, one variable element's value, ``tail``: the fixed elements,
    e.g. the MID, come first, the variable one, abs-send-time or audio level, last, then the
    padding to 32 bits). ``write(marker, seq, ts, variable, payload)`` is the whole packet in
    one ``struct`` pack and one concatenation; ``variable`` is cut or zero-filled to
    ``variable_len`` bytes (0 when the subscriber did not negotiate the extension). The packet
    has no CSRC list and no padding, whatever the publisher's had."""

    __slots__ = ("write", "variable_len")

    def __init__(self, payload_type: int, ssrc: int, fixed: list[tuple[int, bytes]], variable_id: int = 0,
                 variable_len: int = 0) -> None:
        if not 0 <= payload_type < 128:
            raise ValueError(f"payload type {payload_type} is not 0-127")
        body = b"".join(bytes([(i << 4) | (len(v) - 1)]) + v for i, v in fixed)
        if variable_id and variable_len:
            body += bytes([(variable_id << 4) | (variable_len - 1)])
        else:
            variable_len = 0
        self.variable_len = variable_len
        total = len(body) + variable_len
        pad = -total % 4
        head = struct.pack("!HH", 0xBEDE, (total + pad) // 4) + body if total else b""
        tail = b"\x00" * pad
        first = 0x90 if total else 0x80
        pack = struct.Struct(f"!BBHII{len(head)}s{variable_len}s{pad}s").pack
        marked, unmarked = 0x80 | payload_type, payload_type

        def write(marker: int, seq: int, ts: int, variable: bytes, payload: bytes) -> bytes:
            return pack(first, marked if marker else unmarked, seq, ts, ssrc, head, variable, tail) + payload

        self.write = write


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
