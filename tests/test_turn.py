"""Media through a real TURN server: clients forced to relay-only ICE still call
through the SFU, with the short-lived credentials the join response hands out,
and support sees the relay in the candidate pair."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from pathlib import Path

from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from media import aiortc_internals
from rooms.model import Role
from signalling.config import MediaConfig
from signalling.turn import credentials, ice_servers
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import wait_until
from tests.server import start_server
from tests.turn_server import turn_server


def test_credentials_follow_the_turn_rest_scheme() -> None:
    username, credential = credentials("s3cret-s3cret-s3cret", "c_abc", ttl_s=600, now=1_000_000)
    assert username == "1000600:c_abc"
    expected = base64.b64encode(hmac.new(b"s3cret-s3cret-s3cret", b"1000600:c_abc", hashlib.sha1).digest()).decode()
    assert credential == expected
    media = MediaConfig(turn_urls=("stun:127.0.0.1:3478", "turn:127.0.0.1:3478?transport=udp"),
                        turn_secret="s3cret-s3cret-s3cret", turn_credential_ttl_s=600)
    assert ice_servers(media, "c_abc", now=1_000_000) == [
        {"urls": ["stun:127.0.0.1:3478"]},
        {"urls": ["turn:127.0.0.1:3478?transport=udp"], "username": username, "credential": credential},
    ]
    assert ice_servers(MediaConfig(), "c_abc") == []


async def test_relay_only_clients_call_through_turn(tmp_path: Path) -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))
    with turn_server(tmp_path / "turn") as turn:
        server = start_server(tmp_path, extra_config=f'turn_urls = ["{turn.url}"]\nturn_secret = "{turn.secret}"\n')
        tokens = authority(server.data_dir)
        room = f"r-{uuid.uuid4().hex[:8]}"
        alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
        try:
            joined = await alice.join(tokens, room, Role.CLINICIAN)
            await bob.join(tokens, room)
            [ice] = joined["ice_servers"]
            assert ice["urls"] == [turn.url] and int(ice["username"].split(":")[0]) > time.time()
            for p, data in ((alice, joined), (bob, bob.client.joined)):
                [s] = data["ice_servers"]
                p.rtc_config = RTCConfiguration(
                    iceServers=[RTCIceServer(urls=s["urls"][0], username=s["username"], credential=s["credential"])],
                    iceTransportPolicy=RTCIceTransportPolicy.RELAY)
            stream = await alice.publish()
            await bob.client.wait_event("streamCreated", stream__stream_id=stream)  # its media is up
            subscriber = await bob.subscribe(stream)
            await wait_until(lambda: len(subscriber.received.frames) > 10, timeout=60, message="video through TURN")
            assert {(w, h) for _, w, h, _ in subscriber.received.frames} == {(640, 480)}

            support = tokens.mint("support", Role.SUPPORT, "Support")
            events = get_json(f"{server.url}/api/sessions/{joined['session_id']}/events", support)["events"]
            pairs = [e["payload"]["candidate_pair"] for e in events
                     if e["kind"] == "iceStateChanged" and e["payload"]["state"] == "completed"]
            assert pairs and all(p["remote_type"] == "relay" for p in pairs), pairs
        finally:
            await alice.close()
            await bob.close()
            server.stop()
