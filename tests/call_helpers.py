"""Participants for end-to-end call tests: a wire-protocol client plus real aiortc
peers (a publisher with synthetic camera and microphone, decoding subscribers)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from loadtest.client import SignallingClient
from rooms.model import Role
from signalling.auth import TokenAuthority, load_or_create_secret
from tests.media.peers import Subscriber, publisher_offer


def get_json(url: str, token: str) -> Any:
    """GET with a bearer token; the decoded JSON body."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def authority(data_dir: Path) -> TokenAuthority:
    secret = load_or_create_secret(data_dir, create=False)
    return TokenAuthority("HS256", secret, secret, leeway_s=30)


class Participant:
    def __init__(self, ws_url: str, name: str, rtc_config: RTCConfiguration | None = None) -> None:
        self.client = SignallingClient(ws_url)
        self.name = name
        self.rtc_config = rtc_config
        self.publisher: RTCPeerConnection | None = None
        self.stream_id = ""
        self.subscribers: dict[str, Subscriber] = {}
        self.answered_at: dict[str, float] = {}

    async def join(self, tokens: TokenAuthority, room: str, role: Role = Role.PATIENT) -> dict[str, Any]:
        await self.client.connect()
        return await self.client.join(tokens.mint(room, role, self.name))

    async def publish(self, video: bool = True, audio: bool = True, video_codec: str = "") -> str:
        self.publisher = await publisher_offer(video=video, audio=audio, config=self.rtc_config,
                                               video_codec=video_codec)
        data = await self.client.request("publish", offer={"type": "offer", "sdp": self.publisher.localDescription.sdp})
        await self.publisher.setRemoteDescription(RTCSessionDescription(sdp=data["answer"]["sdp"], type="answer"))
        self.stream_id = data["stream_id"]
        return self.stream_id

    async def subscribe(self, stream_id: str) -> Subscriber:
        data = await self.client.request("subscribe", stream_id=stream_id)
        subscriber = Subscriber(self.rtc_config)
        answer = await subscriber.answer(data["offer"]["sdp"])
        await self.client.request("answer", subscription_id=data["subscription_id"],
                                  answer={"type": "answer", "sdp": answer})
        self.answered_at[stream_id] = time.monotonic()
        self.subscribers[stream_id] = subscriber
        return subscriber

    async def close(self) -> None:
        for subscriber in self.subscribers.values():
            await subscriber.close()
        if self.publisher is not None:
            await self.publisher.close()
        await self.client.close()
