"""Synthetic clients against a real ``openconsult serve``: what their TrackStats say
matches what the network profile and the publisher did. Packet counts and rates, no
timing assertions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from loadtest.synthetic import MediaSpec, NetworkProfile, Participant, TrackStats
from media import aiortc_internals
from rooms.model import Role
from tests.call_helpers import authority
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


@pytest.fixture(scope="module")
def media_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media-cache")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_server(tmp_path)
    yield server
    server.stop()


def recv(p: Participant, kind: str) -> TrackStats:
    [stats] = [s for s in p.track_stats() if s.direction == "recv" and s.kind == kind]
    return stats


async def test_smoke(server: ServerProcess, media_cache: Path) -> None:
    tokens = authority(server.data_dir)
    room = f"room-{uuid.uuid4().hex[:8]}"
    pub = Participant(server.ws_url, "Pub", cache_dir=media_cache)
    clean = Participant(server.ws_url, "Clean", cache_dir=media_cache)
    lossy = Participant(server.ws_url, "Lossy", network=NetworkProfile(loss_pct=10, direction="down"),
                        cache_dir=media_cache)
    try:
        await pub.join(tokens.mint(room, Role.CLINICIAN, "Pub"))
        await clean.join(tokens.mint(room, Role.PATIENT, "Clean"))
        await lossy.join(tokens.mint(room, Role.PATIENT, "Lossy"))
        stream = await pub.publish(MediaSpec())
        await clean.client.wait_event("streamCreated", stream__stream_id=stream)
        await lossy.client.wait_event("streamCreated", stream__stream_id=stream)
        await clean.subscribe(stream, "Pub")
        await lossy.subscribe(stream, "Pub")
        await wait_until(lambda: recv(lossy, "video").packets_expected >= 1500, timeout=60)
        for p in (pub, clean, lossy):
            for s in p.track_stats():
                print(p.name, s)
    finally:
        for p in (pub, clean, lossy):
            await p.close()
