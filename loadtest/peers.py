"""Synthetic wire-protocol participants for load tests and benchmarks: a publisher
that sends pre-encoded VP8 + Opus (no encoder in its hot loop) and a subscriber
that counts the RTP packets it gets without decoding them. Each owns one
``SignallingClient`` and one aiortc peer connection per publish/subscription."""

from __future__ import annotations

from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from loadtest.client import SignallingClient
from loadtest.hooks import PacketCount, count_instead_of_decoding, on_keyframe_request
from loadtest.media import EncodedMedia, PreEncodedTrack


def _peer_connection() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class PreEncodedPublisher:
    """Joins with ``token`` and publishes one stream of pre-encoded audio and video."""

    def __init__(self, ws_url: str, media: EncodedMedia) -> None:
        self.client = SignallingClient(ws_url)
        self.media = media
        self.pc: RTCPeerConnection | None = None
        self.tracks: dict[str, PreEncodedTrack] = {}
        self.stream_id = ""

    async def join(self, token: str) -> dict[str, Any]:
        await self.client.connect()
        return await self.client.join(token)

    async def publish(self, audio: bool = True, video: bool = True) -> str:
        self.pc = pc = _peer_connection()
        for kind, wanted in (("audio", audio), ("video", video)):
            if not wanted:
                continue
            track = PreEncodedTrack(kind, self.media)
            transceiver = pc.addTransceiver(track, direction="sendonly")
            on_keyframe_request(transceiver.sender, track.request_keyframe)
            self.tracks[kind] = track
        await pc.setLocalDescription(await pc.createOffer())
        data = await self.client.request("publish", offer={"type": "offer", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=data["answer"]["sdp"], type="answer"))
        self.stream_id = str(data["stream_id"])
        return self.stream_id

    @property
    def keyframe_requests(self) -> int:
        track = self.tracks.get("video")
        return track.keyframe_requests if track else 0

    async def close(self) -> None:
        for track in self.tracks.values():
            track.stop()
        if self.pc is not None:
            await self.pc.close()
        await self.client.close()


class CountingSubscriber:
    """Joins with ``token``, subscribes to streams and counts their packets
    per stream and kind (``counts["<stream_id>/video"]``)."""

    def __init__(self, ws_url: str) -> None:
        self.client = SignallingClient(ws_url)
        self.pcs: list[RTCPeerConnection] = []
        self.counts: dict[str, PacketCount] = {}

    async def join(self, token: str) -> dict[str, Any]:
        await self.client.connect()
        return await self.client.join(token)

    async def subscribe(self, stream_id: str) -> str:
        data = await self.client.request("subscribe", stream_id=stream_id)
        pc = _peer_connection()
        self.pcs.append(pc)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=data["offer"]["sdp"], type="offer"))
        for transceiver in pc.getTransceivers():
            self.counts[f"{stream_id}/{transceiver.kind}"] = count_instead_of_decoding(transceiver.receiver)
        await pc.setLocalDescription(await pc.createAnswer())
        await self.client.request("answer", subscription_id=data["subscription_id"],
                                  answer={"type": "answer", "sdp": pc.localDescription.sdp})
        return str(data["subscription_id"])

    @property
    def packets(self) -> int:
        return sum(c.packets for c in self.counts.values())

    @property
    def octets(self) -> int:
        return sum(c.octets for c in self.counts.values())

    def receiving(self) -> bool:
        """Every subscribed kind has received at least one packet."""
        return bool(self.counts) and all(c.packets > 0 for c in self.counts.values())

    async def close(self) -> None:
        for pc in self.pcs:
            await pc.close()
        await self.client.close()
