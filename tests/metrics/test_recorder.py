"""The recorder against a real event log: what each typed method writes and counts."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from media.events import (
    DatagramDropReason,
    DatagramsDropped,
    KeyframeRequested,
    MediaFlowChanged,
    PeerClosedUnconnected,
    PeerStateChanged,
    PeerTimedOut,
    QualitySample,
)
from metrics.eventlog import EventLog
from metrics.recorder import PeerOwner, Recorder


def value(name: str, **labels: str) -> float:
    found = REGISTRY.get_sample_value(name, labels)
    return found or 0.0


def test_refused_tokens_go_to_the_consultations_session_or_the_room(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.db")
    recorder = Recorder(log)
    before = value("openconsult_tokens_rejected_total", code="token_expired")
    try:
        recorder.token_rejected("eyJhbGciOi.x.y", "token expired at 2026-11-29T10:00:00Z", "token_expired", "s_abc",
                                session_id="s_abc")
        recorder.token_rejected("eyJhbGciOi.x.y", "token expired", "token_expired", "clinic-7")
        recorder.link_refused("s_abc", "too_early", "the link opens at 2026-11-30 09:00:00 UTC", connection_id="c_1")
        assert log.flush_sync(10)
        own = log.events_sync("s_abc")
        assert [(e["kind"], e["payload"]["code"]) for e in own] == [("tokenRejected", "token_expired"),
                                                                     ("tokenRejected", "too_early")]
        assert own[0]["text"] == "Failed to get valid token for token: eyJh…(truncated): " \
                                 "token expired at 2026-11-29T10:00:00Z"
        assert own[1]["connection_id"] == "c_1"
        assert [e["kind"] for e in log.events_sync("room:clinic-7")] == ["tokenRejected"]
        assert log.events_sync("room:s_abc") == []
        assert value("openconsult_tokens_rejected_total", code="token_expired") == before + 2
    finally:
        log.close()


def test_media_events_become_entries_samples_and_counts(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.db")
    recorder = Recorder(log)
    owner = PeerOwner("s_1", "c_1", "st_1", is_publish=True)
    dropped = value("openconsult_media_datagrams_dropped_total", reason="empty")
    forwarded = value("openconsult_rtp_packets_forwarded_total", kind="video")
    keyframes = value("openconsult_keyframes_requested_total")
    try:
        recorder.media_event(DatagramsDropped({DatagramDropReason.EMPTY: 3}), None)
        recorder.media_event(PeerStateChanged("st_1", "st_1", "ice", "completed",
                                              {"local_type": "host", "remote_type": "srflx", "protocol": "udp"}), owner)
        recorder.media_event(KeyframeRequested("st_1", "new subscriber", "sub_1"), owner)
        recorder.media_event(KeyframeRequested("st_9", "new subscriber"), None)  # nobody's: not counted
        recorder.media_event(MediaFlowChanged("st_1", "video", False, 5.0), owner, "Anna")
        sample = QualitySample(peer_id="sub_1", stream_id="st_1", direction="out", kind="video", time_ms=1_000,
                               interval_s=2.0, bitrate_kbps=800.0, packets=140, packets_lost=1, loss_pct=0.5,
                               jitter_ms=2.0, rtt_ms=30.0, frame_rate=30.0, width=640, height=480, nacks=0, plis=0,
                               octets=200_000)
        recorder.media_event(sample, PeerOwner("s_1", "c_2", "st_1", is_publish=False))
        assert log.flush_sync(10)
        entries = log.events_sync("s_1")
        assert [(e["kind"], e["text"]) for e in entries] == [
            ("qualitySample", "video out 800.0 kbps"),
            ("iceStateChanged", "Publisher ice state: completed via host/srflx udp"),
            ("keyframeRequested", "Keyframe requested (new subscriber)"),
            ("qualityAlert", "No video received from Anna for 5 seconds"),
        ]
        assert entries[0]["connection_id"] == "c_2" and entries[0]["payload"]["packets_lost"] == 1
        assert value("openconsult_media_datagrams_dropped_total", reason="empty") == dropped + 3
        assert value("openconsult_rtp_packets_forwarded_total", kind="video") == forwarded + 140
        assert value("openconsult_keyframes_requested_total") == keyframes + 1
    finally:
        log.close()


SERVER = ({"type": "host", "protocol": "udp", "address": "127.0.0.1:40000"},)
CLIENT = tuple({"type": t, "protocol": "udp", "address": f"192.0.2.2:{5000 + i}"}
               for i, t in enumerate(["host"] * 7 + ["srflx"]))


def test_a_peer_not_up_in_time_is_a_failure_with_both_sides_candidates(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.db")
    recorder = Recorder(log)
    publish, subscription = PeerOwner("s_1", "c_1", "st_1", True), PeerOwner("s_1", "c_2", "st_1", False)
    try:
        # ICE never found a pair: an ICE failure. ICE found one but DTLS never came: a DTLS failure.
        recorder.media_event(PeerTimedOut("st_1", "st_1", 15.0, "checking", SERVER, CLIENT), publish)
        recorder.media_event(PeerTimedOut("sub_1", "st_1", 15.0, "completed", SERVER, ()), subscription)
        recorder.media_event(PeerStateChanged("st_2", "st_2", "ice", "failed", None, SERVER, CLIENT[:1]), publish)
        recorder.media_event(PeerTimedOut("st_9", "st_9", 15.0, "checking", SERVER, CLIENT), None)  # nobody's
        # Closed by its client before it was up (the client gave up on its own deadline).
        recorder.media_event(PeerClosedUnconnected("st_3", "st_3", 15.2, "checking", SERVER, CLIENT[:1]), publish)
        assert log.flush_sync(10)
        entries = log.events_sync("s_1")
        assert [(e["kind"], e["connection_id"], e["text"]) for e in entries] == [
            ("iceStateChanged", "c_1",
             "Publisher ice state: failed (not connected within 15 s: no candidate pair worked). Server offered "
             "host udp 127.0.0.1:40000; client offered host udp 192.0.2.2:5000, host udp 192.0.2.2:5001, host udp "
             "192.0.2.2:5002, host udp 192.0.2.2:5003, host udp 192.0.2.2:5004, host udp 192.0.2.2:5005 and 2 more"),
            ("dtlsStateChanged", "c_2",
             "Subscriber dtls state: failed (not connected within 15 s: ICE found a candidate pair but DTLS never "
             "connected over it). Server offered host udp 127.0.0.1:40000; client offered none"),
            ("iceStateChanged", "c_1",
             "Publisher ice state: failed. Server offered host udp 127.0.0.1:40000; client offered host udp "
             "192.0.2.2:5000"),
            ("iceStateChanged", "c_1",
             "Publisher ice state: closed before connecting (15.2 s after it was set up; ICE checking). Server "
             "offered host udp 127.0.0.1:40000; client offered host udp 192.0.2.2:5000"),
        ]
        closed = entries[3]["payload"]
        assert (closed["state"], closed["reason"], closed["after_s"]) == ("closed", "closed_before_connected", 15.2)
        assert closed["remote_candidates"] == list(CLIENT[:1])
        first = entries[0]["payload"]
        assert (first["state"], first["reason"], first["timeout_s"], first["ice_state"]) == (
            "failed", "timeout", 15.0, "checking")
        assert first["local_candidates"] == list(SERVER) and first["remote_candidates"] == list(CLIENT)
        assert entries[1]["payload"]["layer"] == "dtls" and entries[1]["payload"]["remote_candidates"] == []
    finally:
        log.close()
