"""Roll-ups: the summary and the diagnosis computed from the roll-ups the event log's writer
stores equal those computed from the raw samples of the same log, whatever the batches, restarts,
refused entries or files written before roll-ups existed; the chart points sum up the samples;
retention takes the roll-ups with the samples. On both backends (the fixture ``logs``), but the
SQLite file written before roll-ups existed."""

from __future__ import annotations

import random
import sqlite3
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from metrics import rollup, scores
from metrics.diagnosis import FindingType, diagnose
from metrics.eventlog import EventLog
from metrics.events import Component, EventKind, LogEntry
from metrics.summary import summary
from tests.metrics.conftest import LogFactory
from tests.metrics.test_diagnosis import SID, T0, Log, call, finish


def to_entry(e: dict[str, Any]) -> LogEntry:
    return LogEntry(time_ms=e["time_ms"], session_id=e["session_id"], connection_id=e["connection_id"],
                    stream_id=e["stream_id"], kind=e["kind"], component=Component(e["component"]), text=e["text"],
                    payload=e["payload"])


def store(logs: LogFactory, log: Log, *, batch_max: int = 7, restart_every: int | None = None,
          before_write: Callable[[Any], object] | None = None) -> None:
    """Write ``log`` through the event log in small batches (buckets merge across batches),
    closing and reopening the store every ``restart_every`` entries (state reloads from it)."""
    entries = [to_entry(e) for e in log.entries]
    chunk = restart_every or len(entries) or 1
    for start in range(0, len(entries), chunk):
        eventlog = logs.open(batch_max=batch_max, before_write=before_write)
        for entry in entries[start:start + chunk]:
            eventlog.append(entry)
        assert eventlog.flush_sync(timeout=30)
        eventlog.close()


def both_ways(logs: LogFactory, session_id: str = SID) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any],
                                                               dict[str, Any]]:
    """(diagnosis from raw, from roll-ups, summary from raw, from roll-ups) of one stored session."""
    reader = logs.open()
    try:
        raw = reader.events_sync(session_id, limit=1_000_000)
        read = reader.analysis_sync(session_id)
    finally:
        reader.close()
    assert not any(e["kind"] in ("qualitySample", "clientStats") for e in read.entries)
    # The stored roll-ups are the fold of the raw samples.
    folded = rollup.from_entries(raw)
    assert read.rolled.tracks == folded.tracks
    assert sorted(read.rolled.quality) == sorted(folded.quality)
    assert read.rolled.marks == folded.marks
    assert read.rolled.freezes == folded.freezes
    assert read.rolled.tallies == folded.tallies
    return (diagnose(session_id, raw), diagnose(session_id, read.entries, read.rolled, read.span),
            summary(session_id, raw), summary(session_id, read.entries, read.rolled, read.span))


def downlink_low_bitrate() -> Log:
    log = call()
    for _ in range(6):
        log.sample("c_pat", "st_doc", "sub_pat", "out", dt=5_000, bitrate_kbps=80.0)
    return finish(log)


def uplink_loss_seen_downstream() -> Log:
    log = call(loss_pct=10.0, jitter_ms=80.0)
    for _ in range(3):
        log.sample("c_pat", "st_doc", "sub_pat", "out", loss_pct=11.0, jitter_ms=81.0)
    return finish(log)


def downlink_loss() -> Log:
    log = call()
    for _ in range(3):
        log.sample("c_pat", "st_doc", "sub_pat", "out", dt=5_000, loss_pct=15.0, rtt_ms=500.0)
    return finish(log)


def one_way() -> Log:
    log = Log()
    log.join("c_doc", "Dr Who", "clinician")
    log.join("c_pat", "Anna", "patient")
    log.publish("c_doc", "st_doc")
    log.subscribe("c_pat", "st_doc", "sub_pat")
    for _ in range(8):
        log.sample("c_doc", "st_doc", "st_doc", "in", dt=5_000)
        log.sample("c_pat", "st_doc", "sub_pat", "out", packets=0, bitrate_kbps=0.0)
    return log


def frozen() -> Log:
    log = call()
    for count, total in ((0, 0.0), (2, 3.0), (1, 0.5), ("bad", None), (4, 6.5)):
        log.add(EventKind.CLIENT_STATS, "", "c_pat", "st_doc", component="client", stream_id="st_doc", kind="video",
                direction="recv", freezeCount=count, totalFreezesDuration=total)
    return finish(log)


def random_call(seed: int) -> Log:
    """Three participants, ten minutes of samples every 2 s with spikes of loss, jitter, RTT, low
    bitrate and silent intervals, and browser freeze counters that restart now and then."""
    rng = random.Random(seed)
    log = Log()
    people = ["c_a", "c_b", "c_c"]
    for cid in people:
        log.join(cid, f"Person {cid}", "patient" if cid == "c_a" else "clinician")
        log.publish(cid, f"st_{cid}", video=cid != "c_c")
    subs = [(cid, f"st_{other}", f"sub_{cid}_{other}") for cid in people for other in people if other != cid]
    for cid, stream, sub in subs:
        log.subscribe(cid, stream, sub)
    freeze = {(cid, stream): (0, 0.0) for cid, stream, _ in subs}

    def figures(kind: str) -> dict[str, Any]:
        bad = rng.random() < 0.15
        return {"bitrate_kbps": round(rng.uniform(40, 200) if bad else rng.uniform(500, 900), 1)
                if kind == "video" else round(rng.uniform(5, 40), 1),
                "loss_pct": round(rng.uniform(4, 20) if bad else rng.uniform(0, 1), 2),
                "jitter_ms": round(rng.uniform(20, 90) if bad else rng.uniform(1, 6), 2) if rng.random() > 0.05
                else None,
                "rtt_ms": round(rng.uniform(250, 600) if bad else rng.uniform(20, 60), 1),
                "packets": 0 if rng.random() < 0.05 else rng.randint(50, 400),
                "width": rng.choice([320, 640, 1280]), "height": rng.choice([240, 480, 720])}

    for tick in range(300):
        for cid in people:
            for kind in ("audio", "video") if cid != "c_c" else ("audio",):
                log.sample(cid, f"st_{cid}", f"st_{cid}", "in", kind, dt=2_000 if cid == "c_a" and kind == "audio"
                           else 0, **figures(kind))
        for cid, stream, sub in subs:
            for kind in ("audio", "video") if not stream.endswith("c_c") else ("audio",):
                log.sample(cid, stream, sub, "out", kind, **figures(kind))
        if tick % 3 == 0:
            for (cid, stream), (count, total) in freeze.items():
                if rng.random() < 0.05:
                    count, total = 0, 0.0  # a reconnect restarts the counters
                elif rng.random() < 0.2:
                    count, total = count + 1, round(total + rng.uniform(0.2, 2.0), 3)
                freeze[(cid, stream)] = (count, total)
                log.add(EventKind.CLIENT_STATS, "", cid, stream, dt=0, component="client", stream_id=stream,
                        kind="video", direction="recv", freezeCount=count, totalFreezesDuration=total)
    return finish(log)


SCENARIOS: dict[str, Callable[[], Log]] = {
    "clean": lambda: finish(call()),
    "uplink low bitrate": lambda: finish(call(bitrate_kbps=90.0)),
    "downlink low bitrate": downlink_low_bitrate,
    "uplink loss and jitter seen downstream": uplink_loss_seen_downstream,
    "downlink loss and rtt": downlink_loss,
    "one-way media": one_way,
    "frozen video": frozen,
    "random call 1": lambda: random_call(1),
    "random call 2": lambda: random_call(2),
}
#: What each scenario must find (so that equal results are not equally empty).
EXPECTED: dict[str, set[str]] = {
    "clean": {"hung_up"},
    "uplink low bitrate": {"low_bitrate"},
    "downlink low bitrate": {"low_bitrate"},
    "uplink loss and jitter seen downstream": {"high_loss", "high_jitter"},
    "downlink loss and rtt": {"high_loss", "high_rtt"},
    "one-way media": {"one_way_media"},
    "frozen video": {"frozen_video"},
    "random call 1": {"high_loss", "high_jitter", "high_rtt", "frozen_video"},
    "random call 2": {"high_loss", "high_jitter", "high_rtt", "frozen_video"},
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_findings_and_summary_from_rollups_equal_those_from_raw_samples(logs: LogFactory, name: str) -> None:
    store(logs, SCENARIOS[name]())
    raw_diagnosis, rolled_diagnosis, raw_summary, rolled_summary = both_ways(logs)
    assert rolled_diagnosis == raw_diagnosis
    assert rolled_summary == raw_summary
    assert EXPECTED[name] <= {f["type"] for f in rolled_diagnosis["findings"]}, rolled_diagnosis


def test_rollups_survive_restarts_and_one_entry_per_batch(logs: LogFactory) -> None:
    """A writer that restarts mid-call reloads each track's count, upstream figures and freeze
    counters from the store; one-entry batches merge every bucket many times."""
    log = random_call(3)
    other = logs.sibling()
    store(logs, log, batch_max=1, restart_every=997)
    store(other, log, batch_max=5_000)
    a = both_ways(logs)
    b = both_ways(other)
    assert a[0] == a[1] == b[0] and a[2] == a[3] == b[2]


def test_a_refused_entry_is_left_out_of_the_rollups_too(logs: LogFactory) -> None:
    log = call(loss_pct=10.0)
    poisoned = log.sample("c_doc", "st_doc", "st_doc", "in", dt=5_000, loss_pct=50.0, poison=True)
    finish(log)

    def refuse(batch: Any) -> None:
        if any(e.payload.get("poison") for e in batch):
            raise sqlite3.OperationalError("disk I/O error")

    store(logs, log, batch_max=50, before_write=refuse)
    raw_diagnosis, rolled_diagnosis, raw_summary, rolled_summary = both_ways(logs)
    assert rolled_diagnosis == raw_diagnosis and rolled_summary == raw_summary
    loss = next(f for f in rolled_diagnosis["findings"] if f["type"] == FindingType.HIGH_LOSS)
    assert poisoned not in [s["seq"] for s in loss["evidence"]["samples"]] and "lost 10.0%" in loss["cause"]


def test_a_file_written_before_rollups_gets_them_on_open(tmp_path: Path) -> None:
    logs = LogFactory("sqlite", tmp_path, None)
    path = logs.path
    store(logs, random_call(4))
    expected = both_ways(logs)
    conn = sqlite3.connect(path)
    for table in ("rollups", "rollup_tracks", "quality_rollups", "sample_marks", "freeze_tracks", "bad_tallies"):
        conn.execute(f"DELETE FROM {table}")
    conn.execute("PRAGMA user_version = 0")
    conn.commit()
    conn.close()
    EventLog(path).close()  # opening builds them
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM rollup_tracks").fetchone()[0] == 15
    finally:
        conn.close()
    assert both_ways(logs) == expected
    logs.close()


def test_quality_points_sum_up_the_samples(logs: LogFactory) -> None:
    log = random_call(5)
    store(logs, log)
    reader = logs.open()
    try:
        raw = reader.events_sync(SID, kinds=[EventKind.QUALITY_SAMPLE], limit=1_000_000)
        assert reader.sample_count_sync(SID) == len(raw) == 300 * 15
        for resolution_ms in (10_000, 60_000, 300_000, 3_600_000):
            got, points = reader.quality_points_sync(SID, resolution_ms)
            assert got == resolution_ms
            assert sum(p["samples"] for p in points) == len(raw)
            assert [p["time_ms"] for p in points] == sorted(p["time_ms"] for p in points)
            windows: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
            for e in raw:
                s = e["payload"]
                track = s["stream_id"] if s["direction"] == "in" else s["peer_id"]
                windows.setdefault((track, s["direction"], s["kind"], e["time_ms"] // resolution_ms), []).append(s)
            assert len(points) == len(windows)
            for p in points:
                track = p["stream_id"] if p["direction"] == "in" else p["peer_id"]
                samples = windows[(track, p["direction"], p["kind"], p["time_ms"] // resolution_ms)]
                assert p["samples"] == len(samples)
                mean = statistics.fmean(s["bitrate_kbps"] for s in samples)
                assert p["bitrate_kbps"] == pytest.approx(mean, abs=0.06)
                assert p["bitrate_max_kbps"] == max(s["bitrate_kbps"] for s in samples)
                assert p["loss_max_pct"] == max(s["loss_pct"] for s in samples)
                assert p["packets"] == sum(s["packets"] for s in samples)
                jitters = [s["jitter_ms"] for s in samples if s["jitter_ms"] is not None]
                assert p["jitter_max_ms"] == (max(jitters) if jitters else None)
        # Coarsened until the points fit.
        resolution, points = reader.quality_points_sync(SID, 10_000, max_points=100)
        assert resolution == 300_000 and 0 < len(points) <= 100
        _, later = reader.quality_points_sync(SID, 60_000, since_ms=T0 + 300_000)
        assert later and min(p["time_ms"] for p in later) >= T0 + 300_000 - 60_000
    finally:
        reader.close()


def test_retention_deletes_the_rollups_of_the_deleted_samples(logs: LogFactory) -> None:
    old, new = random_call(6), random_call(7)
    for e in new.entries:
        e["session_id"] = "s_new"
        e["time_ms"] += 86_400_000
    store(logs, old)
    store(logs, new)
    eventlog = logs.open()
    try:
        eventlog.delete_before_sync(T0 + 86_400_000)
        assert eventlog.analysis_sync(SID).rolled == rollup.SessionRollup({}, [], [], [], {})
        assert eventlog.quality_points_sync(SID, 10_000) == (10_000, [])
    finally:
        eventlog.close()
    raw_diagnosis, rolled_diagnosis, raw_summary, rolled_summary = both_ways(logs, "s_new")
    assert rolled_diagnosis == raw_diagnosis and rolled_summary == raw_summary


def test_scores_from_rollups_are_the_per_sample_scores() -> None:
    """The MOS mean and the median video level from the track totals are those of the samples."""
    rng = random.Random(9)
    log = Log()
    samples = []
    for _ in range(101):
        figures: dict[str, Any] = {"loss_pct": round(rng.uniform(0, 30), 2), "rtt_ms": round(rng.uniform(10, 800), 1),
                                   "jitter_ms": round(rng.uniform(0, 80), 2), "bitrate_kbps": round(rng.uniform(8, 60))}
        log.sample("c", "st", "st", "in", "audio", dt=1_000, **figures)
        samples.append(figures)
    video = [(rng.choice([160, 320, 640, 1280]), rng.choice([120, 240, 480, 720]), rng.choice([5.0, 12.0, 30.0]),
              rng.uniform(50, 2000)) for _ in range(41)]
    for w, h, fps, kbps in video:
        log.sample("c", "st", "st", "in", "video", dt=1_000, width=w, height=h, frame_rate=fps, bitrate_kbps=kbps)
    rolled = rollup.from_entries(log.entries)
    mos = statistics.fmean(scores.audio_mos(s["loss_pct"], s["rtt_ms"], s["jitter_ms"], s["bitrate_kbps"])
                           for s in samples)
    assert rollup.mean_mos([rolled.tracks[("st", "in", "audio")]]) == pytest.approx(mos, abs=0.0051)
    levels = [int(scores.video_level(w, h, fps, kbps)) for w, h, fps, kbps in video]
    assert rollup.median_level([rolled.tracks[("st", "in", "video")]]) == statistics.median_low(levels)


def test_freeze_fold_is_the_client_stats_rule() -> None:
    samples = [{"freezeCount": c, "totalFreezesDuration": s} for c, s in
               ((0, 0.0), (1, 0.5), (3, 1.5), (1, 0.4), ("x", 9.0), (2, None), (2, 1.0))]
    track = rollup.FreezeTrack("c", "st", T0, 1)
    for i, s in enumerate(samples):
        track.add(i, T0 + i, s)
    assert (track.count, round(track.frozen_s, 3)) == scores.freezes_from_client_stats(samples)
    assert len(track.evidence) == len(samples) and track.evidence[4]["freezeCount"] == "x"


def test_the_printed_figure_is_the_lower_median_of_the_bad_samples_and_marks_stay_few(logs: LogFactory) -> None:
    """A leg bad all along: the finding counts every bad sample and prints the lower median of
    their figures, while only the first few are kept one by one."""
    rng = random.Random(12)
    log = Log()
    log.join("c_doc", "Dr Who", "clinician")
    log.join("c_pat", "Anna", "patient")
    log.publish("c_doc", "st_doc")
    losses = [round(rng.uniform(5.01, 30), 2) for _ in range(400)]
    for loss in losses:
        log.sample("c_doc", "st_doc", "st_doc", "in", "audio", dt=2_000, loss_pct=loss, jitter_ms=45.5,
                   bitrate_kbps=30.0)
    finish(log)
    store(logs, log, batch_max=64)
    _, rolled_diagnosis, _, _ = both_ways(logs)
    loss = next(f for f in rolled_diagnosis["findings"] if f["type"] == FindingType.HIGH_LOSS)
    expected = statistics.median_low(round(v, 1) for v in losses)
    assert f"lost {expected:.1f}% of packets (over 5% in 400 of 400 samples)" in loss["cause"]
    assert [s["loss_pct"] for s in loss["evidence"]["samples"]] == losses[:10]
    jitter = next(f for f in rolled_diagnosis["findings"] if f["type"] == FindingType.HIGH_JITTER)
    assert "had 46 ms of jitter" in jitter["cause"]
    reader = logs.open()
    try:
        assert len(reader.analysis_sync(SID).rolled.marks) == rollup.BAD_EVIDENCE
    finally:
        reader.close()
