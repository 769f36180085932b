"""Diagnosis and summary over hand-built entry lists: one test per finding type, a clean call
with no problem, and the summary's meeting stats, scores and error log."""

from __future__ import annotations

from typing import Any

import pytest

from metrics.diagnosis import FindingType, diagnose
from metrics.events import EventKind
from metrics.summary import summary

T0 = 1_790_000_000_000
SID = "s_test"


class Log:
    """Builds a session's entries the way EventLog.events returns them."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.t = T0

    def add(self, kind: str, text: str = "", cid: str | None = None, stream: str | None = None, /, *,
            dt: int = 1_000, component: str = "server", **payload: Any) -> int:
        self.t += dt
        seq = len(self.entries) + 1
        self.entries.append({"seq": seq, "time_ms": self.t, "session_id": SID, "connection_id": cid,
                             "stream_id": stream, "kind": str(kind), "component": component, "text": text,
                             "payload": payload})
        return seq

    def join(self, cid: str, name: str, role: str, user: str | None = None) -> None:
        self.add(EventKind.CONNECT_ATTEMPT, f"Connect attempt: {name} ({role})", cid, user_agent="UA", ip="10.0.0.1")
        self.add(EventKind.SERVER_DETECTED_CONNECT, "", cid, role=role, name=name, user=user or name,
                 user_agent="UA", ip="10.0.0.1")
        self.add(EventKind.SUCCESSFULLY_JOINED, "", cid)

    def publish(self, cid: str, stream: str, video: bool = True) -> None:
        self.add(EventKind.PUBLISH_ATTEMPT, "", cid, stream)
        self.add(EventKind.PUBLISH_SUCCESS, "", cid, stream)
        self.add(EventKind.STREAM_CREATED, "", cid, stream, name=cid, has_audio=True, has_video=video)

    def subscribe(self, cid: str, stream: str, sub: str) -> None:
        self.add(EventKind.SUBSCRIBE_ATTEMPT, "", cid, stream, subscription_id=sub)
        self.add(EventKind.SUBSCRIBE_SUCCESS, "", cid, stream, subscription_id=sub)

    def sample(self, cid: str, stream: str, peer: str, direction: str, kind: str = "video", dt: int = 0,
               **figures: Any) -> int:
        base: dict[str, Any] = {"peer_id": peer, "stream_id": stream, "direction": direction, "kind": kind,
                                "time_ms": self.t + dt, "interval_s": 5.0, "bitrate_kbps": 800.0 if kind == "video"
                                else 32.0, "packets": 250, "packets_lost": 0, "loss_pct": 0.0, "jitter_ms": 3.0,
                                "rtt_ms": 40.0, "frame_rate": 30.0 if kind == "video" else None,
                                "width": 640 if kind == "video" else None, "height": 480 if kind == "video" else None,
                                "nacks": 0, "plis": 0}
        base.update(figures)
        base["time_ms"] = self.t + dt
        return self.add(EventKind.QUALITY_SAMPLE, "", cid, stream, dt=dt, **base)

    def client(self, cid: str, event: str, **payload: Any) -> int:
        return self.add(EventKind.CLIENT_EVENT, event, cid, component="client", event=event, **payload)

    def leave(self, cid: str, reason: str = "clientDisconnected") -> int:
        return self.add(EventKind.DISCONNECT, "", cid, reason=reason)


def call(samples: int = 6, **figures: Any) -> Log:
    """Two participants, each publishing audio+video and receiving the other's; ``figures``
    override the doctor's uplink video samples."""
    log = Log()
    log.join("c_doc", "Dr Who", "clinician")
    log.join("c_pat", "Anna", "patient")
    log.publish("c_doc", "st_doc")
    log.publish("c_pat", "st_pat")
    log.subscribe("c_pat", "st_doc", "sub_pat")
    log.subscribe("c_doc", "st_pat", "sub_doc")
    for _ in range(samples):
        log.sample("c_doc", "st_doc", "st_doc", "in", dt=5_000, **figures)
        log.sample("c_doc", "st_doc", "st_doc", "in", "audio", dt=0)
        log.sample("c_pat", "st_doc", "sub_pat", "out", dt=0,
                   **{k: v for k, v in figures.items() if k in ("bitrate_kbps",)})
        log.sample("c_pat", "st_pat", "st_pat", "in", dt=0)
        log.sample("c_doc", "st_pat", "sub_doc", "out", dt=0)
    return log


def finish(log: Log) -> Log:
    log.leave("c_pat")
    log.leave("c_doc")
    return log


def found(log: Log) -> list[dict[str, Any]]:
    result = diagnose(SID, log.entries)
    assert result["session_id"] == SID
    findings: list[dict[str, Any]] = result["findings"]
    return findings


def types(findings: list[dict[str, Any]], severity: str | None = None) -> list[str]:
    return [f["type"] for f in findings if severity is None or f["severity"] == severity]


def one(findings: list[dict[str, Any]], kind: FindingType) -> dict[str, Any]:
    matching = [f for f in findings if f["type"] == kind]
    assert len(matching) == 1, findings
    return matching[0]


def test_clean_call_has_no_problem() -> None:
    findings = found(finish(call()))
    assert types(findings, "problem") == []
    assert types(findings) == ["hung_up", "hung_up"]


def test_findings_list_problems_first() -> None:
    log = call(loss_pct=12.0)
    log.leave("c_pat")
    log.leave("c_doc", "networkDisconnected")
    severities = [f["severity"] for f in found(log)]
    assert severities == sorted(severities, key=["problem", "warning", "info"].index)
    assert severities[0] == "problem" and severities[-1] == "info"


def test_never_opened_link() -> None:
    log = Log()
    seq = log.add(EventKind.CONSULTATION, "Join link sent to patient p1 with token abc… to start the consultation.",
                  patient="p1")
    log.join("c_doc", "Dr Who", "clinician")
    f = one(found(log), FindingType.NEVER_OPENED_LINK)
    assert f["severity"] == "problem" and f["evidence"]["entries"] == [seq]
    assert f["cause"] == "The patient never opened the consultation link."


def test_never_joined_after_admission_and_alone_in_a_call() -> None:
    log = Log()
    log.add(EventKind.QUEUE, "Patient was admitted from Cardio by clinician d1 after waiting 3.00 seconds.",
            room_id="r1", waited_ms=3000)
    log.join("c_doc", "Dr Who", "clinician")
    f = one(found(log), FindingType.NEVER_JOINED)
    assert "patient was admitted but never joined" in f["cause"]
    alone = Log()
    alone.join("c_doc", "Dr Who", "clinician")
    f = one(found(alone), FindingType.NEVER_JOINED)
    assert f["participant"] == {"connection_id": "c_doc", "name": "Dr Who", "role": "clinician"}
    assert "nobody else ever joined" in f["cause"]


@pytest.mark.parametrize(("code", "reason", "words"), [
    ("token_expired", "token expired at 2026-11-29T10:00:00Z, it is now 2026-11-29T12:00:00Z: too late",
     "had expired (it closed at 2026-11-29T10:00:00Z)"),
    ("too_late", "the link closed at 2026-11-29 10:00:00 UTC", "had expired (it closed at 2026-11-29 10:00:00 UTC)"),
    ("token_not_yet_valid", "token is valid from 2026-11-30T09:00:00Z, it is now 2026-11-29T12:00:00Z: too early",
     "too early (it opens at 2026-11-30T09:00:00Z)"),
    ("too_early", "the link opens at 2026-11-30 09:00:00 UTC", "too early (it opens at 2026-11-30 09:00:00 UTC)"),
    ("room_mismatch", 'token is for room "s_a", not "s_b"', "for another consultation"),
    ("unauthorized", "token signature is invalid", "not valid (damaged or forged)"),
])
def test_link_refused(code: str, reason: str, words: str) -> None:
    log = Log()
    seq = log.add(EventKind.TOKEN_REJECTED, "Failed to get valid token", token="eyJh…", reason=reason, code=code)
    f = one(found(log), FindingType.LINK_REFUSED)
    assert words in f["cause"] and f["evidence"]["entries"] == [seq] and f["severity"] == "problem"


def test_camera_denied_and_microphone_missing() -> None:
    log = call()
    log.client("c_pat", "deviceCheck", camera="denied", microphone="not_found", error_name="NotAllowedError")
    findings = found(log)
    denied = one(findings, FindingType.DEVICE_DENIED)
    assert denied["cause"] == "Anna's browser was refused access to the camera."
    assert denied["participant"]["name"] == "Anna" and denied["direction"] == "send"
    missing = one(findings, FindingType.DEVICE_MISSING)
    assert missing["cause"] == "Anna has no microphone the browser can find."


def test_get_user_media_failed_denied() -> None:
    log = call()
    log.client("c_pat", "getUserMediaFailed", error_name="NotAllowedError", error_message="Permission denied",
               constraints={"video": True})
    assert one(found(log), FindingType.DEVICE_DENIED)["participant"]["connection_id"] == "c_pat"


def test_joined_audio_only() -> None:
    log = Log()
    log.join("c_doc", "Dr Who", "clinician")
    log.join("c_pat", "Anna", "patient")
    log.publish("c_doc", "st_doc")
    log.publish("c_pat", "st_pat", video=False)
    f = one(found(log), FindingType.AUDIO_ONLY)
    assert f["participant"]["name"] == "Anna" and f["severity"] == "warning"


@pytest.mark.parametrize(("local", "servers", "words"), [
    (["host", "srflx"], 0, "no relay candidate: TURN is not configured"),
    (["host", "srflx"], 2, "TURN server is not configured or is blocked"),
    (["host", "relay"], 2, "UDP looks blocked"),
    ([], 2, "no network address at all"),
])
def test_ice_failed_names_candidate_types(local: list[str], servers: int, words: str) -> None:
    log = call()
    log.client("c_pat", "iceFailed", peer_id="st_pat", local_candidate_types=local,
               remote_candidate_types=["host"], ice_servers=servers)
    f = one(found(log), FindingType.ICE_FAILED)
    assert words in f["cause"] and "server candidates: host" in f["cause"]


def test_one_side_never_published() -> None:
    log = Log()
    log.join("c_doc", "Dr Who", "clinician")
    log.join("c_pat", "Anna", "patient")
    log.publish("c_doc", "st_doc")
    f = one(found(log), FindingType.NEVER_PUBLISHED)
    assert f["cause"] == "Anna joined but never sent audio or video." and f["direction"] == "send"


def test_one_way_media() -> None:
    log = Log()
    log.join("c_doc", "Dr Who", "clinician")
    log.join("c_pat", "Anna", "patient")
    log.publish("c_doc", "st_doc")
    log.subscribe("c_pat", "st_doc", "sub_pat")
    for _ in range(3):
        log.sample("c_doc", "st_doc", "st_doc", "in", dt=5_000)
        log.sample("c_pat", "st_doc", "sub_pat", "out", packets=0, bitrate_kbps=0.0)
    f = one(found(log), FindingType.ONE_WAY_MEDIA)
    assert f["cause"] == "Anna never received Dr Who's audio and video although the server received it."
    assert f["direction"] == "recv"


def test_low_bitrate_on_the_senders_uplink() -> None:
    f = one(found(call(bitrate_kbps=90.0)), FindingType.LOW_BITRATE)
    assert f["participant"]["name"] == "Dr Who" and f["direction"] == "send"
    assert "only 90 kbps" in f["cause"] and "uplink" in f["cause"]


def test_low_bitrate_on_the_receivers_downlink() -> None:
    log = call()
    for _ in range(6):
        log.sample("c_pat", "st_doc", "sub_pat", "out", dt=5_000, bitrate_kbps=80.0)
    f = one(found(log), FindingType.LOW_BITRATE)
    assert f["participant"]["name"] == "Anna" and f["direction"] == "recv" and "downlink" in f["cause"]


@pytest.mark.parametrize(("field", "value", "kind", "words"), [
    ("loss_pct", 10.0, FindingType.HIGH_LOSS, "lost 10.0% of packets"),
    ("jitter_ms", 80.0, FindingType.HIGH_JITTER, "80 ms of jitter"),
    ("rtt_ms", 450.0, FindingType.HIGH_RTT, "round trip of 450 ms"),
])
def test_impairment_on_the_uplink_is_not_blamed_on_the_downlink(field: str, value: float, kind: FindingType,
                                                               words: str) -> None:
    over: dict[str, Any] = {field: value}
    log = call(**over)
    # The subscriber sees the publisher's loss and jitter too (the SFU forwards the gaps).
    if field != "rtt_ms":
        downstream: dict[str, Any] = {field: value + 1}
        for _ in range(3):
            log.sample("c_pat", "st_doc", "sub_pat", "out", **downstream)
    f = one(found(log), kind)
    assert f["participant"]["name"] == "Dr Who" and f["direction"] == "send"
    assert words in f["cause"] and f["evidence"]["samples"]


def test_loss_on_the_downlink_only() -> None:
    log = call()
    for _ in range(3):
        log.sample("c_pat", "st_doc", "sub_pat", "out", dt=5_000, loss_pct=15.0)
    f = one(found(log), FindingType.HIGH_LOSS)
    assert f["participant"]["name"] == "Anna" and f["direction"] == "recv"


def test_frozen_video_from_client_stats_and_server_flow() -> None:
    log = call()
    for count, total in ((0, 0.0), (2, 3.0), (4, 6.5)):
        log.add(EventKind.CLIENT_STATS, "", "c_pat", "st_doc", component="client", stream_id="st_doc", kind="video",
                direction="recv", freezeCount=count, totalFreezesDuration=total)
    log.add(EventKind.QUALITY_ALERT, "No video", "c_doc", "st_doc", metric="media_flow", media="video",
            flowing=False, idle_s=5.0)
    frozen = [f for f in found(log) if f["type"] == FindingType.FROZEN_VIDEO]
    assert [f["participant"]["name"] for f in frozen] == ["Anna", "Dr Who"]
    assert frozen[0]["cause"] == "Dr Who's video froze 4 time(s) on Anna's screen (6.5 s in all)."
    assert frozen[0]["severity"] == "problem"


@pytest.mark.parametrize(("reason", "kind", "severity"), [
    ("clientDisconnected", FindingType.HUNG_UP, "info"),
    ("networkDisconnected", FindingType.NETWORK_LOST, "problem"),
    ("serverShutdown", FindingType.SERVER_SHUTDOWN, "problem"),
])
def test_how_a_participant_left(reason: str, kind: FindingType, severity: str) -> None:
    log = call()
    log.leave("c_pat", reason)
    f = one(found(log), kind)
    assert f["severity"] == severity and f["participant"]["name"] == "Anna"


def _node_failed(log: Log, *, door_logged: bool) -> int:
    """The node holding ``call()`` stops 4 s after the last entry: the door of the relayed doctor
    logs their disconnect (``door_logged``), the new owner logs the failure and the patient."""
    lost_at = log.t + 500
    if door_logged:
        log.add(EventKind.DISCONNECT, "", "c_doc", dt=7_000, reason="nodeFailure", detail="node node_a stopped",
                node="node_a")
    log.add(EventKind.NODE_FAILURE, "", dt=1_000, node="node_a", last_seen_ms=lost_at, by_node="node_b",
            connections=["c_pat"] if door_logged else ["c_pat", "c_doc"])
    log.add(EventKind.DISCONNECT, "", "c_pat", dt=0, reason="nodeFailure", node="node_a")
    if not door_logged:
        log.add(EventKind.DISCONNECT, "", "c_doc", dt=0, reason="nodeFailure", node="node_a")
    return lost_at


@pytest.mark.parametrize("door_logged", [True, False])
def test_a_node_failure_both_rejoined(door_logged: bool) -> None:
    log = call()
    lost_at = _node_failed(log, door_logged=door_logged)
    log.join("c_pat2", "Anna", "patient")
    log.join("c_doc2", "Dr Who", "clinician")
    findings = found(finish(log))
    f = one(findings, FindingType.NODE_FAILURE)
    assert f["severity"] == "warning", f
    back = next(e["time_ms"] for e in log.entries if e["connection_id"] == "c_doc2"
                and e["kind"] == EventKind.CONNECT_ATTEMPT)
    rejoined_s = round((back - lost_at) / 1000)
    assert f["cause"] == ("The server node holding this call (node_a) stopped; both participants rejoined through "
                          f"another node after {rejoined_s} seconds."), f
    assert "node_a" in f["next_step"] and f["from_ms"] == lost_at
    # Not also "lost the network" or "the server shut down".
    assert {FindingType.NETWORK_LOST, FindingType.SERVER_SHUTDOWN} & set(types(findings)) == set()
    assert FindingType.RECONNECTED not in types(findings)


def test_a_node_failure_someone_did_not_rejoin() -> None:
    log = call()
    _node_failed(log, door_logged=False)
    log.join("c_doc2", "Dr Who", "clinician")
    f = one(found(log), FindingType.NODE_FAILURE)
    assert f["severity"] == "problem"
    assert f["cause"].endswith("Dr Who rejoined through another node after 2 seconds; Anna did not rejoin."), f
    assert f["next_step"].startswith("Call Anna back")


@pytest.mark.parametrize(("attempted", "severity", "words"), [
    (True, "warning", "after a video call was tried"), (False, "info", "without a video call")])
def test_phone_fallback(attempted: bool, severity: str, words: str) -> None:
    log = Log()
    log.add(EventKind.VIDEO_SESSION, "Video consultation ended as phone consultation.", video_session_id=None,
            video_attempted=attempted)
    f = one(found(log), FindingType.PHONE_FALLBACK)
    assert f["severity"] == severity and words in f["cause"]


def test_abandoned_in_the_waiting_room() -> None:
    log = Log()
    log.add(EventKind.QUEUE, "Patient left the queue", room_id="r1", waited_ms=7 * 60_000, left_ms=T0,
            outcome="abandoned")
    f = one(found(log), FindingType.ABANDONED)
    assert f["cause"] == "The patient left the waiting room after 7 minutes without being admitted."


def test_transferred() -> None:
    log = Log()
    log.add(EventKind.QUEUE, "Patient was transferred", from_room="r1", to_room="r2", segment=2, by="n1")
    assert "from waiting room r1 to r2" in one(found(log), FindingType.TRANSFERRED)["cause"]


def test_reconnected_from_client_events_and_from_rejoins() -> None:
    log = call()
    log.client("c_pat", "reconnecting", attempt=1)
    log.client("c_pat", "reconnected", attempt=1)
    log.client("c_pat", "reconnected", attempt=1)
    f = one(found(log), FindingType.RECONNECTED)
    assert f["cause"] == "Anna reconnected 2 time(s) during the call." and f["severity"] == "warning"
    rejoin = call()
    rejoin.leave("c_pat", "networkDisconnected")
    rejoin.join("c_pat2", "Anna", "patient")
    assert "reconnected 1 time(s)" in one(found(rejoin), FindingType.RECONNECTED)["cause"]


def test_hostile_payloads_do_not_break_the_diagnosis() -> None:
    log = call()
    log.client("c_pat", "iceFailed", local_candidate_types="relay", remote_candidate_types=[1, None])
    log.client("c_pat", "deviceCheck", camera=["x"], microphone=None)
    log.add(EventKind.CLIENT_STATS, "", "c_pat", component="client", freezeCount="many", direction="recv",
            kind="video")
    log.entries.append({"seq": 999, "time_ms": None, "kind": EventKind.DISCONNECT, "payload": "not a dict"})
    assert isinstance(found(log), list)
    assert isinstance(summary(SID, log.entries), dict)


def test_summary_meeting_stats_participants_scores_and_errors() -> None:
    log = call()
    log.add(EventKind.PUBLISH_ATTEMPT, "", "c_pat", "st_x")
    log.add(EventKind.PUBLISH_FAILURE, "Publish failed", "c_pat", "st_x", error="boom")
    log.add(EventKind.TOKEN_REJECTED, "Failed", reason="token expired", code="token_expired")
    finish(log)
    s = summary(SID, log.entries)
    meeting = s["meeting"]
    assert meeting["users"] == 2 and meeting["connections"] == 2 and meeting["streams"] == 2
    assert meeting["subscribers"] == 2 and meeting["started_ms"] == T0 + 1_000
    assert meeting["streamed_minutes"] > 0
    doc = next(p for p in s["participants"] if p["name"] == "Dr Who")
    assert doc["role"] == "clinician" and doc["reason"] == "clientDisconnected" and doc["ip"] == "10.0.0.1"
    assert set(doc) >= {"browser", "os", "device", "sdk_version", "user_agent", "joined_ms", "left_ms"}
    assert doc["scores"]["audio_mos"] > 4.0
    assert doc["scores"]["video_level"] == 3  # 640x480 at 30 fps, 800 kbps
    assert doc["scores"]["time_to_first_media_ms"] >= 0
    assert doc["quality"] and {q["level"] for q in doc["quality"]} == {"excellent"}
    errors = s["errors"]
    assert errors["publish"] == {"attempts": 3, "failures": 1}
    assert errors["connect"] == {"attempts": 3, "failures": 1}
    assert errors["subscribe"] == {"attempts": 2, "failures": 0}
    assert [e["kind"] for e in errors["log"]] == ["publishFailure", "tokenRejected"]


def test_quality_over_time_turns_poor_with_loss() -> None:
    s = summary(SID, call(loss_pct=12.0).entries)
    doc = next(p for p in s["participants"] if p["name"] == "Dr Who")
    assert "poor" in {q["level"] for q in doc["quality"]}
