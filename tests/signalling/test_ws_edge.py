"""The WebSocket edge against hostile clients, on a real server: compressed bombs and oversized
frames are refused where the bytes arrive (1009, memory bounded), client text that cannot be
encoded never silences a socket or a room, a client that does not read is dropped as a slow
consumer with its reason logged, and a client that reads gets every reply to a burst."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest

from loadtest.client import SignallingClient
from rooms.model import Role
from signalling.auth import TokenAuthority
from signalling.codec import check_outbound
from tests.call_helpers import authority, get_json
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server
from tests.signalling.rawws import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_TEXT,
    RawWebSocket,
    client_frame,
    deflate_bomb,
    vm_rss_kib,
)

LIMIT = 131_072  # server.max_message_bytes (the default)
WRITE_TIMEOUT_S = 2.0
#: What bombs may cost the server in all, resident (one inflated bomb used to cost 515 MiB).
RSS_CEILING_KIB = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("wsedge"),
                        extra_config=f"[server]\nmax_message_bytes = {LIMIT}\nwrite_timeout_s = {WRITE_TIMEOUT_S}\n")
    yield proc
    proc.stop()


@pytest.fixture
def tokens(server: ServerProcess) -> TokenAuthority:
    return authority(server.data_dir)


def room() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def bystander(server: ServerProcess, tokens: TokenAuthority) -> AsyncIterator[SignallingClient]:
    """A joined member of some room, who must not notice anything."""
    client = await SignallingClient(server.ws_url).connect()
    await client.join(tokens.mint(room(), Role.CLINICIAN, "Dr Berg"))
    yield client
    await client.close()


async def assert_unaffected(client: SignallingClient) -> None:
    assert "time" in await client.request("ping", timeout=10)
    assert not client.closed.is_set()


def frames_over_the_limit() -> dict[str, list[bytes]]:
    """Each case: the frames one connection sends, all refused before login with 1009."""
    bomb_small = deflate_bomb(100 * 1024)  # under the frame limit, inflates to ~100 MiB
    half = len(bomb_small) // 2
    return {
        "raw text frame": [client_frame(OP_TEXT, b"x" * (LIMIT + 1))],
        "raw binary frame": [client_frame(OP_BINARY, b"\x00" * (2 * LIMIT))],
        "fragments adding up": [client_frame(OP_TEXT, b"{" * 60_000, fin=False)]
        + [client_frame(OP_CONTINUATION, b"[" * 60_000, fin=i == 2) for i in range(3)],
        "255 KiB bomb": [client_frame(OP_TEXT, deflate_bomb(255 * 1024), rsv1=True)],
        "100 KiB bomb": [client_frame(OP_TEXT, bomb_small, rsv1=True)],
        "fragmented bomb": [client_frame(OP_BINARY, bomb_small[:half], fin=False, rsv1=True),
                            client_frame(OP_CONTINUATION, bomb_small[half:])],
    }


async def test_bombs_and_oversized_frames_close_1009_before_login_and_cost_no_memory(
    server: ServerProcess, bystander: SignallingClient
) -> None:
    cases = frames_over_the_limit()
    assert len(deflate_bomb(255 * 1024)) > 250 * 1024
    rss_before = vm_rss_kib(server.proc.pid)
    for round_ in range(3):
        for name, frames in cases.items():
            raw = await RawWebSocket.connect(server.port, deflate=True)
            try:
                for frame in frames:
                    await raw.send(frame)
                code = await asyncio.wait_for(raw.close_code(), 30)
            finally:
                raw.close()
            assert code == 1009, (round_, name, code)
            await assert_unaffected(bystander)
    growth = vm_rss_kib(server.proc.pid) - rss_before
    assert growth < RSS_CEILING_KIB, f"server RSS grew by {growth} KiB"
    # A frame at the limit is still a frame: it gets a coded reply, not a close.
    raw = await RawWebSocket.connect(server.port, deflate=True)
    try:
        await raw.send_text(json.dumps({"type": "ping", "id": 1, "pad": "x" * (LIMIT - 100)})[:LIMIT - 2] + '"}')
        reply = await asyncio.wait_for(raw.read_message(), 30)
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_message", reply  # type: ignore[index]
    finally:
        raw.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
async def test_text_that_cannot_be_encoded_never_silences_a_socket_or_a_room(
    server: ServerProcess, tokens: TokenAuthority, binary: bool
) -> None:
    r = room()
    json_member = await SignallingClient(server.ws_url).connect()
    msgpack_member = await SignallingClient(server.ws_url, msgpack_frames=True).connect()
    eve = await SignallingClient(server.ws_url, msgpack_frames=binary).connect()
    try:
        await json_member.join(tokens.mint(r, Role.CLINICIAN, "Dr Berg"))
        await msgpack_member.join(tokens.mint(r, Role.PATIENT, "Anna"))
        # A display name with a lone surrogate (the token carries it as a \u escape) is broadcast.
        joined = await eve.join(tokens.mint(r, Role.PATIENT, "Eve\ud800"))
        eve_id = joined["connection_id"]
        for member in (json_member, msgpack_member):
            created = await member.wait_event("connectionCreated", connection__connection_id=eve_id)
            assert created["data"]["connection"]["name"] == "Eve\ufffd"
        # Echoed: an unknown type and a key that is not allowed, both with lone surrogates.
        for frame in ('{"type":"\\ud800","id":1}', '{"type":"ping","id":2,"\\udbff":1}',
                      '{"type":"publish","id":3,"offer":{"type":"offer","sdp":"v=0"},"name":"\\udfff"}'):
            await eve.send_raw(frame if not binary else frame.encode("utf-8"))
            reply = await eve.next_response()
            check_outbound(reply)
            assert reply["error"]["code"] in ("invalid_message", "media_error"), reply
        # Every socket still works both ways, and events still reach both members.
        for client in (json_member, msgpack_member, eve):
            await assert_unaffected(client)
        await eve.request("leave")
        for member in (json_member, msgpack_member):
            gone = await member.wait_event("connectionDestroyed", connection__connection_id=eve_id)
            assert gone["data"]["reason"] == "clientDisconnected"
    finally:
        for client in (json_member, msgpack_member, eve):
            await client.close()


async def test_a_pipelined_burst_of_2000_pings_gets_every_reply(
    server: ServerProcess, tokens: TokenAuthority
) -> None:
    client = await SignallingClient(server.ws_url).connect()
    try:
        await client.join(tokens.mint(room(), Role.PATIENT, "Anna"))
        for i in range(2000):
            await client.send({"type": "ping", "id": f"burst-{i}"})
        await wait_until(lambda: sum(1 for m in client.raw if str(m.get("id", "")).startswith("burst-")) == 2000
                         or client.closed.is_set(), timeout=60, message="2000 ping replies")
        replies = [m for m in client.raw if str(m.get("id", "")).startswith("burst-")]
        assert [m["id"] for m in replies] == [f"burst-{i}" for i in range(2000)]
        assert all(m["ok"] for m in replies)
        await assert_unaffected(client)
    finally:
        await client.close()


async def test_a_client_that_sends_but_never_reads_is_dropped_as_a_slow_consumer(
    server: ServerProcess, tokens: TokenAuthority
) -> None:
    r = room()
    observer = await SignallingClient(server.ws_url).connect()
    await observer.join(tokens.mint(r, Role.CLINICIAN, "Dr Berg"))
    raw = await RawWebSocket.connect(server.port, rcvbuf=4096)
    sender: asyncio.Task[None] | None = None
    try:
        await raw.send_json({"type": "join", "id": "j", "token": tokens.mint(r, Role.PATIENT, "Sloth")})
        created = await observer.wait_event("connectionCreated", connection__name="Sloth")
        sloth_id = created["data"]["connection"]["connection_id"]

        async def keep_sending() -> None:
            pad = "p" * 60
            batch = b"".join(client_frame(OP_TEXT, json.dumps({"type": "ping", "id": f"{pad}{i}"}).encode())
                             for i in range(200))
            try:
                while True:
                    await raw.send(batch)  # blocks once the server stops reading: that is backpressure
            except OSError:
                return  # the server cut us off

        sender = asyncio.create_task(keep_sending())
        gone = await observer.wait_event("connectionDestroyed", timeout=60, connection__connection_id=sloth_id)
        assert gone["data"]["reason"] == "slowConsumer"
        support = tokens.mint("support", Role.SUPPORT, "Support")
        session = observer.joined["session_id"]
        events = get_json(f"{server.url}/api/sessions/{session}/events", support)["events"]
        left = [e for e in events if e["kind"] == "disconnect" and e["connection_id"] == sloth_id]
        assert [e["payload"]["reason"] for e in left] == ["slowConsumer"]
        assert "Reason: slowConsumer" in left[0]["text"]
        await wait_until(lambda: "slow consumer" in server.log_text(), timeout=10, message="the server log line")
        await assert_unaffected(observer)
    finally:
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        raw.close()
        await observer.close()


async def test_every_frame_the_edge_sends_matches_the_schemas(server: ServerProcess, tokens: TokenAuthority) -> None:
    """Replies and events seen by a msgpack client over a short session validate against the schemas."""
    r = room()
    a = await SignallingClient(server.ws_url, msgpack_frames=True).connect()
    b = await SignallingClient(server.ws_url).connect()
    try:
        await a.join(tokens.mint(r, Role.CLINICIAN, "Dr Berg"))
        await b.join(tokens.mint(r, Role.PATIENT, "Anna"))
        await a.send_raw(msgpack.packb({"type": "ping", "id": 1, "x": 2}))
        await a.next_response()
        await b.request("leave")
        await a.wait_event("connectionDestroyed")
        seen: list[dict[str, Any]] = [*a.raw, *b.raw]
        assert len(seen) >= 5
        for message in seen:
            check_outbound(message)
    finally:
        await a.close()
        await b.close()
