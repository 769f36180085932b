"""Inspector benchmark: one synthetic 60-minute call of 4 participants, written through the
EventLog into a real SQLite file, then read back the way the inspector routes do. Prints:

- entries and storage per call-hour (the database file's growth, WAL checkpointed), by table;
- the time to fetch the full timeline as ``/quality`` serves it by default (the roll-ups at the
  finest resolution that fits in ``max_points``) and, for reference, every raw sample;
- the time to read what ``/summary`` and ``/diagnosis`` read (the entries but the samples, and
  the roll-ups) and to compute the summary and the diagnosis from it;
- whether the summary and the diagnosis computed from every raw entry equal those.

Every participant publishes audio and video and subscribes to the three others; the server
samples each track every ``--sample-s`` seconds (the default config: 2 s); each browser posts a
getStats() sample per track every 5 s. Median and range of ``--runs`` runs; figures only, not a test.

    .venv/bin/python benchmarks/inspector.py [--minutes 60] [--participants 4] [--runs 7] [--no-raw]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metrics.diagnosis import diagnose
from metrics.eventlog import EventLog
from metrics.events import Component, EventKind, LogEntry
from metrics.summary import summary
from signalling.api import QUALITY_MAX_POINTS

SID = "s_benchmark"
T0 = 1_790_000_000_000


def entry(t: int, kind: EventKind, text: str, cid: str | None = None, stream: str | None = None,
          component: Component = Component.SERVER, /, **payload: Any) -> LogEntry:
    return LogEntry(time_ms=t, session_id=SID, connection_id=cid, stream_id=stream, kind=kind, text=text,
                    component=component, payload=payload)


def session(minutes: int, participants: int, sample_s: float, impaired: float = 0.0) -> Iterator[LogEntry]:
    rng = random.Random(7)
    people = [(f"c_{i}", f"Person {i}", "clinician" if i == 0 else "patient", f"st_{i}") for i in range(participants)]
    t = T0
    for cid, name, role, stream in people:
        t += 500
        yield entry(t, EventKind.CONNECT_ATTEMPT, f"Connect attempt: {name} ({role})", cid,
                    user_agent="Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0", ip="10.0.0.1")
        yield entry(t, EventKind.SERVER_DETECTED_CONNECT, f"Server detected connect: {name} ({role})", cid,
                    role=role, name=name, user=name, user_agent="Mozilla/5.0", ip="10.0.0.1")
        yield entry(t, EventKind.SUCCESSFULLY_JOINED, f"Successfully joined the session: {name}", cid)
        yield entry(t + 100, EventKind.PUBLISH_ATTEMPT, f"Publish attempt: {name}", cid, stream)
        yield entry(t + 300, EventKind.PUBLISH_SUCCESS, f"Publish succeeded: {name}", cid, stream)
        yield entry(t + 600, EventKind.STREAM_CREATED, f"Stream created: {name} (audio+video)", cid, stream,
                    name=name, video_source="camera", has_audio=True, has_video=True)
    subs = [(cid, f"sub_{cid}_{stream}", stream) for cid, *_ in people for *_, stream in people
            if not stream.endswith(cid[2:])]
    for cid, sub, stream in subs:
        yield entry(t + 1_000, EventKind.SUBSCRIBE_ATTEMPT, "Subscribe attempt", cid, stream, subscription_id=sub)
        yield entry(t + 1_200, EventKind.SUBSCRIBE_SUCCESS, "Subscribe succeeded", cid, stream, subscription_id=sub)
    start, end = t + 2_000, t + 2_000 + minutes * 60_000
    step = int(sample_s * 1000)
    for now in range(start, end, step):
        for cid, _, _, stream in people:
            for kind in ("audio", "video"):
                yield sample(now, cid, stream, stream, "in", kind, sample_s, rng, impaired)
        for cid, sub, stream in subs:
            for kind in ("audio", "video"):
                yield sample(now, cid, stream, sub, "out", kind, sample_s, rng, impaired)
        if (now - start) % 5_000 < step:  # the browsers' 5-second getStats() summaries
            for cid, _, _, own in people:
                for _, _, _, stream in people:
                    direction = "send" if stream == own else "recv"
                    for kind in ("audio", "video"):
                        yield entry(now, EventKind.CLIENT_STATS, f"{kind} {direction}", cid, stream, Component.CLIENT,
                                    stream_id=stream, kind=kind, direction=direction, framesDecoded=now // 33,
                                    framesDropped=0, freezeCount=0, totalFreezesDuration=0.0,
                                    jitterBufferDelay=0.04, concealedSamples=0, roundTripTime=0.03,
                                    availableOutgoingBitrate=1_500_000, qualityLimitationReason="none",
                                    packetsLost=0, packetsReceived=now // 20, bytesReceived=now * 100,
                                    bytesSent=now * 100, frameWidth=640, frameHeight=480, framesPerSecond=30,
                                    candidate_pair={"local_type": "host", "remote_type": "host",
                                                    "protocol": "udp"})
    for cid, name, _, _ in people:
        yield entry(end, EventKind.DISCONNECT, f"Server detected disconnect: {name}. Reason: clientDisconnected", cid,
                    reason="clientDisconnected")


def sample(now: int, cid: str, stream: str, peer: str, direction: str, kind: str, interval: float,
           rng: random.Random, impaired: float = 0.0) -> LogEntry:
    """One server sample; a share ``impaired`` of them is bad (low bitrate, loss, jitter, RTT)."""
    video = kind == "video"
    if rng.random() < impaired:
        payload = _sample(now, stream, peer, direction, kind, interval, round(rng.uniform(60, 140), 1) if video
                          else 20.0, round(rng.uniform(6, 15), 2), round(rng.uniform(35, 60), 2),
                          round(rng.uniform(320, 500), 1))
    else:
        payload = _sample(now, stream, peer, direction, kind, interval, round(rng.uniform(700, 900) if video
                          else rng.uniform(30, 40), 1), round(rng.uniform(0, 0.5), 2),
                          round(rng.uniform(1, 5), 2), round(rng.uniform(20, 40), 1))
    return entry(now, EventKind.QUALITY_SAMPLE, f"{kind} {direction} {payload['bitrate_kbps']} kbps", cid, stream,
                 **payload)


def _sample(now: int, stream: str, peer: str, direction: str, kind: str, interval: float, kbps: float, loss: float,
            jitter: float, rtt: float) -> dict[str, Any]:
    video = kind == "video"
    payload = {"peer_id": peer, "stream_id": stream, "direction": direction, "kind": kind, "time_ms": now,
               "interval_s": interval, "bitrate_kbps": kbps, "packets": int(kbps * interval / 8),
               "packets_lost": 0, "loss_pct": loss, "jitter_ms": jitter, "rtt_ms": rtt,
               "frame_rate": 30.0 if video else None,
               "width": 640 if video else None, "height": 480 if video else None, "nacks": 0, "plis": 0,
               "remb_kbps": None, "octets": int(kbps * 125 * interval), "retransmitted": 0}
    return payload


def timed(fn: Callable[[], Any], runs: int) -> tuple[list[float], Any]:
    """Times of ``runs`` runs after one warm-up run (first imports, e.g. the user-agent parser's)."""
    times, result = [], fn()
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return times, result


def figure(times: list[float]) -> str:
    return f"median {statistics.median(times):.1f} ms (range {min(times):.1f}-{max(times):.1f} ms)"


def storage(path: Path) -> dict[str, int]:
    """Bytes per table (indexes counted with their table), from SQLite's dbstat."""
    conn = sqlite3.connect(path)
    try:
        names = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        sizes: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            table = names.get(name, name)
            sizes[table] = sizes.get(table, 0) + int(size)
        return sizes
    except sqlite3.OperationalError:  # SQLite built without dbstat
        return {}
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-points", type=int, default=QUALITY_MAX_POINTS)
    parser.add_argument("--impaired", type=float, default=0.0,
                        help="share of server samples that are bad (0-1): the diagnosis's worst case is 1")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw reads and the equality check (slow)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.sqlite3"
        log = EventLog(path, max_queue=2_000_000)
        entries = list(session(args.minutes, args.participants, args.sample_s, args.impaired))
        started = time.perf_counter()
        log.extend(entries)
        assert log.flush_sync(timeout=600)
        write_s = time.perf_counter() - started
        log.close()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        size = path.stat().st_size
        tables = storage(path)
        reader = EventLog(path)
        try:
            timeline_ms, (resolution, points) = timed(
                lambda: reader.quality_points_sync(SID, 0, None, args.max_points), args.runs)
            analysis_ms, read = timed(lambda: reader.analysis_sync(SID), args.runs)
            summary_read_ms, summary_read = timed(lambda: reader.analysis_sync(SID, marks=False), args.runs)
            raw_timeline_ms: list[float] = []
            everything: list[dict[str, Any]] = []
            if not args.no_raw:
                raw_timeline_ms, _ = timed(
                    lambda: reader.events_sync(SID, kinds=[EventKind.QUALITY_SAMPLE], limit=1_000_000), 1)
                everything = reader.events_sync(SID, limit=1_000_000)
        finally:
            reader.close()
        summary_ms, summed = timed(lambda: summary(SID, summary_read.entries, summary_read.rolled, summary_read.span),
                                   args.runs)
        diagnosis_ms, result = timed(lambda: diagnose(SID, read.entries, read.rolled, read.span), args.runs)
    hours = args.minutes / 60
    kinds = {k: sum(1 for e in entries if e.kind == k) for k in (EventKind.QUALITY_SAMPLE, EventKind.CLIENT_STATS)}
    print(f"session: {args.minutes} min, {args.participants} participants, server samples every {args.sample_s:g} s "
          f"({100 * args.impaired:g}% impaired), client stats every 5 s; {args.runs} runs each")
    print(f"entries: {len(entries)} ({kinds[EventKind.QUALITY_SAMPLE]} quality samples, "
          f"{kinds[EventKind.CLIENT_STATS]} client stats), written in {write_s:.1f} s")
    print(f"storage: {size / 1e6:.1f} MB, {size / 1e6 / hours:.1f} MB per call-hour, "
          f"{size / len(entries):.0f} bytes per entry")
    if tables:
        print("  by table (with its indexes): " + ", ".join(
            f"{name} {bytes_ / 1e6:.1f} MB" for name, bytes_ in sorted(tables.items(), key=lambda x: -x[1])))
    print(f"fetch full timeline ({len(points)} points at {resolution // 1000} s, max_points {args.max_points}): "
          f"{figure(timeline_ms)}")
    print(f"read for the diagnosis ({len(read.entries)} entries, {len(read.rolled.tracks)} tracks, "
          f"{len(read.rolled.marks)} marks, {len(read.rolled.freezes)} freeze tracks): {figure(analysis_ms)}")
    print(f"read for the summary (the same without marks): {figure(summary_read_ms)}")
    print(f"summary: {figure(summary_ms)}")
    print(f"diagnosis: {figure(diagnosis_ms)} ({len(result['findings'])} findings: "
          f"{sorted({f['type'] for f in result['findings']})})")
    print(f"/summary read+compute: {statistics.median(summary_read_ms) + statistics.median(summary_ms):.1f} ms, "
          f"/diagnosis read+compute: {statistics.median(analysis_ms) + statistics.median(diagnosis_ms):.1f} ms "
          "(medians)")
    if not args.no_raw:
        print(f"raw timeline ({kinds[EventKind.QUALITY_SAMPLE]} samples, resolution=raw): {figure(raw_timeline_ms)}")
        same = (diagnose(SID, everything) == result and summary(SID, everything) == summed)
        print(f"summary and diagnosis from the raw entries equal those from the roll-ups: {same}")


if __name__ == "__main__":
    main()
