"""Client events and stats: the wire messages client.event / client.stats and the tab-closed
beacon, against a real server: schema errors, the per-connection rate limit, storage with
component client in the sender's session, the SDK version and parsed user agent in join's entries."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from loadtest.client import RequestFailed, SignallingClient
from rooms.model import Role
from signalling.auth import TokenAuthority
from signalling.client_reports import ReportLimiter, validate_beacon
from signalling.codec import JsonCodec
from signalling.errors import InvalidMessage, RateLimited
from tests.call_helpers import authority
from tests.server import ServerProcess, start_server

CHROME_UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
             "Chrome/120.0.0.0 Safari/537.36")
PER_MIN = 12  # the server's client_reports_per_min here: a burst of 4


# --- pure parts ---------------------------------------------------------------------------------


def test_limiter_allows_a_burst_then_the_rate() -> None:
    limiter = ReportLimiter(60)  # one a second, bursts of 15
    assert [limiter.acquire("c", 100.0) for _ in range(15)] == [None] * 15
    wait = limiter.acquire("c", 100.0)
    assert wait is not None and 0.9 < wait <= 1.0
    assert limiter.acquire("other", 100.0) is None  # per connection
    assert limiter.acquire("c", 101.01) is None
    with pytest.raises(RateLimited, match="at most 60 a minute") as caught:
        limiter.check("c", 101.01)
    assert caught.value.retry_after_s == 1


def test_limiter_stays_bounded() -> None:
    limiter = ReportLimiter(60, max_keys=100)
    for i in range(1_000):
        limiter.acquire(f"c{i}", float(i))
    assert len(limiter) <= 100


CODEC = JsonCodec()


@pytest.mark.parametrize(("message", "error"), [
    ({"event": "selfDestruct"}, '"event" must be one of "deviceCheck"'),
    ({"event": "deviceCheck", "data": {"camera": "broken"}}, '"data.camera" must be one of "ok"'),
    ({"event": "deviceCheck", "data": {"mood": "ok"}}, '"data.mood" is not allowed'),
    ({"event": "deviceCheck", "data": {"error_name": "Not Allowed"}}, '"data.error_name" contains characters'),
    ({"event": "iceFailed", "data": {"local_candidate_types": ["host", "carrier-pigeon"]}},
     '"data.local_candidate_types[1]" must be one of "host"'),
    ({"event": "reconnecting", "data": {"attempt": -1}}, '"data.attempt" must be at least 0'),
    ({"event": "tabClosed", "data": {"error_message": "a\x1bb"}}, '"data.error_message" contains control character'),
    ({}, '"event" is required'),
])
def test_client_event_schema_errors(message: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidMessage, match=error.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        CODEC.decode(json.dumps({"type": "client.event", "id": 1, **message}))


def sample(**fields: Any) -> dict[str, Any]:
    return {"stream_id": "st_x", "kind": "video", "direction": "recv", **fields}


@pytest.mark.parametrize(("samples", "error"), [
    ([], '"samples" is invalid'),
    ([sample()] * 17, '"samples" is invalid'),
    ([sample(kind="smell")], '"samples[0].kind" must be one of "audio", "video"'),
    ([sample(direction="sideways")], '"samples[0].direction" must be one of "send", "recv"'),
    ([sample(framesDecoded="many")], '"samples[0].framesDecoded" must be a number or null'),
    ([sample(framesDecoded=-1)], '"samples[0].framesDecoded" must be at least 0'),
    ([sample(secret="x")], '"samples[0].secret" is not allowed'),
    ([sample(candidate_pair={"local_type": "relay", "remote_type": "host", "protocol": "sctp"})],
     '"samples[0].candidate_pair.protocol" must be one of'),
    ([{"kind": "audio", "direction": "send"}], '"samples[0].stream_id" is required'),
])
def test_client_stats_schema_errors(samples: list[dict[str, Any]], error: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        CODEC.decode(json.dumps({"type": "client.stats", "id": 1, "samples": samples}))
    assert error in caught.value.message


def test_beacon_body_is_checked_like_the_wire_message() -> None:
    assert validate_beacon({"token": "t", "connection_id": "c_1", "event": "tabClosed"}) == (
        "c_1", {"type": "client.event", "id": 0, "event": "tabClosed"})
    with pytest.raises(InvalidMessage, match='"connection_id" must be a string'):
        validate_beacon({"event": "tabClosed"})
    with pytest.raises(InvalidMessage, match='"event" must be one of'):
        validate_beacon({"connection_id": "c_1", "event": "rm -rf"})
    # A lone surrogate is made safe, as on the socket.
    _, message = validate_beacon({"connection_id": "c_1", "event": "getUserMediaFailed",
                                  "data": {"error_message": "bad \ud800"}})
    assert message["data"]["error_message"] == "bad \ufffd"


# --- against a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("client-reports"),
                          f"\n[server]\nclient_reports_per_min = {PER_MIN}\n")
    yield server
    server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def events(http: aiohttp.ClientSession, server: ServerProcess, tokens: TokenAuthority,
                 session_id: str) -> list[dict[str, Any]]:
    support = tokens.mint("support", Role.SUPPORT, "Sue")
    async with http.get(f"{server.url}/api/sessions/{session_id}/events",
                        headers={"Authorization": f"Bearer {support}"}) as response:
        assert response.status == 200
        found: list[dict[str, Any]] = (await response.json())["events"]
        return found


async def joined(server: ServerProcess, token: str, **fields: Any) -> SignallingClient:
    client = await SignallingClient(server.ws_url).connect()
    await client.join(token, **fields)
    return client


async def test_events_and_stats_are_stored_with_component_client(server: ServerProcess,
                                                                  http: aiohttp.ClientSession) -> None:
    tokens = authority(server.data_dir)
    client = await joined(server, tokens.mint("room-a", Role.PATIENT, "Anna"), user_agent=CHROME_UA,
                          sdk_version="1.2.3")
    try:
        sid, cid = client.joined["session_id"], client.joined["connection_id"]
        await client.request("client.event", event="deviceCheck",
                             data={"camera": "denied", "microphone": "ok", "error_name": "NotAllowedError"})
        await client.request("client.stats", samples=[
            sample(stream_id="st_nowhere", framesDecoded=120, freezeCount=1, frameWidth=640, frameHeight=480,
                   candidate_pair={"local_type": "host", "remote_type": "host", "protocol": "udp"}),
            {"stream_id": "st_nowhere", "kind": "audio", "direction": "send", "roundTripTime": 0.05,
             "qualityLimitationReason": None},
        ])
        log = await events(http, server, tokens, sid)
    finally:
        await client.close()
    client_entries = [e for e in log if e["component"] == "client"]
    assert [(e["kind"], e["connection_id"]) for e in client_entries] == [
        ("clientEvent", cid), ("clientStats", cid), ("clientStats", cid)]
    device, video, audio = (e["payload"] for e in client_entries)
    assert device == {"event": "deviceCheck", "camera": "denied", "microphone": "ok", "error_name": "NotAllowedError"}
    assert "camera denied" in client_entries[0]["text"] and "NotAllowedError" in client_entries[0]["text"]
    assert video["framesDecoded"] == 120 and video["candidate_pair"]["protocol"] == "udp"
    assert audio == {"stream_id": "st_nowhere", "kind": "audio", "direction": "send", "roundTripTime": 0.05,
                     "qualityLimitationReason": None}
    # A stream the session does not know is not attached to the entry's stream column.
    assert [e["stream_id"] for e in client_entries] == [None, None, None]
    # Join's entries carry the SDK version and the parsed user agent.
    connect = next(e for e in log if e["kind"] == "serverDetectedConnect")
    assert {k: connect["payload"][k] for k in ("sdk_version", "browser", "os", "device", "user_agent")} == {
        "sdk_version": "1.2.3", "browser": "Chrome 120", "os": "Windows 10", "device": "desktop",
        "user_agent": CHROME_UA}


async def test_reports_before_join_and_bad_sdk_version_are_refused(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    client = await SignallingClient(server.ws_url).connect()
    try:
        with pytest.raises(RequestFailed) as caught:
            await client.request("client.event", event="pageHidden")
        assert caught.value.code == "invalid_state"
        with pytest.raises(RequestFailed) as caught:
            await client.join(tokens.mint("room-b", Role.PATIENT, "Anna"), sdk_version="1.0 <script>")
        assert caught.value.code == "invalid_message" and '"sdk_version"' in str(caught.value)
    finally:
        await client.close()


async def test_rate_limit_per_connection(server: ServerProcess, http: aiohttp.ClientSession) -> None:
    tokens = authority(server.data_dir)
    noisy = await joined(server, tokens.mint("room-c", Role.PATIENT, "Anna"))
    quiet = await joined(server, tokens.mint("room-c", Role.CLINICIAN, "Dr Hansen"))
    try:
        codes = []
        for _ in range(PER_MIN):
            try:
                await noisy.request("client.event", event="pageHidden")
                codes.append("ok")
            except RequestFailed as exc:
                codes.append(exc.code)
        burst = max(4, PER_MIN // 4)
        # The burst passes; within the same second the rest are refused (one may refill on a slow box).
        assert codes[:burst] == ["ok"] * burst
        assert codes.count("rate_limited") >= PER_MIN - burst - 1
        await quiet.request("client.event", event="pageVisible")  # another connection is not affected
        await noisy.request("ping")  # and the limited one stays usable
        log = await events(http, server, tokens, noisy.joined["session_id"])
    finally:
        await noisy.close()
        await quiet.close()
    stored = [e["connection_id"] for e in log if e["kind"] == "clientEvent"]
    assert stored.count(noisy.joined["connection_id"]) == codes.count("ok")
    assert stored.count(quiet.joined["connection_id"]) == 1


async def test_tab_closed_beacon(server: ServerProcess, http: aiohttp.ClientSession) -> None:
    tokens = authority(server.data_dir)
    token = tokens.mint("room-d", Role.PATIENT, "Anna", sub="anna")
    client = await joined(server, token)
    other = await joined(server, tokens.mint("room-d", Role.CLINICIAN, "Dr Hansen", sub="hansen"))
    sid, cid = client.joined["session_id"], client.joined["connection_id"]
    await client.close()  # the socket is gone when the beacon comes
    url = f"{server.url}/api/client-events"
    try:
        async def post(body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
            async with http.post(url, data=json.dumps(body), headers=headers or {}) as response:
                return response.status, await response.json()

        # sendBeacon: the token in the body, no header.
        assert await post({"token": token, "connection_id": cid, "event": "tabClosed"}) == (202, {})
        # Another user's token (same room) cannot write as this connection; nor a demo-less forgery.
        status, data = await post({"token": tokens.mint("room-d", Role.CLINICIAN, "Dr Hansen", sub="hansen"),
                                   "connection_id": cid, "event": "tabClosed"})
        assert (status, data["error"]["code"]) == (404, "not_found")
        status, data = await post({"token": "not-a-jwt", "connection_id": cid, "event": "tabClosed"})
        assert (status, data["error"]["code"]) == (401, "unauthorized")
        status, data = await post({"connection_id": cid, "event": "tabClosed"})
        assert (status, data["error"]["code"]) == (401, "unauthorized")
        status, data = await post({"token": token, "connection_id": cid, "event": "tabClosed", "data": {"x": 1}})
        assert (status, data["error"]["code"]) == (400, "invalid_message") and '"data.x"' in data["error"]["message"]
        status, data = await post({"token": token, "connection_id": cid, "event": "tabClosed",
                                   "data": {"error_message": "x" * 9000}})
        assert (status, data["error"]["code"]) == (413, "message_too_large")
        # A chunked body (no Content-Length) is cut at the limit too.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b" " * 1024

        async with http.post(url, data=chunks()) as response:
            assert (response.status, (await response.json())["error"]["code"]) == (413, "message_too_large")
        # The header works too (what non-browser SDKs send).
        status, _ = await post({"connection_id": cid, "event": "pageHidden"}, {"Authorization": f"Bearer {token}"})
        assert status == 202
        log = await events(http, server, tokens, sid)
    finally:
        await other.close()
    beacons = [(e["kind"], e["component"], e["connection_id"], e["payload"]) for e in log if e["component"] == "client"]
    assert beacons == [("clientEvent", "client", cid, {"event": "tabClosed"}),
                       ("clientEvent", "client", cid, {"event": "pageHidden"})]
