"""Bad input over the real WebSocket: every case gets a coded error reply and the
socket stays usable; a refused join closes with the policy code and is logged."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import msgpack
import pytest

from loadtest.client import RequestFailed, SignallingClient
from rooms.model import Role
from signalling.auth import TokenAuthority
from tests.call_helpers import authority, get_json
from tests.server import ServerProcess, start_server

MAX_BYTES = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("proto"), extra_config=f"[server]\nmax_message_bytes = {MAX_BYTES}\n")
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


async def expect_error(client: SignallingClient, message: dict[str, Any], code: str) -> str:
    response = await client.request_raw(message)
    assert response["ok"] is False, response
    assert response["error"]["code"] == code, response
    return str(response["error"]["message"])


async def assert_usable(client: SignallingClient) -> None:
    assert "time" in await client.request("ping")


async def test_malformed_frames_get_coded_errors_and_the_socket_survives(client: SignallingClient) -> None:
    for frame, code in [
        ("{not json", "invalid_message"),
        ("[1, 2, 3]", "invalid_message"),
        (json.dumps({"type": "teleport", "id": 5}), "invalid_message"),
        (json.dumps({"type": "\ud800", "id": 6}), "invalid_message"),
        ('{"type":"ping","id":7,"name":"\u0007"}', "invalid_message"),
    ]:
        await client.send_raw(frame)
        response = await client.next_response()
        assert response["ok"] is False and response["error"]["code"] == code, (frame[:40], response)
    await assert_usable(client)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_a_frame_over_the_limit_closes_1009(server: ServerProcess, binary: bool) -> None:
    client = await SignallingClient(server.ws_url).connect()
    try:
        await assert_usable(client)
        await client.send_raw(b"x" * (MAX_BYTES + 1) if binary else "x" * (MAX_BYTES + 1))
        await client.closed.wait()
        assert client.close_code == 1009
    finally:
        await client.close()


async def test_wrong_field_types_name_the_field(client: SignallingClient, tokens: TokenAuthority) -> None:
    message = await expect_error(client, {"type": "join", "token": 42}, "invalid_message")
    assert "token" in message
    await client.join(tokens.mint(room(), Role.PATIENT, "Anna"))
    message = await expect_error(client, {"type": "publish", "offer": {"type": "offer", "sdp": 7}}, "invalid_message")
    assert "offer.sdp" in message
    message = await expect_error(client, {"type": "subscribe", "stream_id": ["x"]}, "invalid_message")
    assert "stream_id" in message
    await assert_usable(client)


async def test_requests_before_join_and_unknown_ids(client: SignallingClient, tokens: TokenAuthority) -> None:
    await expect_error(client, {"type": "publish", "offer": {"type": "offer", "sdp": "v=0"}}, "invalid_state")
    await expect_error(client, {"type": "subscribe", "stream_id": "st_nope"}, "invalid_state")
    await assert_usable(client)
    await client.join(tokens.mint(room(), Role.CLINICIAN, "Dr Berg"))
    await expect_error(client, {"type": "subscribe", "stream_id": "st_nope"}, "not_found")
    await expect_error(client, {"type": "unsubscribe", "subscription_id": "sub_nope"}, "not_found")
    await expect_error(client, {"type": "ice", "peer_id": "st_nope", "candidate": None}, "not_found")
    await expect_error(client, {"type": "publish", "offer": {"type": "offer", "sdp": "v=0\r\nnonsense"}},
                       "media_error")
    await expect_error(client, {"type": "join", "token": tokens.mint(room(), Role.PATIENT, "Again")},
                       "invalid_state")
    await assert_usable(client)


@pytest.mark.parametrize("case", ["expired", "not_yet_valid", "forged", "other_room", "garbage", "bad_role"])
async def test_rejected_tokens_close_with_policy_and_are_logged(
    server: ServerProcess, tokens: TokenAuthority, case: str
) -> None:
    r = room()
    now = int(time.time())
    secret_tokens = tokens
    token, code, fields = {
        "expired": (secret_tokens.mint(r, Role.PATIENT, "Late", not_before=now - 7200, expires=now - 3600),
                    "token_expired", {}),
        "not_yet_valid": (secret_tokens.mint(r, Role.PATIENT, "Early", not_before=now + 3600, expires=now + 7200),
                          "token_not_yet_valid", {}),
        "forged": (jwt.encode({"room": r, "role": "patient", "name": "Mallory", "nbf": now, "exp": now + 60},
                              "x" * 40, algorithm="HS256"), "unauthorized", {}),
        "other_room": (secret_tokens.mint("another-room", Role.PATIENT, "Lost"), "room_mismatch", {"room": r}),
        "garbage": ("not-a-jwt", "unauthorized", {"room": r}),
        "bad_role": (jwt.encode({"room": r, "role": "janitor", "name": "X", "nbf": now, "exp": now + 60},
                                str(secret_tokens._sign_key), algorithm="HS256"), "unauthorized", {}),
    }[case]
    client = await SignallingClient(server.ws_url).connect()
    try:
        with pytest.raises(RequestFailed) as failure:
            await client.join(token, **fields)
        assert failure.value.code == code
        await client.closed.wait()
        assert client.close_code == 4001
    finally:
        await client.close()

    support = tokens.mint("support", Role.SUPPORT, "Support")
    events = get_json(server.url + f"/api/sessions/room:{r}/events", support)["events"]
    rejected = [e for e in events if e["kind"] == "tokenRejected"]
    assert [e["payload"]["code"] for e in rejected] == [code]
    assert rejected[0]["text"].startswith("Failed to get valid token for token:")
    assert token not in json.dumps(rejected)  # never the whole credential


async def test_inspector_api_needs_a_support_token(server: ServerProcess, tokens: TokenAuthority) -> None:
    import urllib.error

    patient = tokens.mint(room(), Role.PATIENT, "Anna")
    with pytest.raises(urllib.error.HTTPError) as denied:
        get_json(server.url + "/api/sessions/s_x/events", patient)
    assert denied.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(server.url + "/api/sessions/s_x/events", timeout=10)
    assert missing.value.code == 401


async def test_msgpack_subprotocol(server: ServerProcess, tokens: TokenAuthority) -> None:
    client = await SignallingClient(server.ws_url, msgpack_frames=True).connect()
    try:
        assert client.ws is not None and client.ws.protocol == "openconsult.v1.msgpack"
        joined = await client.join(tokens.mint(room(), Role.PATIENT, "Anna"))
        assert joined["session_id"].startswith("s_")
        await client.send_raw(b"\xc1\xc1garbage")
        response = await client.next_response()
        assert response["error"]["code"] == "invalid_message"
        await client.send_raw(msgpack.packb({"type": "ping", "id": "p1"}))
        await assert_usable(client)
    finally:
        await client.close()
