"""Fuzzing a live server over the wire: a client joined to a room sends hundreds of hostile frames
(every message type, both codecs, lone surrogates, control characters, huge numbers, deep
nesting, duplicate keys, wrong types, compressed and oversized frames) while another member of
the room keeps working. Every frame gets a coded reply or a documented close; everything the
server sends validates against the schemas; the other member notices nothing but the fuzzer's
comings and goings; the server's memory stays bounded."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgpack
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from loadtest.client import SignallingClient
from rooms.model import Role
from signalling.auth import TokenAuthority
from signalling.codec import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, check_outbound
from tests.call_helpers import authority
from tests.server import ServerProcess, start_server
from tests.signalling.hostile import fuzz_settings, json_frames, msgpack_frames
from tests.signalling.rawws import vm_rss_kib
from tests.signalling.test_codec import MINIMAL, VALID

LIMIT = 16_384
MAX_INVALID = 40
#: Close codes docs/protocol.md documents for a client's own doing.
DOCUMENTED_CLOSES = {1000, 1009, 4001}
#: A frame refused as it arrives (1009) is cut off mid-stream: a client still sending then may
#: get a TCP reset instead of the close frame, which its library reports as 1006 (documented).
CUT_OFF = 1006
RSS_CEILING_KIB = 96 * 1024
BASES: list[dict[str, Any]] = [*VALID.values(), *MINIMAL.values()]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("wsfuzz"), extra_config=(
        f"[server]\nmax_message_bytes = {LIMIT}\nmax_invalid_messages = {MAX_INVALID}\n"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def rss_start_kib(server: ServerProcess) -> int:
    return vm_rss_kib(server.proc.pid)


def edge_frames() -> st.SearchStrategy[str | bytes]:
    """Frames for the edge rather than the codec: oversized, and compressible far past the limit."""
    return st.sampled_from(["x" * (LIMIT + 1), "{" * (4 * LIMIT), b"\x00" * (LIMIT + 1),
                            json.dumps({"type": "ping", "id": 1, "pad": "a" * (10 * LIMIT)})])


class Fuzzer:
    """A raw-ish protocol client (aiohttp, permessage-deflate on) that reports what each frame got."""

    def __init__(self, server: ServerProcess, token: str, binary: bool) -> None:
        self.server = server
        self.token = token
        self.binary = binary
        self.session = aiohttp.ClientSession()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.connection_ids: list[str] = []
        self.seen = 0
        self._sentinels = itertools.count()

    def _encode(self, message: dict[str, Any]) -> str | bytes:
        if self.binary:
            packed = msgpack.packb(message)
            assert isinstance(packed, bytes)
            return packed
        return json.dumps(message)

    async def _send(self, frame: str | bytes) -> None:
        assert self.ws is not None
        if isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame)

    async def connect(self) -> None:
        protocol = SUBPROTOCOL_MSGPACK if self.binary else SUBPROTOCOL_JSON
        self.ws = await self.session.ws_connect(self.server.ws_url, protocols=(protocol,), compress=15,
                                                max_msg_size=0)
        replies, code = await self.exchange(self._encode({"type": "join", "id": "join", "token": self.token}))
        assert code is None, code
        joined = [r for r in replies if r.get("id") == "join"]
        assert joined and joined[0]["ok"], replies
        self.connection_ids.append(joined[0]["data"]["connection_id"])

    async def exchange(self, frame: str | bytes) -> tuple[list[dict[str, Any]], int | None]:
        """Send ``frame`` and a ping behind it; the responses before the ping's, or the close code."""
        assert self.ws is not None
        sentinel = f"sentinel-{next(self._sentinels)}"
        try:
            await self._send(frame)
            await self._send(self._encode({"type": "ping", "id": sentinel}))
        except (ConnectionError, RuntimeError):
            pass  # closed under us: the close frame tells why
        replies: list[dict[str, Any]] = []
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 30)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.ERROR):
                return replies, self.ws.close_code
            assert msg.type == (aiohttp.WSMsgType.BINARY if self.binary else aiohttp.WSMsgType.TEXT), msg
            message = msgpack.unpackb(msg.data) if self.binary else json.loads(msg.data)
            check_outbound(message)
            self.seen += 1
            if message["type"] == "event":
                continue
            if message["id"] == sentinel:
                return replies, None
            replies.append(message)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.session.close()


async def fuzz_one_room(server: ServerProcess, tokens: TokenAuthority, binary: bool,
                        frames: list[str | bytes]) -> None:
    room = f"fuzz-{uuid.uuid4().hex[:8]}"
    member = await SignallingClient(server.ws_url).connect()
    fuzzer = Fuzzer(server, tokens.mint(room, Role.PATIENT, "Fuzz"), binary)
    try:
        await member.join(tokens.mint(room, Role.CLINICIAN, "Dr Berg"))
        await fuzzer.connect()
        answered = closed = 0
        for i, frame in enumerate(frames):
            replies, code = await fuzzer.exchange(frame)
            if code is None:
                # Not closed: the frame got at least one coded reply (check_outbound checked each).
                assert replies, (frame[:80], "no reply")
                answered += 1
            else:
                size = len(frame.encode() if isinstance(frame, str) else frame)
                allowed = DOCUMENTED_CLOSES | ({CUT_OFF} if size > LIMIT else set())
                assert code in allowed, (frame[:80], code)
                closed += 1
                await fuzzer.connect()
            if i % 10 == 0:  # the other member keeps working meanwhile
                assert "time" in await member.request("ping", timeout=10)
        assert answered + closed == len(frames)
        await fuzzer.close()
        # Events kept reaching the other member: every fuzzer connection came and went.
        for connection_id in fuzzer.connection_ids:
            await member.wait_event("connectionCreated", connection__connection_id=connection_id)
            await member.wait_event("connectionDestroyed", connection__connection_id=connection_id)
        assert "time" in await member.request("ping", timeout=10)
        assert not member.closed.is_set()
        for message in member.raw:
            check_outbound(message)
    finally:
        await fuzzer.close()
        await member.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
@settings(fuzz_settings(4), phases=[Phase.explicit, Phase.generate])  # no shrinking: each example is a session
@given(data=st.data())
def test_fuzzing_client_beside_a_working_member(server: ServerProcess, rss_start_kib: int, binary: bool,
                                                data: st.DataObject) -> None:
    codec_frames = msgpack_frames(BASES) if binary else json_frames(BASES)
    frames = data.draw(st.lists(codec_frames | edge_frames(), min_size=50, max_size=50), label="frames")
    asyncio.run(fuzz_one_room(server, authority(server.data_dir), binary, frames))
    growth = vm_rss_kib(server.proc.pid) - rss_start_kib
    assert growth < RSS_CEILING_KIB, f"server RSS grew by {growth} KiB"
