"""The forwarder's byte-level parts: ``parse_rtp`` (what the receive fast path parses an
incoming packet with) against aiortc's own parser, and ``RtpWriter`` (the packet a
subscriber gets) read back by aiortc's parser."""

from __future__ import annotations

import struct

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from hypothesis import given
from hypothesis import strategies as st

from media.forwarder import RtpTranslator
from media.rtp import RtpWriter, parse_rtp

URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_ABS = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
URI_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"


def extensions_map(**ids: int) -> HeaderExtensionsMap:
    uris = {"mid": URI_MID, "abs": URI_ABS, "level": URI_LEVEL}
    extensions = HeaderExtensionsMap()
    extensions.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=i, uri=uris[name]) for name, i in ids.items()]))
    return extensions


def rtp(seq: int = 1, ts: int = 2, ssrc: int = 3, marker: int = 0, pt: int = 96, csrc: tuple[int, ...] = (),
        extension: bytes | None = None, profile: int = 0xBEDE, payload: bytes = b"payload", padding: int = 0) -> bytes:
    first = 0x80 | len(csrc) | (0x10 if extension is not None else 0) | (0x20 if padding else 0)
    data = struct.pack("!BBHII", first, (marker << 7) | pt, seq, ts, ssrc)
    data += b"".join(struct.pack("!I", c) for c in csrc)
    if extension is not None:
        data += struct.pack("!HH", profile, len(extension) // 4) + extension
    return data + payload + (bytes(padding - 1) + bytes([padding]) if padding else b"")


def same_as_aiortc(data: bytes, level_id: int = 0) -> RtpPacket:
    ours = parse_rtp(data, level_id)
    theirs = RtpPacket.parse(data, extensions_map(level=level_id) if level_id else HeaderExtensionsMap())
    for field in ("marker", "payload_type", "sequence_number", "timestamp", "ssrc", "payload", "padding_size"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.extensions.audio_level == theirs.extensions.audio_level
    return ours


def test_plain_packet_parses_as_aiortc_parses_it() -> None:
    packet = same_as_aiortc(rtp(seq=65535, ts=0xFFFFFFFF, ssrc=0xDEADBEEF, marker=1, pt=111))
    assert (packet.sequence_number, packet.timestamp, packet.marker) == (65535, 0xFFFFFFFF, 1)


def test_csrc_list_and_padding_are_left_out_of_the_payload() -> None:
    packet = same_as_aiortc(rtp(csrc=(1, 2, 3), padding=7, payload=b"abc"))
    assert packet.payload == b"abc" and packet.padding_size == 7


def test_extension_block_is_skipped_and_only_the_audio_level_read() -> None:
    block = bytes([0x10]) + b"0" + bytes([0x22, 1, 2, 3]) + bytes([0x30, 0x85]) + bytes(4)  # mid, abs, level
    packet = same_as_aiortc(rtp(extension=block), level_id=3)
    assert packet.extensions.audio_level == (True, 5)
    assert parse_rtp(rtp(extension=block)).extensions.audio_level is None  # not asked for: not read
    assert parse_rtp(rtp(extension=block), 3).payload == b"payload"


def test_two_byte_header_extensions_are_read_too() -> None:
    block = bytes([1, 1]) + b"0" + bytes([3, 1, 0x7F]) + bytes(2)  # mid, level, padding
    assert same_as_aiortc(rtp(extension=block, profile=0x1000), level_id=3).extensions.audio_level == (False, 127)


@pytest.mark.parametrize("data", [
    b"\x80\x60\x00",  # shorter than a header
    rtp()[:1].replace(b"\x80", b"\x40") + rtp()[1:],  # version 1
    rtp(csrc=(1, 2))[:16],  # CSRC list cut short
    rtp(extension=bytes(8))[:18],  # extension block cut short
    rtp(padding=4)[:-1] + b"\x00",  # padding length 0
    rtp(payload=b"", padding=4)[:-1] + b"\x40",  # padding longer than the packet
])
def test_malformed_packets_are_refused_as_aiortc_refuses_them(data: bytes) -> None:
    with pytest.raises(ValueError):
        RtpPacket.parse(data)
    with pytest.raises(ValueError):
        parse_rtp(data, 3)


def test_a_truncated_audio_level_element_is_refused_when_read() -> None:
    block = bytes([0x33, 0x80, 0, 0])  # says 4 bytes, the block ends after 3
    with pytest.raises(ValueError):
        parse_rtp(rtp(extension=block), 3)


@given(seq=st.integers(0, 65535), ts=st.integers(0, 0xFFFFFFFF), ssrc=st.integers(0, 0xFFFFFFFF),
       marker=st.integers(0, 1), csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
       padding=st.integers(0, 255), payload=st.binary(max_size=64), level=st.integers(0, 255))
def test_any_valid_packet_parses_as_aiortc_parses_it(seq: int, ts: int, ssrc: int, marker: int, csrc: list[int],
                                                      padding: int, payload: bytes, level: int) -> None:
    block = bytes([0x30, level, 0, 0])
    same_as_aiortc(rtp(seq, ts, ssrc, marker, 96, tuple(csrc), block, payload=payload, padding=padding), 3)


def test_writer_packet_reads_back_with_the_subscribers_numbers_and_extensions() -> None:
    writer = RtpWriter(100, 0xCAFEBABE, [(1, b"v0")], variable_id=2, variable_len=3)
    data = writer.write(1, 65535, 0xFFFFFFFF, b"\x01\x02\x03", b"frame")
    packet = RtpPacket.parse(data, extensions_map(mid=1, abs=2))
    assert (packet.payload_type, packet.ssrc, packet.marker) == (100, 0xCAFEBABE, 1)
    assert (packet.sequence_number, packet.timestamp) == (65535, 0xFFFFFFFF)
    assert packet.extensions.mid == "v0" and packet.extensions.abs_send_time == 0x010203
    assert packet.payload == b"frame" and packet.padding_size == 0 and packet.csrc == []
    assert (len(data) - 12 - len(b"frame")) % 4 == 0  # the block is padded to 32 bits


def test_writer_audio_level_and_no_extensions() -> None:
    level = RtpWriter(111, 5, [], variable_id=3, variable_len=1).write(0, 1, 2, b"\x85", b"opus")
    assert RtpPacket.parse(level, extensions_map(level=3)).extensions.audio_level == (True, 5)
    bare = RtpWriter(111, 5, []).write(0, 1, 2, b"\x85", b"opus")  # extension not negotiated: dropped
    assert bare == struct.pack("!BBHII", 0x80, 111, 1, 2, 5) + b"opus"
    zero = RtpWriter(96, 5, [], variable_id=2, variable_len=3).write(0, 1, 2, b"", b"x")  # a resend: zero
    assert RtpPacket.parse(zero, extensions_map(abs=2)).extensions.abs_send_time == 0


def test_writer_refuses_a_payload_type_out_of_range() -> None:
    with pytest.raises(ValueError, match="payload type 128"):
        RtpWriter(128, 1, [])


def test_forwarded_bytes_carry_the_translated_numbers_across_both_wraps() -> None:
    # A publisher's packet, parsed, translated and written as ForwardingSender.forward does.
    translator = RtpTranslator(90000, video=False, seq_base=65534, ts_base=0xFFFFFF00)
    writer = RtpWriter(96, 42, [])
    out = []
    for i in range(4):
        packet = parse_rtp(rtp(seq=100 + i, ts=5000 + 960 * i, csrc=(9,), padding=3, payload=b"p%d" % i))
        assert translator.admit(packet.ssrc, packet.sequence_number, packet.timestamp, False, 0.0) is None
        data = writer.write(packet.marker, translator.out_seq(packet.sequence_number),
                            translator.out_ts(packet.timestamp), b"", packet.payload)
        out.append(RtpPacket.parse(data))
    assert [p.sequence_number for p in out] == [65534, 65535, 0, 1]
    assert [p.timestamp for p in out] == [0xFFFFFF00, (0xFFFFFF00 + 960) & 0xFFFFFFFF,
                                          (0xFFFFFF00 + 1920) & 0xFFFFFFFF, (0xFFFFFF00 + 2880) & 0xFFFFFFFF]
    assert [p.payload for p in out] == [b"p0", b"p1", b"p2", b"p3"] and all(not p.csrc for p in out)
