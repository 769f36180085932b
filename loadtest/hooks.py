"""The load tester's only uses of aiortc private API (aiortc is pinned to 1.16.0
in pyproject.toml; an upgrade must re-check both assumptions below).

- ``RTCDtlsTransport._handle_rtp_data`` routes each SRTP-unprotected, parsed RTP
  packet to ``await receiver._handle_rtp_packet(packet, arrival_time_ms=…)``,
  looked up on the receiver instance at call time, so an instance attribute
  replaces it: no jitter buffer, no NACK generator, no decoder.
- ``RTCRtpSender._handle_rtcp_packet`` calls ``self._send_keyframe()`` on a
  PLI or FIR; for an encoder-less track that flag is never read, so an instance
  attribute redirects it to the pre-encoded track.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.rtp import RtpPacket


@dataclass
class PacketCount:
    """What one counting receiver got: plain ints, read by the benchmark."""

    packets: int = 0
    octets: int = 0


def count_instead_of_decoding(receiver: RTCRtpReceiver) -> PacketCount:
    """Replace ``receiver``'s RTP handling with a counter: count packets and payload
    bytes, drop the packet. Nothing is decoded, nothing is NACKed or PLI'd."""
    count = PacketCount()

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        count.packets += 1
        count.octets += len(packet.payload)

    receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]
    return count


def on_keyframe_request(sender: RTCRtpSender, callback: Callable[[], None]) -> None:
    """Call ``callback`` when the remote end sends PLI/FIR for ``sender``'s track."""
    sender._send_keyframe = callback  # type: ignore[method-assign]
