"""Guards for every aiortc/aioice private-API assumption media/aiortc_internals.py
makes. If an upgrade breaks one, these fail by name instead of the SFU silently
decoding, or forwarding nothing."""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import aioice.ice
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from media import aiortc_internals
from tests.codec_probe import install as install_probe

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
        assert isinstance(aiortc_internals.receiver_statistics(receiver), dict)
        assert inspect.iscoroutinefunction(receiver._handle_rtp_packet)
        assert inspect.iscoroutinefunction(receiver._send_rtcp_nack)
    finally:
        await pc.close()


def test_only_the_rtp_handler_feeds_the_decoder() -> None:
    # Replacing _handle_rtp_packet must be enough to keep the decoder idle.
    source = inspect.getsource(RTCRtpReceiver)
    feeders = [m.start() for m in re.finditer(r"__decoder_queue\.put\(\(", source)]
    handler = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
    assert len(feeders) == 1 and "self.__decoder_queue.put((codec, encoded_frame))" in handler


def test_dtls_transport_routes_rtp_to_receivers() -> None:
    source = inspect.getsource(RTCDtlsTransport._handle_rtp_data)
    assert "await receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms)" in source
    rtcp = inspect.getsource(RTCDtlsTransport._handle_rtcp_data)
    assert "_handle_rtcp_packet(packet)" in rtcp
    send = inspect.getsource(RTCDtlsTransport._send_rtp)
    assert "self._tx_srtp.protect" in send and "self._state != State.CONNECTED" in send


async def test_sender_starts_replaceable_tasks() -> None:
    send = inspect.getsource(RTCRtpSender.send)
    assert "self._run_rtp(parameters.codecs[0])" in send and "self._run_rtcp()" in send
    stop = inspect.getsource(RTCRtpSender.stop)
    assert "__rtp_started" in stop and "__rtcp_exited" in stop
    pc = RTCPeerConnection()
    try:
        sender = pc.addTransceiver("video", direction="sendonly").sender
        for name in ("__rtp_started", "__rtp_exited", "__rtcp_started", "__rtcp_exited"):
            assert hasattr(sender, f"_RTCRtpSender{name}"), name
        assert isinstance(aiortc_internals.local_ssrc(sender), int)
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
