"""The diagnosis of real calls: aiortc clients through a real ``openconsult serve``, then the
summary and diagnosis routes read the way support staff would. Impairments are made in the
clients' own send path (a publisher that drops every tenth RTP packet; an encoder capped at
100 kbps), and the diagnosis must name the right participant, direction and figure."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiortc.codecs.vpx
import pytest
from aiortc import RTCPeerConnection
from aiortc.rtp import is_rtcp

from loadtest.client import RequestFailed, SignallingClient
from media import aiortc_internals
from rooms.model import Role
from signalling.auth import TokenAuthority
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server
from tests.workflow.helpers import Clinic, now_ms

pytestmark = pytest.mark.slow

#: One sample a second, so "within two samples" is two seconds.
CONFIG = "sample_interval_s = 1.0\n"


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path_factory.mktemp("diagnosis"), extra_config=CONFIG)
    yield proc
    proc.stop()


@pytest.fixture
async def clinic(server: ServerProcess) -> AsyncIterator[Clinic]:
    clinic = Clinic.open(server)
    yield clinic
    await clinic.close()


def room() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


def support_token(tokens: TokenAuthority) -> str:
    return tokens.mint("support", Role.SUPPORT, "Support")


async def fetch(server: ServerProcess, tokens: TokenAuthority, session_id: str, what: str) -> dict[str, Any]:
    data: dict[str, Any] = await asyncio.to_thread(
        get_json, f"{server.url}/api/sessions/{session_id}/{what}", support_token(tokens))
    return data


async def diagnosis(server: ServerProcess, tokens: TokenAuthority, session_id: str) -> list[dict[str, Any]]:
    findings: list[dict[str, Any]] = (await fetch(server, tokens, session_id, "diagnosis"))["findings"]
    return findings


async def wait_for_finding(server: ServerProcess, tokens: TokenAuthority, session_id: str,
                           match: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                           message: str = "a finding") -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    async def seen() -> bool:
        found[:] = [f for f in await diagnosis(server, tokens, session_id) if match(f)]
        return bool(found)

    await wait_until(seen, timeout=timeout, interval=0.5, message=message)
    return found[0]


def drop_every_tenth_rtp(pc: RTCPeerConnection) -> None:
    """The publisher's network loses 10 % of its media: every tenth RTP packet of each stream
    (counted per SSRC: one count over audio and video together would alias with their
    interleaving and take 5 % from one and 15 % from the other; RTCP passes)."""
    transport = pc.getSenders()[0].transport
    original: Callable[[bytes], Awaitable[None]] = transport._send_rtp
    counts: dict[bytes, int] = {}

    async def send(data: bytes) -> None:
        if not is_rtcp(data):
            ssrc = data[8:12]
            counts[ssrc] = counts.get(ssrc, 0) + 1
            if counts[ssrc] % 10 == 0:
                return
        await original(data)

    transport._send_rtp = send  # type: ignore[method-assign]


async def two_party_call(server: ServerProcess, tokens: TokenAuthority, *,
                         impair: Callable[[Participant], None] | None = None) -> tuple[Participant, Participant, str]:
    doc, pat = Participant(server.ws_url, "Dr Who"), Participant(server.ws_url, "Anna")
    r = room()
    joined = await doc.join(tokens, r, Role.CLINICIAN)
    await pat.join(tokens, r, Role.PATIENT)
    stream_doc = await doc.publish()
    if impair is not None:
        impair(doc)
    stream_pat = await pat.publish()
    await pat.client.wait_event("streamCreated", stream__stream_id=stream_doc)
    await doc.client.wait_event("streamCreated", stream__stream_id=stream_pat)
    await pat.subscribe(stream_doc)
    await doc.subscribe(stream_pat)
    return doc, pat, str(joined["session_id"])


async def samples_of(server: ServerProcess, tokens: TokenAuthority, session_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = (await fetch(server, tokens, session_id, "quality"))["samples"]
    return data


async def test_a_clean_call_has_no_problem_and_a_summary(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    doc, pat, sid = await two_party_call(server, tokens)
    try:
        sub = pat.subscribers[doc.stream_id]
        await wait_until(lambda: len(sub.received.frames) > 5, timeout=60, message="video at Anna")
        # Four samples per leg with packets.
        await wait_until(lambda: _count(samples_of(server, tokens, sid), lambda s: s["direction"] == "out"
                                        and s["packets"] > 0, 8), timeout=30, interval=0.5,
                         message="four downstream samples per subscriber")
    finally:
        await pat.client.request("leave")
        await doc.client.request("leave")
        await pat.close()
        await doc.close()
    findings = await diagnosis(server, tokens, sid)
    assert [f for f in findings if f["severity"] == "problem"] == [], findings
    assert sorted(f["type"] for f in findings) == ["hung_up", "hung_up"]
    summary = await fetch(server, tokens, sid, "summary")
    assert summary["meeting"]["connections"] == 2 and summary["meeting"]["streams"] == 2
    assert summary["meeting"]["subscribers"] == 2
    by_name = {p["name"]: p for p in summary["participants"]}
    assert set(by_name) == {"Dr Who", "Anna"}
    for p in by_name.values():
        assert p["reason"] == "clientDisconnected"
        assert p["scores"]["audio_mos"] > 4.0
        assert p["scores"]["time_to_first_media_ms"] >= 0
        levels = [q["level"] for q in p["quality"]]
        assert "lost" not in levels[2:] and {"excellent", "good"} & set(levels), levels


async def _count(samples: Awaitable[list[dict[str, Any]]], keep: Callable[[dict[str, Any]], bool], n: int) -> bool:
    return sum(1 for s in await samples if keep(s)) >= n


async def test_a_publisher_dropping_ten_percent_is_named_within_two_samples(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)

    def impair(p: Participant) -> None:
        assert p.publisher is not None
        drop_every_tenth_rtp(p.publisher)

    doc, pat, sid = await two_party_call(server, tokens, impair=impair)
    try:
        # The timeline: the publisher's upstream audio shows ~10 % loss.
        def lossy(s: dict[str, Any]) -> bool:
            return (s["direction"] == "in" and s["stream_id"] == doc.stream_id and s["kind"] == "audio"
                    and 7.0 <= s["loss_pct"] <= 13.0)

        await wait_until(lambda: _count(samples_of(server, tokens, sid), lossy, 1), timeout=30, interval=0.5,
                         message="an upstream audio sample with ~10% loss")
        first_lossy = time.monotonic()
        finding = await wait_for_finding(server, tokens, sid, lambda f: f["type"] == "high_loss", timeout=30,
                                         message="the high-loss finding")
        # Two samples of one second each, plus the reading: well within five seconds.
        assert time.monotonic() - first_lossy < 5.0
        assert finding["participant"]["name"] == "Dr Who" and finding["direction"] == "send"
        assert "Dr Who's uplink (what they send) lost" in finding["cause"]
        figure = float(finding["cause"].split(" lost ")[1].split("%")[0])
        # The finding's figure is over all the publisher's tracks: audio loses its 10 %, video
        # less (the server's NACKs get some of it back), so over the 5 % threshold and at most
        # what was dropped.
        assert 5.0 < figure <= 13.0, finding["cause"]
        # The subscriber's downlink is not blamed for what the publisher lost.
        findings = await diagnosis(server, tokens, sid)
        assert not [f for f in findings if f["type"] == "high_loss" and f["direction"] == "recv"], findings
    finally:
        await pat.close()
        await doc.close()


@pytest.fixture
def capped_vp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """The publisher's encoder may not go over 100 kbps (a capped uplink, as the encoder sees it)."""
    for name in ("DEFAULT_BITRATE", "MIN_BITRATE", "MAX_BITRATE"):
        monkeypatch.setattr(aiortc.codecs.vpx, name, 100_000)


@pytest.mark.usefixtures("capped_vp8")
async def test_a_bitrate_cap_of_100_kbps_is_a_low_bitrate_finding(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    doc, pat, sid = await two_party_call(server, tokens)
    try:
        finding = await wait_for_finding(server, tokens, sid,
                                         lambda f: f["type"] == "low_bitrate" and f["direction"] == "send",
                                         timeout=40, message="the low-bitrate finding")
        assert finding["participant"]["name"] == "Dr Who" or finding["participant"]["name"] == "Anna"
        kbps = float(finding["cause"].split(" at only ")[1].split(" kbps")[0])
        assert 40 <= kbps < 150, finding["cause"]
        assert "uplink is too slow" in finding["cause"]
        samples = [s for s in await samples_of(server, tokens, sid)
                   if s["direction"] == "in" and s["kind"] == "video" and s["packets"] > 0]
        assert samples and max(s["bitrate_kbps"] for s in samples[2:]) < 150
    finally:
        await pat.close()
        await doc.close()


async def test_alone_in_the_call_is_never_joined_and_hung_up(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    doc = Participant(server.ws_url, "Dr Who")
    joined = await doc.join(tokens, room(), Role.CLINICIAN)
    await doc.client.request("leave")
    await doc.close()
    findings = await diagnosis(server, tokens, joined["session_id"])
    assert [(f["type"], f["severity"]) for f in findings] == [("never_joined", "problem"), ("hung_up", "info")]
    assert findings[0]["cause"] == "Only Dr Who (clinician) joined; nobody else ever joined the call."


async def test_one_side_never_published_lost_the_network_and_reconnected(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    doc, pat = Participant(server.ws_url, "Dr Who"), Participant(server.ws_url, "Anna")
    r = room()
    try:
        joined = await doc.join(tokens, r, Role.CLINICIAN)
        await pat.join(tokens, r, Role.PATIENT)
        stream = await doc.publish()
        await pat.client.wait_event("streamCreated", stream__stream_id=stream)
        sub = await pat.subscribe(stream)
        await wait_until(lambda: bool(sub.received.frames), timeout=60, message="video at Anna")
        # Anna's network goes away: the TCP connection dies without a close frame.
        assert pat.client.ws is not None
        transport = pat.client.ws._response.connection.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.abort()
        await doc.client.wait_event("connectionDestroyed", connection__name="Anna")
        # Anna comes back on a new connection, then both hang up.
        again = Participant(server.ws_url, "Anna")
        await again.join(tokens, r, Role.PATIENT)
        await again.client.request("leave")
        await again.close()
        await doc.client.request("leave")
    finally:
        await pat.close()
        await doc.close()
    findings = await diagnosis(server, tokens, joined["session_id"])
    by_type = {f["type"]: f for f in findings}
    assert by_type["never_published"]["participant"]["name"] == "Anna"
    assert by_type["never_published"]["cause"] == "Anna joined but never sent audio or video."
    assert by_type["network_lost"]["participant"]["name"] == "Anna"
    assert by_type["network_lost"]["severity"] == "problem"
    assert by_type["reconnected"]["cause"] == "Anna reconnected 1 time(s) during the call."
    assert sorted(f["participant"]["name"] for f in findings if f["type"] == "hung_up") == ["Anna", "Dr Who"]


async def test_an_expired_link_is_refused_in_the_consultations_own_session(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    sid = f"s_{uuid.uuid4().hex[:12]}"
    now = int(time.time())
    expired = tokens.mint(sid, Role.PATIENT, "Anna", not_before=now - 7200, expires=now - 3600, consultation=sid)
    patient = Participant(server.ws_url, "Anna")
    await patient.client.connect()
    try:
        with pytest.raises(RequestFailed) as refused:
            await patient.client.request("join", token=expired)
        assert refused.value.code == "token_expired"
    finally:
        await patient.close()
    finding = (await diagnosis(server, tokens, sid))[0]
    assert finding["type"] == "link_refused" and finding["severity"] == "problem"
    expired_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600))
    assert finding["cause"] == f"The link was refused because it had expired (it closed at {expired_at})."
    # Nothing was filed under the room's pseudo session any more.
    assert (await fetch(server, tokens, f"room:{sid}", "events"))["events"] == []


async def test_too_early_and_phone_fallback_in_the_consultations_session(clinic: Clinic) -> None:
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")
    doctor = clinic.staff(Role.CLINICIAN, "dr-who", "cardio")
    wr = f"wr-{uuid.uuid4().hex[:6]}"
    await clinic.waiting_room(admin, wr, "Cardiology", "cardio")
    tomorrow = now_ms() + 24 * 3600 * 1000
    booking = await clinic.book(admin, department="cardio", room_id=wr, patient="p-early", clinician="dr-who",
                                appointment_ms=tomorrow)
    sid = booking["consultation"]["session_id"]
    # The link's token only opens shortly before the appointment: the join is refused.
    patient = SignallingClient(clinic.server.ws_url)
    await patient.connect()
    desk = await clinic.connect(doctor)
    try:
        with pytest.raises(RequestFailed) as refused:
            await patient.join(booking["patient_token"])
        assert refused.value.code == "token_not_yet_valid"
        await desk.request("consultation.phone_fallback", session_id=sid)
    finally:
        await patient.close()
        await desk.close()
    findings = await diagnosis(clinic.server, clinic.tokens, sid)
    by_type = {f["type"]: f for f in findings}
    assert "too early (it opens at " in by_type["link_refused"]["cause"]
    assert by_type["phone_fallback"]["cause"] == "The consultation ended as a phone consultation without a video call."
    assert by_type["phone_fallback"]["severity"] == "info"


async def test_transferred_then_abandoned_in_the_waiting_room(clinic: Clinic) -> None:
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")
    doctor = clinic.staff(Role.CLINICIAN, "dr-who", "cardio")
    first, second = f"wr-{uuid.uuid4().hex[:6]}", f"wr-{uuid.uuid4().hex[:6]}"
    await clinic.waiting_room(admin, first, "Cardiology A", "cardio")
    await clinic.waiting_room(admin, second, "Cardiology B", "cardio")
    booking = await clinic.book(admin, department="cardio", room_id=first, patient="p-gone", clinician="dr-who",
                                appointment_ms=now_ms())
    sid = booking["consultation"]["session_id"]
    patient = await clinic.connect(booking["patient_token"])
    desk = await clinic.connect(doctor)
    try:
        await patient.request("waiting_room.enter")
        await desk.request("consultation.transfer", session_id=sid, to_room_id=second)
        await patient.request("waiting_room.leave")
    finally:
        await patient.close()
        await desk.close()
    by_type = {f["type"]: f for f in await diagnosis(clinic.server, clinic.tokens, sid)}
    assert by_type["transferred"]["cause"] == f"The patient was transferred from waiting room {first} to {second}."
    assert by_type["abandoned"]["severity"] == "problem"
    # It took under a minute: said in seconds.
    assert re.fullmatch(r"The patient left the waiting room after \d+ seconds? without being admitted\.",
                        by_type["abandoned"]["cause"]), by_type["abandoned"]["cause"]
    assert "never_opened_link" not in by_type
