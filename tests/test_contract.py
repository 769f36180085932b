"""What docs/protocol.md promises a client written from it alone, checked against a real
server: a second `answer` is `invalid_state`, every refused join closes with 4001,
trickled `ice` candidates (with the BUNDLE section's `sdpMid`, before or after the
answer, then `null`) are what the server connects over, and every event-log kind is
documented."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCSessionDescription

from loadtest.client import RequestFailed, SignallingClient
from metrics.events import EventKind
from rooms.model import Role
from signalling.auth import TokenAuthority
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import wait_until
from tests.media.peers import Subscriber, publisher_offer
from tests.server import ServerProcess, start_server

PROTOCOL_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("contract"))
    yield proc
    proc.stop()


@pytest.fixture
def tokens(server: ServerProcess) -> TokenAuthority:
    return authority(server.data_dir)


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[SignallingClient]:
    c = await SignallingClient(server.ws_url).connect()
    yield c
    await c.close()


def room() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def split_candidates(sdp: str) -> tuple[str, list[tuple[str, str]], str]:
    """The SDP without its candidates, each candidate as (mid, "candidate:…"), and the BUNDLE's first mid."""
    kept: list[str] = []
    found: list[tuple[str, str]] = []
    mid = ""
    bundle = ""
    for line in sdp.splitlines():
        if line.startswith("a=group:BUNDLE "):
            bundle = line.split()[1]
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        if line.startswith("a=candidate:"):
            found.append((mid, line[2:]))
        elif line != "a=end-of-candidates":
            kept.append(line)
    assert found and bundle, sdp
    return "\r\n".join(kept) + "\r\n", found, bundle


async def ice_pairs(server: ServerProcess, tokens: TokenAuthority, session_id: str, peer_id: str) -> list[Any]:
    support = tokens.mint("support", Role.SUPPORT, "Support")
    events = await asyncio.to_thread(get_json, server.url + f"/api/sessions/{session_id}/events", support)
    return [e["payload"]["candidate_pair"] for e in events["events"]
            if e["kind"] == "iceStateChanged" and e["payload"].get("peer_id") == peer_id
            and e["payload"].get("candidate_pair")]


# --- answer ---------------------------------------------------------------------------


async def test_a_second_answer_is_invalid_state(server: ServerProcess, tokens: TokenAuthority) -> None:
    r = room()
    alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
    try:
        await alice.join(tokens, r)
        await bob.join(tokens, r)
        stream_id = await alice.publish()
        await bob.client.wait_event("streamCreated", stream__stream_id=stream_id)  # its media is up
        data = await bob.client.request("subscribe", stream_id=stream_id)
        subscriber = Subscriber()
        bob.subscribers[stream_id] = subscriber
        answer = {"type": "answer", "sdp": await subscriber.answer(data["offer"]["sdp"])}
        sub_id = data["subscription_id"]
        # An answer that cannot be applied does not count: the corrected one is taken.
        with pytest.raises(RequestFailed) as broken:
            await bob.client.request("answer", subscription_id=sub_id, answer={"type": "answer", "sdp": "v=0\r\n"})
        assert broken.value.code == "media_error"
        # Two answers at once and one after: exactly one is taken, the others are invalid_state.
        results = await asyncio.gather(*(bob.client.request("answer", subscription_id=sub_id, answer=answer)
                                         for _ in range(2)), return_exceptions=True)
        assert sorted(str(r.code) if isinstance(r, RequestFailed) else "ok" for r in results) == \
            ["invalid_state", "ok"], results
        with pytest.raises(RequestFailed) as again:
            await bob.client.request("answer", subscription_id=sub_id, answer=answer)
        assert again.value.code == "invalid_state"
        assert sub_id in again.value.message
        await wait_until(lambda: subscriber.received.first_frame_at is not None, message="media after the answer")
    finally:
        await alice.close()
        await bob.close()


# --- refused joins ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["walk_in_link", "not_yet_valid", "wrong_room"])
async def test_every_refused_join_closes_with_4001(server: ServerProcess, tokens: TokenAuthority,
                                                   case: str) -> None:
    r = room()
    token, fields, code = {
        "walk_in_link": (tokens.mint(r, Role.PATIENT, "Walk-in", sub="walk-in", waiting_room="wr-1"), {}, "forbidden"),
        "not_yet_valid": (tokens.mint(r, Role.PATIENT, "Early", not_before=2**31 - 100, expires=2**31 - 1), {},
                          "token_not_yet_valid"),
        "wrong_room": (tokens.mint(r, Role.PATIENT, "Lost"), {"room": "elsewhere"}, "room_mismatch"),
    }[case]
    client = await SignallingClient(server.ws_url).connect()
    try:
        with pytest.raises(RequestFailed) as failure:
            await client.join(token, **fields)
        assert failure.value.code == code
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.close_code == 4001
    finally:
        await client.close()


async def test_joining_twice_is_invalid_state_and_keeps_the_connection(client: SignallingClient,
                                                                      tokens: TokenAuthority) -> None:
    token = tokens.mint(room(), Role.PATIENT, "Anna")
    await client.join(token)
    with pytest.raises(RequestFailed) as failure:
        await client.join(token)
    assert failure.value.code == "invalid_state"
    assert "time" in await client.request("ping")


# --- ice -------------------------------------------------------------------------------


async def test_trickled_candidates_are_what_the_server_connects_over(server: ServerProcess,
                                                                    tokens: TokenAuthority) -> None:
    """Publish: offer without candidates, all of them trickled after the publish response
    (before the client applies the answer) with their own section's sdpMid, then null. The
    server's selected pair must have a *host* remote end: it used the trickled candidates,
    not a peer-reflexive one learned from the checks."""
    r = room()
    alice = await SignallingClient(server.ws_url).connect()
    bob = await SignallingClient(server.ws_url).connect()
    publisher = await publisher_offer()
    subscriber = Subscriber()
    try:
        joined = await alice.join(tokens.mint(r, Role.PATIENT, "Alice"))
        await bob.join(tokens.mint(r, Role.CLINICIAN, "Bob"))
        assert publisher.localDescription is not None
        offer, candidates, bundle_mid = split_candidates(publisher.localDescription.sdp)
        data = await alice.request("publish", offer={"type": "offer", "sdp": offer})
        stream_id = data["stream_id"]
        for mid, candidate in candidates:
            # Candidates of the other (bundled) section are accepted and ignored.
            assert await alice.request("ice", peer_id=stream_id,
                                       candidate={"candidate": candidate, "sdpMid": mid}) == {}
        assert await alice.request("ice", peer_id=stream_id, candidate=None) == {}
        # After the end of candidates, more are accepted and ignored.
        assert await alice.request("ice", peer_id=stream_id,
                                   candidate={"candidate": candidates[0][1], "sdpMid": bundle_mid}) == {}
        await publisher.setRemoteDescription(RTCSessionDescription(sdp=data["answer"]["sdp"], type="answer"))

        # Subscribe (once the stream is live): candidates trickled with the BUNDLE mid before the
        # answer (which has none).
        await bob.wait_event("streamCreated", stream__stream_id=stream_id)
        offer_data = await bob.request("subscribe", stream_id=stream_id)
        answer, sub_candidates, sub_bundle = split_candidates(await subscriber.answer(offer_data["offer"]["sdp"]))
        sub_id = offer_data["subscription_id"]
        bundled = [candidate for mid, candidate in sub_candidates if mid == sub_bundle]
        assert bundled
        for candidate in bundled:  # only the BUNDLE section's: that is the transport media runs on
            await bob.request("ice", peer_id=sub_id, candidate={"candidate": candidate, "sdpMid": sub_bundle})
        await bob.request("answer", subscription_id=sub_id, answer={"type": "answer", "sdp": answer})
        await bob.request("ice", peer_id=sub_id, candidate={"candidate": ""})  # also the end of candidates
        await wait_until(lambda: subscriber.received.first_frame_at is not None, message="media over trickled ICE")

        session_id = joined["session_id"]
        pairs: list[Any] = []

        async def publish_pair_known() -> bool:
            pairs[:] = await ice_pairs(server, tokens, session_id, stream_id)
            return bool(pairs)

        await wait_until(publish_pair_known, message="the publish's selected candidate pair in the event log")
        assert pairs[0]["remote_type"] == "host", pairs

        # Refused: an unknown peer, and a candidate that is not one.
        with pytest.raises(RequestFailed) as unknown:
            await bob.request("ice", peer_id=stream_id, candidate=None)  # Alice's peer, not Bob's
        assert unknown.value.code == "not_found"
        with pytest.raises(RequestFailed) as garbage:
            await bob.request("ice", peer_id=sub_id, candidate={"candidate": "candidate:nonsense", "sdpMid": "0"})
        assert garbage.value.code == "media_error"
    finally:
        await publisher.close()
        await subscriber.close()
        await alice.close()
        await bob.close()


# --- event-log kinds --------------------------------------------------------------------


def test_every_event_log_kind_is_documented() -> None:
    """docs/protocol.md's event-log table has one row per EventKind, no more, no fewer."""
    text = PROTOCOL_DOC.read_text()
    section = text.split("## Event log", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([A-Za-z]+)` \|", section, re.M)
    assert sorted(documented) == sorted(k.value for k in EventKind)
