"""Guards for every aiortc/aioice private-API assumption media/aiortc_internals.py
makes. If an upgrade breaks one, these fail by name instead of the SFU silently
decoding, or forwarding nothing."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import socket
import struct
import tomllib
from importlib.metadata import version
from pathlib import Path

import aioice.ice
import aioice.turn
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceGatherer
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtcrtpreceiver import NackGenerator
from aiortc.rtp import HeaderExtensionsMap, RtpPacket, is_rtcp

from media import aiortc_internals
from media.events import DatagramDropReason
from media.udpmux import UdpMux
from tests.codec_probe import install as install_probe
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_pinned_versions_are_installed() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {name: pinned for name, _, pinned in (d.partition("==") for d in deps) if name in ("aiortc", "aioice")}
    assert pins == {"aiortc": version("aiortc"), "aioice": version("aioice")}


async def test_receiver_private_state_exists() -> None:
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("video", direction="recvonly").receiver
        for name in ("__codecs", "__rtx_ssrc", "__remote_streams", "__nack_generator"):
            assert hasattr(receiver, f"_RTCRtpReceiver{name}"), name
        assert receiver._RTCRtpReceiver__kind == "video"  # type: ignore[attr-defined]
        assert isinstance(aiortc_internals.receiver_statistics(receiver), dict)
        assert inspect.iscoroutinefunction(receiver._handle_rtp_packet)
        assert inspect.iscoroutinefunction(receiver._send_rtcp_nack)
    finally:
        await pc.close()


def test_nack_generator_in_order_packet_only_moves_max_seq() -> None:
    # hook_receiver skips NackGenerator.add for the next packet in order when nothing is missing.
    generator = NackGenerator()
    for seq in (65534, 65535, 0):
        packet = RtpPacket(sequence_number=seq)
        missing_before = set(generator.missing)
        assert generator.add(packet) is False
        assert generator.max_seq == seq and generator.missing == missing_before == set()
    assert generator.add(RtpPacket(sequence_number=3)) is True and generator.missing == {1, 2}


def test_only_the_rtp_handler_feeds_the_decoder() -> None:
    # Replacing _handle_rtp_packet must be enough to keep the decoder idle.
    source = inspect.getsource(RTCRtpReceiver)
    feeders = [m.start() for m in re.finditer(r"__decoder_queue\.put\(\(", source)]
    handler = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
    assert len(feeders) == 1 and "self.__decoder_queue.put((codec, encoded_frame))" in handler


def test_receiver_receive_is_what_the_replacement_does_plus_a_decoder_thread() -> None:
    # hook_receiver replaces receive(): every statement of aiortc's must be one it does too,
    # or the decoder thread it leaves out.
    body = inspect.getsource(RTCRtpReceiver.receive).split('"""')[-1]
    statements = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert statements == [
        "if not self.__started:",
        "for codec in parameters.codecs:",
        "self.__codecs[codec.payloadType] = codec",
        "for encoding in parameters.encodings:",
        "if encoding.rtx:",
        "self.__rtx_ssrc[encoding.rtx.ssrc] = encoding.ssrc",
        "self.__decoder_thread = threading.Thread(",
        "target=decoder_worker,",
        'name=self.__kind + "-decoder",',
        "args=(",
        "asyncio.get_event_loop(),",
        "self.__decoder_queue,",
        "self._track._queue,",
        "self.__decoder_error,",
        "),",
        ")",
        "self.__decoder_thread.start()",
        "self.__transport._register_rtp_receiver(self, parameters)",
        "self.__rtcp_task = asyncio.ensure_future(self._run_rtcp())",
        "self.__started = True",
    ]
    # stop() and a BYE stop the decoder only if there is one.
    assert "if self.__decoder_thread:" in inspect.getsource(RTCRtpReceiver._RTCRtpReceiver__stop_decoder)  # type: ignore[attr-defined]


async def test_receiver_buffers_the_sfu_releases_are_only_used_by_the_rtp_handler() -> None:
    source = inspect.getsource(RTCRtpReceiver)
    handler = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
    for name, guarded in (("__remote_bitrate_estimator", "if self.__remote_bitrate_estimator is not None:"),
                          ("__jitter_buffer", "self.__jitter_buffer.add(packet)")):
        init = inspect.getsource(RTCRtpReceiver.__init__)
        # Set in __init__, read only in the handler.
        assert source.count(f"self.{name}") == init.count(f"self.{name}") + handler.count(f"self.{name}"), name
        assert guarded in handler
    # The decoder's queue and error flag: set in __init__, read by receive() (the thread it
    # starts), the handler, and __stop_decoder only when there is a thread.
    receive = inspect.getsource(RTCRtpReceiver.receive)
    stop_decoder = inspect.getsource(RTCRtpReceiver._RTCRtpReceiver__stop_decoder)  # type: ignore[attr-defined]
    for name in ("__decoder_queue", "__decoder_error"):
        uses = [inspect.getsource(RTCRtpReceiver.__init__), receive, handler, stop_decoder]
        assert source.count(f"self.{name}") == sum(u.count(f"self.{name}") for u in uses), name
        assert f"self.{name}," in receive
    assert stop_decoder.split("if self.__decoder_thread:")[0].count("__decoder_") == 0
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("video", direction="recvonly").receiver
        assert receiver._RTCRtpReceiver__remote_bitrate_estimator is not None  # type: ignore[attr-defined]
        aiortc_internals.release_receiver_buffers(receiver)
        assert receiver._RTCRtpReceiver__remote_bitrate_estimator is None  # type: ignore[attr-defined]
        assert receiver._RTCRtpReceiver__decoder_queue is None  # type: ignore[attr-defined]
        await receiver.stop()  # no thread: the released parts are not touched
    finally:
        await pc.close()


def test_aioice_sizes_its_sockets_receive_buffer_from_one_module_constant() -> None:
    # configure_receive_buffer sets the constant aioice reads as each socket is opened.
    assert "turn.UDP_SOCKET_BUFFER_SIZE" in inspect.getsource(aioice.Connection.get_component_candidates)
    assert "sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_SIZE)" in inspect.getsource(
        aioice.turn.create_turn_endpoint)


def test_dtls_transport_routes_rtp_to_receivers() -> None:
    source = inspect.getsource(RTCDtlsTransport._handle_rtp_data)
    assert "await receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms)" in source
    rtcp = inspect.getsource(RTCDtlsTransport._handle_rtcp_data)
    assert "_handle_rtcp_packet(packet)" in rtcp
    send = inspect.getsource(RTCDtlsTransport._send_rtp)
    assert "self._tx_srtp.protect" in send and "self._state != State.CONNECTED" in send


def test_what_the_rtp_fast_path_does_instead_of_the_dtls_receive_task() -> None:
    # _rtp_fast_path repeats these steps of _recv_next / _handle_rtp_data for RTP.
    recv = inspect.getsource(RTCDtlsTransport._recv_next)
    assert "first_byte > 127 and first_byte < 192 and self._rx_srtp" in recv
    assert "if is_rtcp(data):" in recv and "data = self._rx_srtp.unprotect(data)" in recv
    assert "self.__rx_packets += 1" in recv and "__rx_packets" in inspect.getsource(RTCDtlsTransport._get_stats)
    rtp = inspect.getsource(RTCDtlsTransport._handle_rtp_data)
    assert "RtpPacket.parse(data, self._rtp_header_extensions_map)" in rtp
    assert "receiver = self._rtp_router.route_rtp(packet)" in rtp
    assert "return len(msg) >= 2 and msg[1] >= 192 and msg[1] <= 208" in inspect.getsource(is_rtcp)
    # Once an SSRC is routed it parses with media.rtp.parse_rtp, taking the audio level id
    # from the transport's extension map.
    extensions = HeaderExtensionsMap()
    extensions.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=7, uri="urn:ietf:params:rtp-hdrext:ssrc-audio-level")]))
    assert extensions._HeaderExtensionsMap__ids.audio_level == 7  # type: ignore[attr-defined]
    # The fast path runs while CONNECTED: by then the SRTP sessions exist.
    start = inspect.getsource(RTCDtlsTransport.start)
    assert start.index("self._setup_srtp()") < start.index("self._set_state(State.CONNECTED)")


async def test_sender_starts_replaceable_tasks() -> None:
    send = inspect.getsource(RTCRtpSender.send)
    assert "self._run_rtp(parameters.codecs[0])" in send and "self._run_rtcp()" in send
    stop = inspect.getsource(RTCRtpSender.stop)
    assert "__rtp_started" in stop and "__rtcp_exited" in stop
    # The tasks and events hook_sender replaces are used by send, stop and the two runs alone.
    source = inspect.getsource(RTCRtpSender)
    for name in ("__rtp_task", "__rtcp_task", "__rtp_started", "__rtp_exited", "__rtcp_started", "__rtcp_exited"):
        uses = [inspect.getsource(m) for m in (RTCRtpSender.__init__, RTCRtpSender.send, RTCRtpSender.stop,
                                               RTCRtpSender._run_rtp, RTCRtpSender._run_rtcp)]
        assert source.count(f"self.{name}") == sum(u.count(f"self.{name}") for u in uses), name
    assert "self.__rtp_task = asyncio.ensure_future(self._run_rtp(" in send
    assert "self.__rtcp_task = asyncio.ensure_future(self._run_rtcp())" in send
    pc = RTCPeerConnection()
    try:
        sender = pc.addTransceiver("video", direction="sendonly").sender
        for name in ("__rtp_started", "__rtp_exited", "__rtcp_started", "__rtcp_exited"):
            assert hasattr(sender, f"_RTCRtpSender{name}"), name
        assert isinstance(aiortc_internals.local_ssrc(sender), int)
    finally:
        await pc.close()


async def test_peer_connection_certificate_internals() -> None:
    # new_peer_connection hands the certificate in where RTCPeerConnection makes its one; its
    # DTLS transports take it from there, build their SSL context from it at start, and
    # fingerprint it per SDP.
    import aiortc.rtcpeerconnection
    init = inspect.getsource(RTCPeerConnection.__init__)
    assert "self.__certificates = [RTCCertificate.generateCertificate()]" in init
    assert aiortc.rtcpeerconnection.RTCCertificate is aiortc_internals._CertificateSource
    assert "RTCDtlsTransport(iceTransport, self.__certificates)" in inspect.getsource(RTCPeerConnection)
    start = inspect.getsource(RTCDtlsTransport.start)
    assert "self.__local_certificate._create_ssl_context(" in start and "srtp_profiles=self._srtp_profiles" in start
    assert "self.__local_certificate.getFingerprints()" in inspect.getsource(RTCDtlsTransport.getLocalParameters)
    rotation = aiortc_internals.CertificateRotation(rotate_after_s=10)
    certificate = rotation.current(0.0)
    assert rotation.current(9.9) is certificate and rotation.current(10.0) is not certificate
    generated = 0
    original = RTCCertificate.generateCertificate.__func__  # type: ignore[attr-defined]

    def counting(cls: type[RTCCertificate]) -> RTCCertificate:
        nonlocal generated
        generated += 1
        made: RTCCertificate = original(cls)
        return made

    RTCCertificate.generateCertificate = classmethod(counting)  # type: ignore[method-assign, assignment]
    try:
        pc = aiortc_internals.new_peer_connection(RTCConfiguration(iceServers=[]), certificate)
        other = RTCPeerConnection()  # any other peer connection still makes its own
    finally:
        RTCCertificate.generateCertificate = classmethod(original)  # type: ignore[method-assign, assignment]
    try:
        assert generated == 1
        assert pc._RTCPeerConnection__certificates == [certificate]  # type: ignore[attr-defined]
        assert other._RTCPeerConnection__certificates[0] is not certificate  # type: ignore[attr-defined]
        transceiver = pc.addTransceiver("audio")
        parameters = transceiver.sender.transport.getLocalParameters()
        assert parameters.fingerprints == certificate.getFingerprints()
        assert other.addTransceiver("audio").sender.transport.getLocalParameters().fingerprints \
            != certificate.getFingerprints()
    finally:
        await pc.close()
        await other.close()


async def test_add_transceiver_builds_no_remote_bitrate_estimator() -> None:
    # The receiver's estimator is made in __init__ through the module name add_transceiver swaps.
    import aiortc.rtcrtpreceiver
    assert "self.__remote_bitrate_estimator = RemoteBitrateEstimator()" in inspect.getsource(RTCRtpReceiver.__init__)
    assert aiortc.rtcrtpreceiver.RemoteBitrateEstimator is aiortc_internals._remote_bitrate_estimator
    assert "receiver=RTCRtpReceiver(kind, dtlsTransport)" in inspect.getsource(RTCPeerConnection)
    pc = RTCPeerConnection()
    try:
        for direction in ("recvonly", "sendonly"):
            receiver = aiortc_internals.add_transceiver(pc, "video", direction=direction).receiver
            assert receiver._RTCRtpReceiver__remote_bitrate_estimator is None  # type: ignore[attr-defined]
            assert receiver._RTCRtpReceiver__jitter_buffer.capacity == 1  # type: ignore[attr-defined]
        # Outside add_transceiver, aiortc's own behaviour (a client's receiver sends REMB from it).
        receiver = pc.addTransceiver("video", direction="recvonly").receiver
        assert receiver._RTCRtpReceiver__remote_bitrate_estimator is not None  # type: ignore[attr-defined]
    finally:
        await pc.close()


def test_ice_internals() -> None:
    assert list(inspect.signature(aioice.ice.get_host_addresses).parameters) == ["use_ipv4", "use_ipv6"]
    assert "self._nominated.get(component)" in inspect.getsource(aioice.Connection.sendto)
    assert "get_host_addresses(" in inspect.getsource(aioice.Connection.gather_candidates)


async def test_configured_ice_addresses_are_the_only_host_candidates() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        hosts = re.findall(r"a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ host", pc.localDescription.sdp)
        assert hosts and set(hosts) == {"127.0.0.1"}
        # The sockets demux_datagrams wraps exist once setLocalDescription has gathered.
        [connection] = aiortc_internals.ice_connections(pc)
        assert isinstance(connection, aioice.Connection)
        assert [p.local_candidate.port for p in connection._protocols] == [int(port) for port in re.findall(
            r"a=candidate:\S+ \d+ \S+ \d+ \S+ (\d+) typ host", pc.localDescription.sdp)]
    finally:
        await pc.close()


def test_codec_probe_records_constructions(tmp_path: Path, monkeypatch: object) -> None:
    # The call test's "no codec in the server" check is only as good as this probe.
    import aiortc.codecs
    import aiortc.rtcrtpreceiver
    import aiortc.rtcrtpsender

    import tests.codec_probe as probe

    saved = (aiortc.codecs.get_decoder, aiortc.codecs.get_encoder, aiortc.rtcrtpreceiver.get_decoder,
             aiortc.rtcrtpsender.get_encoder)
    probe.PROBE_FILE = str(tmp_path / "probe.txt")
    try:
        install_probe()
        codec = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)
        aiortc.rtcrtpreceiver.get_decoder(codec)
        aiortc.rtcrtpsender.get_encoder(codec)
    finally:
        (aiortc.codecs.get_decoder, aiortc.codecs.get_encoder, aiortc.rtcrtpreceiver.get_decoder,
         aiortc.rtcrtpsender.get_encoder) = saved
    lines = [line for line in (tmp_path / "probe.txt").read_text().splitlines() if not line.startswith(" ")]
    assert lines == ["decoder video/VP8", "encoder video/VP8"]


def test_datagram_path_into_aiortc() -> None:
    # What demux_datagrams replaces: aioice's handler parses STUN and hands the rest to aiortc.
    source = inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    assert "stun.parse_message(data)" in source
    assert "self.receiver.data_received(data, self.local_candidate.component)" in source
    assert "self.receiver.request_received(message, addr, self)" in source
    assert "self._queue.put_nowait((data, component))" in inspect.getsource(aioice.Connection.data_received)
    assert "remote_candidate._network_host" in inspect.getsource(aioice.ice.CandidatePair)
    # ... and aiortc's DTLS transport indexes the first byte without a length check.
    assert "first_byte = data[0]" in inspect.getsource(RTCDtlsTransport._recv_next)


async def test_demux_drops_junk_and_keeps_the_selected_pairs_media() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))
    a, b = aioice.Connection(ice_controlling=True), aioice.Connection(ice_controlling=False)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for conn in (a, b):
            await conn.gather_candidates()
        drops: dict[DatagramDropReason, int] = dict.fromkeys(DatagramDropReason, 0)
        aiortc_internals.demux_datagrams(b, drops)
        for local, remote in ((a, b), (b, a)):
            for candidate in remote.local_candidates:
                await local.add_remote_candidate(candidate)
            await local.add_remote_candidate(None)
            local.remote_username, local.remote_password = remote.local_username, remote.local_password
        await asyncio.gather(a.connect(), b.connect())
        port = b.local_candidates[0].port
        bad_stun = struct.pack("!HHI", 1, 8, 0x2112A442) + os.urandom(12) + struct.pack("!HH", 0x0020, 4) + b"\0\1"
        for datagram in (b"", b"\xff junk", bad_stun, b"\x16\xfe\xfd hello", b"\x80\x60 rtp"):
            stranger.sendto(datagram, ("127.0.0.1", port))
        await a.send(b"\x80\x60 from the selected pair")
        assert await asyncio.wait_for(b.recv(), 10) == b"\x80\x60 from the selected pair"
        await wait_until(lambda: sum(drops.values()) == 5, timeout=10, message="5 drops")
        assert {r: n for r, n in drops.items() if n} == {DatagramDropReason.EMPTY: 1, DatagramDropReason.UNKNOWN: 1,
                         DatagramDropReason.MALFORMED_STUN: 1, DatagramDropReason.NOT_SELECTED_PAIR: 2}
        assert b._queue.empty()
        await a.send(b"\x17\xfe\xfd dtls")
        assert await asyncio.wait_for(b.recv(), 10) == b"\x17\xfe\xfd dtls"
        # Well-formed STUN from anyone still reaches aioice (here: refused, it has no credentials).
        stranger.setblocking(False)
        stranger.sendto(struct.pack("!HHI", 1, 0, 0x2112A442) + os.urandom(12), ("127.0.0.1", port))
        reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(stranger, 1500), 10)
        assert reply[:2] == b"\x01\x11"  # Binding error response
    finally:
        stranger.close()
        await asyncio.gather(a.close(), b.close())


def test_host_candidate_internals() -> None:
    # What use_udp_mux replaces and builds again on the shared socket.
    assert list(inspect.signature(aioice.Connection.get_component_candidates).parameters) == [
        "self", "component", "addresses", "timeout"]
    gather = inspect.getsource(aioice.Connection.gather_candidates)
    assert "self.get_component_candidates(component=component, addresses=addresses)" in gather
    source = inspect.getsource(aioice.Connection.get_component_candidates)
    assert "lambda: StunProtocol(self)" in source and "self._protocols += host_protocols" in source
    assert 'candidate_foundation("host", "udp", candidate_address[0])' in source
    assert 'candidate_priority(component, "host")' in source
    username = aioice.Connection.local_username.fget  # type: ignore[attr-defined]
    assert "return self._local_username" in inspect.getsource(username)
    params = inspect.getsource(RTCIceGatherer.getLocalParameters)
    assert "usernameFragment=self._connection.local_username" in params
    # Closing a connection closes each protocol's transport and waits for connection_lost.
    assert "await protocol.close()" in inspect.getsource(aioice.Connection.close)
    close = inspect.getsource(aioice.ice.StunProtocol.close)
    assert "self.transport.close()" in close and "await self.__closed" in close
    assert "self.__closed.set_result(True)" in inspect.getsource(aioice.ice.StunProtocol.connection_lost)
    assert "self.transport = " in inspect.getsource(aioice.ice.StunProtocol.connection_made)


async def test_udp_mux_carries_a_bundled_peer_connection() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))
    mux = UdpMux.bind(["127.0.0.1"], 0, dict.fromkeys(DatagramDropReason, 0))
    await mux.start()
    server, client = (RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2))
    try:
        for kind in ("audio", "video"):
            server.addTransceiver(kind, direction="sendonly")
        connections = aiortc_internals.ice_connections(server)
        assert len(connections) == 2  # one per m-line until the answer bundles them
        for connection in connections:
            aiortc_internals.use_udp_mux(connection, mux)
        await server.setLocalDescription(await server.createOffer())
        sdp = server.localDescription.sdp
        [shared] = mux.sockets
        ufrags = re.findall(r"a=ice-ufrag:(\S+)", sdp)
        assert ufrags == [c.local_username for c in connections] and len(set(ufrags)) == 2
        ports = {int(p) for p in re.findall(r"a=candidate:\S+ \d+ \S+ \d+ \S+ (\d+) typ host", sdp)}
        assert ports == {shared.port}
        assert mux.route_counts()[0] == 2
        await client.setRemoteDescription(server.localDescription)
        await client.setLocalDescription(await client.createAnswer())
        await server.setRemoteDescription(client.localDescription)
        await wait_until(lambda: server.connectionState == "connected" and client.connectionState == "connected",
                         timeout=20, message="connected through the shared socket")
        # BUNDLE closed the second agent: its route went with it.
        assert mux.route_counts()[0] == 1
    finally:
        await asyncio.gather(server.close(), client.close())
        mux.close()
    assert mux.route_counts() == (0, 0)


async def test_hooked_sender_starts_and_stops_without_tasks() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))
    sender_pc, receiver_pc = RTCPeerConnection(), RTCPeerConnection()
    started: list[object] = []

    async def no_rtcp(packet: object) -> None:
        pass

    try:
        sender = sender_pc.addTransceiver("video", direction="sendonly").sender
        aiortc_internals.hook_sender(sender, started.append, no_rtcp)
        await sender_pc.setLocalDescription(await sender_pc.createOffer())
        await receiver_pc.setRemoteDescription(sender_pc.localDescription)
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender_pc.setRemoteDescription(receiver_pc.localDescription)
        await wait_until(lambda: bool(started), timeout=30)
        assert sender._RTCRtpSender__rtp_task.done()  # type: ignore[attr-defined]
        assert sender._RTCRtpSender__rtcp_task.done()  # type: ignore[attr-defined]
        running = {task.get_coro().__qualname__ for task in asyncio.all_tasks()}  # type: ignore[union-attr]
        assert not {"RTCRtpSender._run_rtp", "RTCRtpSender._run_rtcp"} & running
        await asyncio.wait_for(sender_pc.close(), 10)  # stop() waits on the events: they are set
    finally:
        aiortc_internals.configure_ice_addresses(())
        await sender_pc.close()
        await receiver_pc.close()
