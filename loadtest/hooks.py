"""The load tester's only uses of aiortc/aioice private API (aiortc is pinned to
1.16.0 and aioice to 0.13.0 in pyproject.toml; an upgrade must re-check every
assumption below; tests/loadtest/test_synthetic.py exercises each of them).

- ``RTCDtlsTransport._handle_rtp_data`` routes each SRTP-unprotected, parsed RTP
  packet to ``await receiver._handle_rtp_packet(packet, arrival_time_ms=…)``,
  looked up on the receiver instance at call time, so an instance attribute
  replaces it: no jitter buffer, no NACK generator, no decoder.
- ``RTCRtpSender._handle_rtcp_packet`` calls ``self._send_keyframe()`` on a
  PLI or FIR; for an encoder-less track that flag is never read, so an instance
  attribute redirects it to the pre-encoded track. Its own ``_handle_rtcp_packet``
  answers NACKs from a 128-packet history (``_retransmit``, RTX when negotiated)
  and counts what it sent in ``__packet_count`` / ``__octet_count``.
- ``RTCRtpReceiver`` keeps per-SSRC ``StreamStatistics`` in ``__remote_streams``
  (its ``_run_rtcp`` sends receiver reports from them every ~1 s), its REMB
  estimator in ``__remote_bitrate_estimator`` (video only), its RTCP SSRC in
  ``__rtcp_ssrc``, its codecs and RTX map in ``__codecs`` / ``__rtx_ssrc``; it
  sends NACK and PLI with ``_send_rtcp_nack(ssrc, lost)`` / ``_send_rtcp_pli(ssrc)``.
- An aioice ``Connection`` keeps its sockets' ``StunProtocol``s in ``_protocols``
  once candidates are gathered; data (DTLS, SRTP) leaves through
  ``protocol.send_data(data, addr)`` (looked up on the instance) and every
  datagram arrives at ``protocol.datagram_received(data, addr)`` (looked up on the
  instance by asyncio's transport).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.codecs import is_rtx
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtpPacket, pack_remb_fci, unwrap_rtx


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


#: Gets each RTP packet (RTX already unwrapped) with its arrival time in ms.
RtpHandler = Callable[[RtpPacket, int], Awaitable[None]]


def receive_like_a_browser(receiver: RTCRtpReceiver, on_rtp: RtpHandler) -> None:
    """Replace ``receiver``'s RTP handling: keep what makes its RTCP browser-like
    (the statistics its receiver reports come from; REMB from its bitrate estimator
    for video) and unwrap RTX, then hand the packet to ``on_rtp`` instead of the
    jitter buffer and decoder (none is ever fed, so none is built). NACK and PLI
    are the caller's: ``send_nack`` / ``send_pli``."""
    codecs: dict[int, Any] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
    rtx_ssrc: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
    streams: dict[int, StreamStatistics] = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    estimator = receiver._RTCRtpReceiver__remote_bitrate_estimator  # type: ignore[attr-defined]

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        if estimator is not None and packet.extensions.abs_send_time is not None:
            remb = estimator.add(abs_send_time=packet.extensions.abs_send_time, arrival_time_ms=arrival_time_ms,
                                 payload_size=len(packet.payload) + packet.padding_size, ssrc=packet.ssrc)
            rtcp_ssrc = receiver._RTCRtpReceiver__rtcp_ssrc  # type: ignore[attr-defined]
            if remb is not None and rtcp_ssrc is not None:
                await receiver._send_rtcp(RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0,
                                                         fci=pack_remb_fci(*remb)))
        codec = codecs.get(packet.payload_type)
        if codec is None:
            return
        stats = streams.get(packet.ssrc)
        if stats is None:
            stats = streams[packet.ssrc] = StreamStatistics(codec.clockRate)
        stats.add(packet)
        if is_rtx(codec):
            original = rtx_ssrc.get(packet.ssrc)
            apt = codec.parameters.get("apt")
            if original is None or len(packet.payload) < 2 or apt not in codecs:
                return
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original)
        await on_rtp(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]


async def send_nack(receiver: RTCRtpReceiver, media_ssrc: int, lost: list[int]) -> None:
    """A generic NACK (RFC 4585) for ``lost`` 16-bit sequence numbers of ``media_ssrc``."""
    await receiver._send_rtcp_nack(media_ssrc, lost)


async def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """A picture loss indication: ask the sender for a keyframe."""
    await receiver._send_rtcp_pli(media_ssrc)


def sent_counts(sender: RTCRtpSender) -> tuple[int, int]:
    """(RTP packets, payload bytes) ``sender`` has sent, retransmissions not counted."""
    packets: int = sender._RTCRtpSender__packet_count  # type: ignore[attr-defined]
    octets: int = sender._RTCRtpSender__octet_count  # type: ignore[attr-defined]
    return packets, octets


def ice_protocols(pc: Any) -> list[Any]:
    """The aioice socket protocols of a peer connection (all of its transports)."""
    protocols: list[Any] = []
    for transceiver in pc.getTransceivers():
        for protocol in transceiver.receiver.transport.transport._connection._protocols:
            if all(protocol is not p for p in protocols):
                protocols.append(protocol)
    return protocols


DatagramSink = Callable[[bytes, Any], None]


def wrap_send_data(protocol: Any, wrap: Callable[[DatagramSink], DatagramSink]) -> None:
    """Route the data ``protocol`` sends (DTLS, SRTP; not its STUN) through
    ``wrap(sendto)``, where ``sendto(data, addr)`` writes to the socket."""
    def sendto(data: bytes, addr: Any) -> None:
        protocol.transport.sendto(data, addr)

    send = wrap(sendto)

    async def send_data(data: bytes, addr: Any) -> None:
        send(data, addr)

    protocol.send_data = send_data


def wrap_datagram_received(protocol: Any, wrap: Callable[[DatagramSink], DatagramSink]) -> None:
    """Route every datagram ``protocol``'s socket receives through ``wrap(received)``,
    where ``received(data, addr)`` is aioice's own handling."""
    protocol.datagram_received = wrap(protocol.datagram_received)
