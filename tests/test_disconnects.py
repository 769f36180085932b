"""Why things ended, as the other participants and support staff see it: a left
client, a dropped socket, a publisher whose media stopped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from media import aiortc_internals
from loadtest.client import RequestFailed
from rooms.model import Role
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("disconnects"))
    yield proc
    proc.stop()


def room() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


async def test_publisher_media_stopping_destroys_its_stream(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    r = room()
    alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
    try:
        await alice.join(tokens, r, Role.CLINICIAN)
        joined = await bob.join(tokens, r)
        stream = await alice.publish()
        await bob.client.wait_event("streamCreated", stream__stream_id=stream)  # its media is up
        subscriber = await bob.subscribe(stream)
        await wait_until(lambda: bool(subscriber.received.frames), timeout=30, message="video at Bob")
        assert alice.publisher is not None
        await alice.publisher.close()  # the camera app died; the signalling socket stays up
        destroyed = await bob.client.wait_event("streamDestroyed", stream__stream_id=stream)
        assert destroyed["data"]["reason"] == "mediaStopped"
        ended = await bob.client.wait_event("subscriptionEnded", stream_id=stream)
        assert ended["data"]["reason"] == "mediaStopped"
        support = tokens.mint("support", Role.SUPPORT, "Support")
        events = get_json(f"{server.url}/api/sessions/{joined['session_id']}/events", support)["events"]
        gone = [e for e in events if e["kind"] == "streamDestroyed"]
        assert [e["payload"]["reason"] for e in gone] == ["mediaStopped"]
        assert "Reason: mediaStopped" in gone[0]["text"]
    finally:
        await alice.close()
        await bob.close()


async def test_dropped_socket_is_a_network_disconnect(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    r = room()
    alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
    try:
        await alice.join(tokens, r, Role.CLINICIAN)
        joined = await bob.join(tokens, r)
        stream = await bob.publish(video=False)
        await alice.client.wait_event("streamCreated", stream__stream_id=stream)
        # Bob's network goes away: the TCP connection dies without a WebSocket close frame.
        assert bob.client.ws is not None
        transport = bob.client.ws._response.connection.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.abort()
        gone = await alice.client.wait_event("connectionDestroyed", connection__name="Bob")
        assert gone["data"]["reason"] == "networkDisconnected"
        destroyed = await alice.client.wait_event("streamDestroyed", stream__stream_id=stream)
        assert destroyed["data"]["reason"] == "networkDisconnected"
        # Leaving is a client disconnect.
        await alice.client.request("leave")
        support = tokens.mint("support", Role.SUPPORT, "Support")
        events = get_json(f"{server.url}/api/sessions/{joined['session_id']}/events", support)["events"]
        reasons = {e["text"].split(":")[1].split(".")[0].strip(): e["payload"]["reason"]
                   for e in events if e["kind"] == "disconnect"}
        assert reasons == {"Bob": "networkDisconnected", "Alice": "clientDisconnected"}
    finally:
        await alice.close()
        await bob.close()


async def test_a_socket_closed_without_a_close_frame_is_a_network_disconnect(server: ServerProcess) -> None:
    """A TCP FIN with no WebSocket close frame (a killed app, a dropped proxy) is a network loss;
    a close frame is the client hanging up."""
    tokens = authority(server.data_dir)
    r = room()
    watcher, bob, carol = (Participant(server.ws_url, name) for name in ("Watcher", "Bob", "Carol"))
    before = get_json(f"{server.url}/healthz", "")["connections"]
    try:
        await watcher.join(tokens, r, Role.CLINICIAN)
        await bob.join(tokens, r)
        await carol.join(tokens, r)
        assert get_json(f"{server.url}/healthz", "")["connections"] == before + 3
        assert bob.client.ws is not None and carol.client.ws is not None
        transport = bob.client.ws._response.connection.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.close()  # FIN, no close frame
        gone = await watcher.client.wait_event("connectionDestroyed", connection__name="Bob")
        assert gone["data"]["reason"] == "networkDisconnected"
        assert get_json(f"{server.url}/healthz", "")["connections"] == before + 2
        await carol.client.ws.close()  # a close frame (1000) without "leave"
        gone = await watcher.client.wait_event("connectionDestroyed", connection__name="Carol")
        assert gone["data"]["reason"] == "clientDisconnected"
    finally:
        for p in (watcher, bob, carol):
            await p.close()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path, extra_config="answer_timeout_s = 1.0\n[server]\nmax_publishes_per_connection = 1\n"
                                              "max_subscriptions_per_connection = 2\n")
    yield proc
    proc.stop()


async def test_per_connection_limits_and_unanswered_subscriptions(limited: ServerProcess) -> None:
    tokens = authority(limited.data_dir)
    r = room()
    alice, bob = Participant(limited.ws_url, "Alice"), Participant(limited.ws_url, "Bob")
    try:
        await alice.join(tokens, r, Role.CLINICIAN)
        await bob.join(tokens, r)
        stream = await alice.publish(video=False)
        with pytest.raises(RequestFailed) as second:
            await alice.publish(video=False)
        assert second.value.code == "invalid_state" and "1 streams" in second.value.message
        await bob.client.wait_event("streamCreated", stream__stream_id=stream)  # its media is up
        # Bob asks twice and never answers: both time out and end, freeing his quota.
        first = await bob.client.request("subscribe", stream_id=stream)
        await bob.client.request("subscribe", stream_id=stream)
        with pytest.raises(RequestFailed) as third:
            await bob.client.request("subscribe", stream_id=stream)
        assert third.value.code == "invalid_state"
        ended = await bob.client.wait_event("subscriptionEnded", subscription_id=first["subscription_id"])
        assert ended["data"]["reason"] == "networkDisconnected"
        await wait_until(lambda: sum(e["event"] == "subscriptionEnded" for e in bob.client.events) == 2,
                         timeout=15, message="both unanswered subscriptions to end")
        assert (await bob.client.request("subscribe", stream_id=stream))["subscription_id"]
    finally:
        await alice.close()
        await bob.close()


async def test_a_stopped_camera_is_logged_for_support(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    alice = Participant(server.ws_url, "Alice")
    try:
        joined = await alice.join(tokens, room(), Role.CLINICIAN)
        await alice.publish()
        assert alice.publisher is not None
        video = next(s for s in alice.publisher.getSenders() if s.kind == "video")
        camera = video.track
        await wait_until(lambda: getattr(camera, "counter", 0) > 30, timeout=30, message="a second of video sent")
        video.replaceTrack(None)
        support = tokens.mint("support", Role.SUPPORT, "Support")

        def alerts() -> list[str]:
            events = get_json(f"{server.url}/api/sessions/{joined['session_id']}/events", support)["events"]
            return [e["text"] for e in events if e["kind"] == "qualityAlert"]

        await wait_until(lambda: alerts() == ["No video received from Alice for 5 seconds"], timeout=30,
                         interval=0.5, message="the stopped-video alert")
        video.replaceTrack(camera)
        await wait_until(lambda: alerts()[-1:] == ["Video from Alice is flowing again"], timeout=30, interval=0.5,
                         message="the resumed-video entry")
    finally:
        await alice.close()
