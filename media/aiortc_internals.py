"""Every use of aiortc/aioice private API lives here, and only here.

The SFU needs to take RTP packets off a receiver before the jitter buffer and
decoder, and to put rewritten RTP packets on a sender's transport without an
encoder. aiortc has no public API for either, so this module hooks the
instances of the pinned version (see pyproject.toml). tests/test_aiortc_internals.py
checks each assumption below so an upgrade fails loudly instead of silently
decoding, or sending nothing.

Assumptions on aiortc 1.16.0 / aioice 0.13.0:
- RTCDtlsTransport._handle_rtp_data parses SRTP-unprotected RTP and awaits
  ``receiver._handle_rtp_packet(packet, arrival_time_ms=…)``; RTCP goes to
  ``_handle_rtcp_packet`` of receivers and senders, routed by SSRC.
- RTCDtlsTransport._recv_next takes each datagram off aioice's queue; SRTP (first byte
  128-191, once ``_rx_srtp`` is set) is split by ``is_rtcp`` and unprotected with
  ``_rx_srtp``; RTP is parsed with ``_rtp_header_extensions_map`` and routed by
  ``_rtp_router.route_rtp``; ``_rx_srtp`` is set before ``_state`` becomes CONNECTED.
  The demultiplexer's RTP fast path does the same itself while CONNECTED,
  skipping only the transport's ``__rx_packets``/``__rx_bytes`` counters (read by getStats
  alone); once an SSRC is routed it parses with ``media.rtp.parse_rtp``, reading the audio
  level id from the map's name-mangled ``__ids`` (a ``HeaderExtensions``).
- RTCRtpReceiver keeps its kind, codecs, RTX map, per-SSRC StreamStatistics and its
  NackGenerator (``max_seq``, the set ``missing``; for the next packet in order with
  nothing missing, ``add`` only moves ``max_seq``) in name-mangled attributes; its own _run_rtcp sends receiver
  reports from those statistics. Its receive(parameters) fills the codecs and RTX
  map, starts a decoder thread, registers with its DTLS transport and starts
  _run_rtcp; our replacement does all of that but the thread (a thread per
  received track, idle since our hook never queues a frame to it). Its jitter
  buffer and remote bitrate estimator are used only by _handle_rtp_packet (the
  estimator only when not None); its decoder queue and decoder error flag only by
  receive() (to start the thread), _handle_rtp_packet and, with a thread, __stop_decoder.
- RTCRtpSender.send(parameters) passes ``self._run_rtp(codec)`` and ``self._run_rtcp()``
  to ``asyncio.ensure_future``; stop() waits on the name-mangled started/exited events,
  cancels the two and waits on the exited events again; nothing else reads them.
  Replacing both methods on the instance (returning a finished future) means no encoder
  and no task is created.
- RTCDtlsTransport._tx_srtp.protect/protect_rtcp, RTCIceTransport._connection
  (an aioice Connection) whose ``_nominated[1]`` pair sends with
  ``protocol.transport.sendto(data, remote_addr)``.
- RTCPeerConnection keeps its certificates in ``__certificates`` (one, made in ``__init__``
  by ``RTCCertificate.generateCertificate()``, the name looked up in
  ``aiortc.rtcpeerconnection``) and hands them to each RTCDtlsTransport it creates
  (``addTransceiver``, ``setRemoteDescription``); the transport calls
  ``certificate._create_ssl_context(srtp_profiles)`` once, at ``start``, and
  ``getFingerprints()`` for every SDP it writes. ``addTransceiver`` builds the
  transceiver's RTCRtpReceiver synchronously, whose ``__init__`` makes a video receiver's
  estimator by calling ``RemoteBitrateEstimator()``, the name looked up in
  ``aiortc.rtcrtpreceiver``. ``new_peer_connection`` and ``add_transceiver`` replace those
  two module names (once, at import) with stand-ins that do what aiortc does unless one of
  them is running: aiortc peers in the same process (tests, benchmarks) are unchanged.
- aioice.ice.get_host_addresses(use_ipv4, use_ipv6) lists the addresses
  gathered as host candidates (loopback excluded).
- aioice sets SO_RCVBUF on every socket it opens (host candidates in
  ``Connection.get_component_candidates``, TURN in ``turn.create_turn_endpoint``) to
  ``aioice.turn.UDP_SOCKET_BUFFER_SIZE``, read at each socket's creation.
- Every datagram on an ICE socket goes to ``StunProtocol.datagram_received(data,
  addr)`` (looked up on the instance by asyncio's transport). It parses STUN and
  hands anything that does not parse to ``Connection.data_received(data,
  component)``, i.e. straight to aiortc, whose DTLS transport indexes ``data[0]``
  (an empty datagram kills the transport). The protocols are in
  ``Connection._protocols`` once candidates are gathered (setLocalDescription), and
  a selected pair keeps its local ``protocol`` and its ``remote_addr``.
- Host candidates come from ``Connection.get_component_candidates(component=…,
  addresses=…)``, awaited by ``gather_candidates`` with the host addresses: it binds one
  ``StunProtocol(connection)`` per address, sets its ``local_candidate`` (foundation from
  ``candidate_foundation``, priority from ``candidate_priority``) and appends it to
  ``Connection._protocols``; srflx/relay candidates follow from the same call. The
  connection's ufrag is ``_local_username`` (aiortc's ``getLocalParameters`` reads it when it
  writes the SDP, i.e. at createOffer/createAnswer), and ``Connection.close`` awaits
  ``protocol.close()``, which closes ``protocol.transport`` and waits for
  ``connection_lost``. ``use_udp_mux`` relies on all of this.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from OpenSSL import SSL

import aioice.ice
import aioice.turn
import aiortc.rtcpeerconnection
import aiortc.rtcrtpreceiver
import pylibsrtp
from aioice import stun
from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs import is_rtx
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsFingerprint, RTCDtlsTransport, SRTPProtectionProfile, State
from aiortc.rtcrtpparameters import RTCRtpReceiveParameters, RTCRtpSendParameters
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RtpPacket, is_rtcp, unwrap_rtx

from media.events import DatagramDropReason
from media.rtp import parse_rtp
from media.udpmux import MuxTransport, UdpMux

RtpHandler = Callable[[RtpPacket, int], None]
RtcpHandler = Callable[[Any], Awaitable[None]]

_original_get_host_addresses = aioice.ice.get_host_addresses


def configure_ice_addresses(addresses: tuple[str, ...]) -> None:
    """Gather host candidates on exactly these addresses (empty: aioice's default,
    every interface but loopback). Process-wide, set once at start-up."""
    if not addresses:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses


def use_udp_mux(connection: Any, mux: UdpMux) -> None:
    """Put an aioice ``connection``'s host candidates on ``mux``'s shared sockets instead of a
    socket of its own per address. Call it before the SDP is written (createOffer /
    createAnswer): the connection gets a fresh ufrag, unique on the node, that routes STUN to
    it. Srflx and relay candidates (if any) are gathered as before."""
    connection._local_username = mux.new_ufrag()
    original = connection.get_component_candidates

    async def get_component_candidates(component: int, addresses: list[str], timeout: int = 5) -> list[Candidate]:
        candidates: list[Candidate] = []
        wanted = {_canonical_ip(a) for a in addresses}
        for mux_socket in mux.sockets:
            if mux_socket.host not in wanted:
                continue
            protocol = aioice.ice.StunProtocol(connection)
            mux_socket.attach(connection.local_username, connection.local_password.encode("utf8"), protocol)
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "udp", mux_socket.host), component=component,
                transport="udp", priority=candidate_priority(component, "host"), host=mux_socket.host,
                port=mux_socket.port, type="host")
            connection._protocols.append(protocol)
            candidates.append(protocol.local_candidate)
        others: list[Candidate] = await original(component=component, addresses=[], timeout=timeout)
        return candidates + others

    connection.get_component_candidates = get_component_candidates


class SharedCertificate(RTCCertificate):
    """An aiortc certificate shared by many peer connections: its OpenSSL context (one per
    SRTP profile list, ≈ 23 KiB) and its fingerprints are built once instead of per
    connection. The context caches no DTLS sessions (WebRTC never resumes one; a shared
    cache would only grow) and lets each connection release its buffers while idle."""

    def __init__(self, key: Any, cert: Any) -> None:
        super().__init__(key, cert)
        self._contexts: dict[tuple[str, ...], SSL.Context] = {}
        self._fingerprints: list[RTCDtlsFingerprint] | None = None

    def _create_ssl_context(self, srtp_profiles: list[SRTPProtectionProfile]) -> SSL.Context:
        key = tuple(str(p.openssl_profile) for p in srtp_profiles)
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = super()._create_ssl_context(srtp_profiles)
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            # Free a connection's read/write buffers while it is idle: after the handshake DTLS
            # carries nothing here (SRTP goes around it), yet each kept tens of KB.
            context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        return context

    def getFingerprints(self) -> list[RTCDtlsFingerprint]:
        if self._fingerprints is None:
            self._fingerprints = super().getFingerprints()
        return list(self._fingerprints)


class CertificateRotation:
    """The DTLS certificate new peer connections use: one per process instead of one per
    connection (aiortc's default; about 0.5 ms of CPU and a key pair, context and
    fingerprints each), replaced by a fresh one every ``rotate_after_s`` (aiortc's
    certificates are valid 30 days; a peer connection keeps the one it started with)."""

    def __init__(self, rotate_after_s: float = 86400.0) -> None:
        self.rotate_after_s = rotate_after_s
        self._certificate: SharedCertificate | None = None
        self._created = 0.0

    def current(self, now: float) -> SharedCertificate:
        if self._certificate is None or now - self._created >= self.rotate_after_s:
            self._certificate = SharedCertificate.generateCertificate()
            self._created = now
        return self._certificate


#: What the stand-ins below hand out while ``new_peer_connection`` / ``add_transceiver`` run
#: (synchronous calls: nothing else runs meanwhile); None / False: aiortc's own behaviour.
_given_certificate: RTCCertificate | None = None
_without_estimator = False


class _CertificateSource(RTCCertificate):
    """``aiortc.rtcpeerconnection.RTCCertificate``: the certificate ``new_peer_connection``
    hands in, else a new one as aiortc makes it."""

    @classmethod
    def generateCertificate(cls) -> RTCCertificate:  # type: ignore[override]
        if _given_certificate is not None:
            return _given_certificate
        return RTCCertificate.generateCertificate()


def _remote_bitrate_estimator() -> RemoteBitrateEstimator | None:
    """``aiortc.rtcrtpreceiver.RemoteBitrateEstimator``: none while ``add_transceiver`` runs."""
    return None if _without_estimator else RemoteBitrateEstimator()


aiortc.rtcpeerconnection.RTCCertificate = _CertificateSource  # type: ignore[misc]
aiortc.rtcrtpreceiver.RemoteBitrateEstimator = _remote_bitrate_estimator  # type: ignore[assignment, misc]


def new_peer_connection(configuration: RTCConfiguration, certificate: RTCCertificate) -> RTCPeerConnection:
    """A peer connection whose DTLS uses ``certificate`` from the start: aiortc's own key pair
    and certificate (≈ 0.25-0.5 ms of CPU each) are never made."""
    global _given_certificate
    _given_certificate = certificate
    try:
        return RTCPeerConnection(configuration)
    finally:
        _given_certificate = None


def add_transceiver(pc: RTCPeerConnection, kind: str, direction: str) -> RTCRtpTransceiver:
    """``pc.addTransceiver(kind, direction=direction)`` whose receiver builds no remote bitrate
    estimator (≈ 0.27 ms of CPU and ≈ 95 KiB per video receiver): the SFU's REMB comes from
    its subscribers, and the receiver's RTP goes to ``hook_receiver``'s handler or nowhere.
    Its jitter buffer is released as well (``release_receiver_buffers``)."""
    global _without_estimator
    _without_estimator = True
    try:
        transceiver = pc.addTransceiver(kind, direction=direction)
    finally:
        _without_estimator = False
    release_receiver_buffers(transceiver.receiver)
    return transceiver


def host_addresses() -> list[str]:
    """The addresses ICE gathers host candidates on (``configure_ice_addresses``, or every
    interface but loopback), IPv4 and IPv6."""
    addresses: list[str] = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True)
    return addresses


def configure_receive_buffer(size: int) -> None:
    """Every media socket aioice opens from now on asks the kernel for an ``size``-byte
    receive buffer (``SO_RCVBUF``), so a burst or a busy moment of the event loop queues
    in the kernel instead of being dropped. Process-wide, set once at start-up."""
    aioice.turn.UDP_SOCKET_BUFFER_SIZE = size


def apply_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for an ``size``-byte receive buffer on ``sock`` (a media socket not opened by
    aioice); returns the size the kernel granted (see ``effective_receive_buffer``)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return granted // 2


def effective_receive_buffer(size: int) -> int:
    """The receive buffer a UDP socket really gets when it asks for ``size`` bytes: Linux
    caps the request at ``net.core.rmem_max`` (and reports twice the granted value, the
    doubling being its bookkeeping overhead, which is halved back here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return apply_receive_buffer(probe, size)


def release_receiver_buffers(receiver: RTCRtpReceiver) -> None:
    """Free what an aiortc receiver holds for decoding and for its own bandwidth estimate,
    neither of which the SFU uses: the remote bitrate estimator (a 1,000-bucket window,
    about 95 KB per video receiver), the jitter buffer (512 slots) and the decoder thread's
    queue. For a publish's
    receivers (whose RTP ``hook_receiver`` takes first) and for the receiver every
    subscription's transceiver carries but never starts."""
    receiver._RTCRtpReceiver__remote_bitrate_estimator = None  # type: ignore[attr-defined]
    receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(capacity=1)  # type: ignore[attr-defined]
    # The decoder thread's queue and error flag (five deques and their locks, ≈ 4.5 KiB): used
    # only by the thread aiortc's receive() starts and the handler feeding it, neither run here.
    receiver._RTCRtpReceiver__decoder_queue = None  # type: ignore[attr-defined]
    receiver._RTCRtpReceiver__decoder_error = None  # type: ignore[attr-defined]


def hook_receiver(receiver: RTCRtpReceiver, on_rtp: RtpHandler, on_rtcp: RtcpHandler) -> None:
    """Take RTP off ``receiver`` before its jitter buffer: keep its RTCP receiver
    statistics and upstream NACKs, unwrap RTX, then hand the packet to ``on_rtp``.
    No decoder thread is started (``receive`` is replaced) and nothing is ever
    queued to one, so no decoder is built."""
    codecs: dict[int, Any] = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
    rtx_ssrc: dict[int, int] = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
    streams: dict[int, StreamStatistics] = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    nack_generator = receiver._RTCRtpReceiver__nack_generator  # type: ignore[attr-defined]
    original_rtcp = receiver._handle_rtcp_packet

    rtx_codecs: set[int] = set()  # payload types of the RTX codecs, filled by receive()

    def receive_rtp(packet: RtpPacket, arrival_time_ms: int) -> None:
        payload_type = packet.payload_type
        codec = codecs.get(payload_type)
        if codec is None:
            return
        stats = streams.get(packet.ssrc)
        if stats is None:
            stats = streams[packet.ssrc] = StreamStatistics(codec.clockRate)
        stats.add(packet)
        if payload_type in rtx_codecs:
            original = rtx_ssrc.get(packet.ssrc)
            apt = codec.parameters.get("apt")
            if original is None or len(packet.payload) < 2 or apt not in codecs:
                return
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original)
        if nack_generator is not None:
            highest = nack_generator.max_seq
            if highest is not None and not nack_generator.missing \
                    and packet.sequence_number == (highest + 1) & 0xFFFF:
                # The next packet in order with nothing missing: all that add() would do.
                nack_generator.max_seq = packet.sequence_number
            elif nack_generator.add(packet):
                # Only when a gap opens: the NACK is sent by a task, the packet is not held up.
                asyncio.ensure_future(receiver._send_rtcp_nack(packet.ssrc, sorted(nack_generator.missing)))
        on_rtp(packet, arrival_time_ms)

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        receive_rtp(packet, arrival_time_ms)

    async def handle_rtcp_packet(packet: Any) -> None:
        await original_rtcp(packet)
        await on_rtcp(packet)

    async def receive(parameters: RTCRtpReceiveParameters) -> None:
        # RTCRtpReceiver.receive without its decoder thread: nothing is ever decoded here.
        if receiver._RTCRtpReceiver__started:  # type: ignore[attr-defined]
            return
        for codec in parameters.codecs:
            if codec.payloadType is not None:  # always set once negotiated
                codecs[codec.payloadType] = codec
                if is_rtx(codec):
                    rtx_codecs.add(codec.payloadType)
        for encoding in parameters.encodings:
            if encoding.rtx:
                rtx_ssrc[encoding.rtx.ssrc] = encoding.ssrc
        receiver._RTCRtpReceiver__transport._register_rtp_receiver(receiver, parameters)  # type: ignore[attr-defined]
        receiver._RTCRtpReceiver__rtcp_task = asyncio.ensure_future(receiver._run_rtcp())  # type: ignore[attr-defined]
        receiver._RTCRtpReceiver__started = True  # type: ignore[attr-defined]

    receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]
    _rtp_handlers[receiver] = (receive_rtp, receiver._RTCRtpReceiver__kind == "audio")  # type: ignore[attr-defined]
    receiver._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]
    receiver.receive = receive  # type: ignore[method-assign]
    release_receiver_buffers(receiver)


#: The synchronous RTP handler of every hooked receiver, for the demultiplexer's fast path, and
#: whether its packets' audio level is read.
_rtp_handlers: weakref.WeakKeyDictionary[Any, tuple[RtpHandler, bool]] = weakref.WeakKeyDictionary()


def receiver_statistics(receiver: RTCRtpReceiver) -> dict[int, StreamStatistics]:
    """Per-SSRC receive statistics (packets, loss, jitter) the receiver keeps for its RRs."""
    streams: dict[int, StreamStatistics] = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    return streams


def hook_sender(
    sender: RTCRtpSender,
    on_started: Callable[[RTCRtpSendParameters], None],
    on_rtcp: RtcpHandler,
) -> None:
    """Turn ``sender`` into a bare RTP/RTCP endpoint: no track, no encoder, no
    RTCP loop of its own (the router sends reports). ``on_started`` gets the
    negotiated parameters once DTLS is up; ``on_rtcp`` gets the RTCP routed to it."""
    original_send = sender.send

    async def send(parameters: RTCRtpSendParameters) -> None:
        await original_send(parameters)
        on_started(parameters)

    # What send() starts as tasks and stop() cancels and waits for: nothing runs, so a finished
    # future each, and the four started/exited events (≈ 0.9 KiB each) are one shared set event.
    for name in ("__rtp_started", "__rtp_exited", "__rtcp_started", "__rtcp_exited"):
        setattr(sender, f"_RTCRtpSender{name}", _SET_EVENT)

    sender.send = send  # type: ignore[method-assign]
    sender._run_rtp = _finished  # type: ignore[method-assign, assignment]
    sender._run_rtcp = _finished  # type: ignore[method-assign, assignment]
    sender._handle_rtcp_packet = on_rtcp  # type: ignore[method-assign, assignment]


#: An event that is set, shared by every hooked sender (waiting on it never blocks, never
#: binds it to a loop, and setting it again does nothing).
_SET_EVENT = asyncio.Event()
_SET_EVENT.set()


def _finished(*args: Any) -> asyncio.Future[None]:
    """A hooked sender's RTP and RTCP "tasks": already done (cancelling one does nothing)."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def local_ssrc(sender: RTCRtpSender) -> int:
    """The SSRC a sender sends with (and its transceiver's receiver sends RTCP with)."""
    ssrc: int = sender._ssrc
    return ssrc


def raw_sender(transport: RTCDtlsTransport) -> Callable[[bytes], bool]:
    """A synchronous send for plain RTP/RTCP bytes on a connected DTLS transport:
    SRTP-protect and hand the datagram to the nominated ICE pair's socket. No
    coroutine per packet. Returns False when the transport cannot send (yet)."""
    ice_connection = transport.transport._connection
    nominated: dict[int, Any] = ice_connection._nominated

    def send(data: bytes) -> bool:
        if transport._state != State.CONNECTED:
            return False
        pair = nominated.get(1)
        if pair is None:
            return False
        srtp = transport._tx_srtp
        protected = srtp.protect_rtcp(data) if is_rtcp(data) else srtp.protect(data)
        pair.protocol.transport.sendto(protected, pair.remote_addr)
        return True

    return send


def rtp_sender(transport: RTCDtlsTransport) -> Callable[[bytes], bool]:
    """``raw_sender`` for RTP only (no RTCP check), with the nominated pair's address and send
    function looked up once per pair rather than per packet. On a shared UDP port it sends
    on the shared socket directly (``MuxTransport.send_media``: media never claims a route).
    Returns False when the transport cannot send (yet)."""
    nominated: dict[int, Any] = transport.transport._connection._nominated
    connected = State.CONNECTED
    current: Any = None
    sendto: Callable[[bytes, Any], None] = _no_sendto
    addr: Any = None

    def send(data: bytes) -> bool:
        nonlocal current, sendto, addr
        if transport._state is not connected:
            return False
        pair = nominated.get(1)
        if pair is not current:
            if pair is None:
                return False
            current, addr = pair, pair.remote_addr
            udp = pair.protocol.transport
            sendto = udp.send_media if isinstance(udp, MuxTransport) else udp.sendto
        sendto(transport._tx_srtp.protect(data), addr)
        return True

    return send


def _no_sendto(data: bytes, addr: Any) -> None:
    pass


def selected_candidate_pair(transport: RTCDtlsTransport) -> dict[str, str] | None:
    """The nominated ICE pair's candidate types and protocol, for the event log."""
    try:
        pair = transport.transport._connection._nominated.get(1)
    except AttributeError:
        return None
    if pair is None:
        return None
    return {
        "local_type": pair.local_candidate.type,
        "remote_type": pair.remote_candidate.type,
        "protocol": pair.local_candidate.transport.lower(),
        "local_address": f"{pair.local_candidate.host}:{pair.local_candidate.port}",
        "remote_address": f"{pair.remote_candidate.host}:{pair.remote_candidate.port}",
    }


def dtls_transports(pc: Any) -> list[RTCDtlsTransport]:
    """The DTLS transports of a peer connection's transceivers (one with BUNDLE)."""
    transports: list[RTCDtlsTransport] = []
    for transceiver in pc.getTransceivers():
        transport = transceiver.receiver.transport
        if all(transport is not t for t in transports):
            transports.append(transport)
    return transports


def ice_connection(transport: RTCDtlsTransport) -> Any:
    """The aioice Connection under a DTLS transport."""
    return transport.transport._connection


def ice_connections(pc: Any) -> list[Any]:
    """The aioice Connections of a peer connection's transceivers (one with BUNDLE)."""
    connections: list[Any] = []
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport._connection
        if all(connection is not c for c in connections):
            connections.append(connection)
    return connections


class StunRtt:
    """The round trip of a peer connection measured on its ICE agent's own STUN transactions:
    the consent checks aioice sends every ~5 s (RFC 7675) and connectivity checks answered
    before their first retransmission. A publish only receives media, so RTCP gives the server
    no RTT for it; this does, for the same path."""

    def __init__(self) -> None:
        self.rtt_ms: float | None = None


#: A STUN transaction answered within this long was answered on its first try (aioice's
#: first retransmission comes after 500 ms), so its duration is one round trip.
_FIRST_TRY_S = 0.5


def measure_stun_rtt(connection: Any, holder: StunRtt) -> None:
    """Time every STUN request an aioice ``connection`` sends (call once its candidates are
    gathered); the latest round trip lands in ``holder``. A few requests a minute: off the
    media path."""
    for protocol in connection._protocols:
        original = protocol.request

        async def request(message: Any, addr: Any, integrity_key: bytes | None = None,
                          retransmissions: int | None = None, _original: Any = original) -> Any:
            started = time.monotonic()
            result = await _original(message, addr, integrity_key=integrity_key, retransmissions=retransmissions)
            elapsed = time.monotonic() - started
            if retransmissions == 0 or elapsed < _FIRST_TRY_S:
                holder.rtt_ms = elapsed * 1000
            return result

        protocol.request = request


def demux_datagrams(connection: Any, drops: dict[DatagramDropReason, int],
                    dtls: RTCDtlsTransport | None = None) -> None:
    """Put an RFC 7983 demultiplexer in front of every socket of an aioice ``connection``
    (call it once candidates are gathered): STUN (first byte 0-3) goes to aioice, from
    anyone, for connectivity checks; DTLS (20-63) and RTP/RTCP (128-191) go to aiortc
    only from the selected pair's remote address; everything else, and STUN that does
    not parse or breaks aioice, is dropped and counted in ``drops`` without a log line.
    One byte compare per media datagram, and no STUN parse attempt for it.

    With ``dtls`` (the DTLS transport on ``connection``), SRTP RTP packets take a fast path
    once DTLS has set up SRTP: unprotected, parsed and handed to their receiver's handler
    (``hook_receiver``) right in the datagram callback, instead of through aioice's queue,
    the DTLS transport's receive task and two coroutines per packet. RTCP, DTLS and
    packets for a receiver without a hook keep aiortc's path."""
    for protocol in connection._protocols:
        protocol.datagram_received = _demultiplexer(connection, protocol, drops, dtls)


#: SSRCs the fast path remembers per DTLS transport (a publish has 2-4); more are routed
#: again by aiortc's router, so a sender cycling SSRCs grows nothing here.
_MAX_FAST_SSRCS = 16


def _rtp_fast_path(dtls: RTCDtlsTransport) -> Callable[[bytes], None]:
    """SRTP-unprotect, parse and deliver one RTP packet on ``dtls`` (connected, so its SRTP
    session is set) to its hooked receiver:
    what aiortc's ``_recv_next`` → ``_handle_rtp_data`` → ``_handle_rtp_packet`` do, minus
    the queue, the task wake-up and the coroutines, and minus the transport's byte counters
    (only its getStats reads them). A packet that fails SRTP or does not parse is dropped,
    as aiortc drops it."""
    by_ssrc: dict[int, tuple[RtpHandler, int]] = {}
    router = dtls._rtp_router
    extensions = dtls._rtp_header_extensions_map
    srtp_error = pylibsrtp.Error
    monotonic_ns = time.monotonic_ns

    def deliver(data: bytes) -> None:
        try:
            plain = dtls._rx_srtp.unprotect(data)
        except srtp_error:
            return
        route = by_ssrc.get(int.from_bytes(plain[8:12], "big"))
        if route is not None:  # a known SSRC: parse only what its handler reads
            try:
                packet = parse_rtp(plain, route[1])
            except ValueError:
                return
            route[0](packet, monotonic_ns() // 1_000_000)
            return
        try:
            packet = RtpPacket.parse(plain, extensions)  # routing may need the MID / RID
        except ValueError:
            return
        receiver = router.route_rtp(packet)
        if receiver is None:
            return
        found = _rtp_handlers.get(receiver)
        if found is None:  # not ours: aiortc's own handler, as a task
            asyncio.ensure_future(receiver._handle_rtp_packet(packet, arrival_time_ms=monotonic_ns() // 1_000_000))
            return
        if len(by_ssrc) >= _MAX_FAST_SSRCS:
            by_ssrc.clear()
        handler, audio = found
        level_id = (extensions._HeaderExtensionsMap__ids.audio_level or 0) if audio else 0  # type: ignore[attr-defined]
        by_ssrc[packet.ssrc] = (handler, level_id)
        handler(packet, monotonic_ns() // 1_000_000)

    return deliver


def _canonical_ip(host: str | None) -> str | None:
    """An address as the socket reports senders (IPv6 compressed), whatever the SDP wrote."""
    try:
        return ipaddress.ip_address(host).compressed if host is not None else None
    except ValueError:
        return host


def _demultiplexer(connection: Any, protocol: Any, drops: dict[DatagramDropReason, int],
                   dtls: RTCDtlsTransport | None) -> Callable[[bytes, tuple[Any, ...]], None]:
    stun_received = protocol.datagram_received  # aioice's own (bound) handler
    fast_rtp = _rtp_fast_path(dtls) if dtls is not None else None
    data_received = connection.data_received
    nominated: dict[int, Any] = connection._nominated
    component: int = protocol.local_candidate.component
    selected: Any = None
    host: str | None = None
    port = 0

    def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
        nonlocal selected, host, port
        if not data:
            drops[DatagramDropReason.EMPTY] += 1
            return
        first = data[0]
        if 127 < first < 192 or 19 < first < 64:
            pair = nominated.get(component)
            if pair is not selected:  # the selection changed (rare): cache its address
                selected = pair
                host, port = pair.remote_addr if pair is not None and pair.protocol is protocol else (None, 0)
                host = _canonical_ip(host)
            if addr[1] != port or addr[0] != host:
                drops[DatagramDropReason.NOT_SELECTED_PAIR] += 1
                return
            # RTP (not RTCP: aiortc's is_rtcp, second byte 192-208) while DTLS is connected
            # (SRTP keys set; after stop() nothing reaches a closed publish).
            if first > 127 and fast_rtp is not None and dtls is not None and dtls._state is State.CONNECTED \
                    and len(data) > 1 and not 191 < data[1] < 209:
                fast_rtp(data)
                return
            data_received(data, component)
        elif first < 4:
            try:
                stun.parse_message(data)
                stun_received(data, addr)
            except Exception:
                drops[DatagramDropReason.MALFORMED_STUN] += 1
        else:
            drops[DatagramDropReason.UNKNOWN] += 1

    return datagram_received
