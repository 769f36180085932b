"""Back-office log benchmark: search, CSV export, audit appends and retention at clinic scale.

Against real SQLite files in a temp dir (an event log of ``--sessions`` consultations with
``--per-session`` entries each, a third of them back-office kinds, and an audit log of
``--lookups`` entries), prints:

- search: the first page (100 rows) of everything in a week, a free-text search, a deep page
  (offset 10,000), a department admin's search over 500 session ids;
- CSV: the time to build a 100,000-row export and its size;
- audit: LookUp appends per second with 1 and 50 concurrent requests (each committed before
  it returns, group commit);
- retention: anonymising and deleting half the event log.

    .venv/bin/python benchmarks/backoffice_log.py [--sessions 2000] [--per-session 100] [--lookups 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from metrics.audit import AuditEntry, AuditKind, AuditLog, LogQuery, LogType, search, to_csv
from metrics.eventlog import EventLog
from metrics.events import EventKind, LogEntry

DAY_MS = 86_400_000
T0 = 1_800_000_000_000
KINDS = [EventKind.CONSULTATION, EventKind.QUEUE, EventKind.VIDEO_SESSION, EventKind.CONNECT_ATTEMPT,
         EventKind.SERVER_DETECTED_CONNECT, EventKind.QUALITY_SAMPLE, EventKind.QUALITY_SAMPLE,
         EventKind.QUALITY_SAMPLE, EventKind.CLIENT_STATS]


def fill(eventlog: EventLog, audit: AuditLog, sessions: int, per_session: int, lookups: int) -> None:
    span = 7 * DAY_MS
    for s in range(sessions):
        start = T0 - span + s * span // sessions
        if s % 100 == 0:
            assert eventlog.flush_sync(600)  # stay under the writer's queue bound
        eventlog.extend(LogEntry(time_ms=start + i * 1_000, session_id=f"s_{s:06d}", kind=KINDS[i % len(KINDS)],
                                 text=f"Step {i} for patient p-{s} (Anna {s})",
                                 payload={"name": f"Anna {s}", "ip": "10.0.0.1", "user_agent": "Mozilla/5.0",
                                          "bitrate_kbps": 800})
                        for i in range(per_session))
    assert eventlog.flush_sync(600)
    for i in range(lookups):
        audit.append_sync(AuditEntry(time_ms=T0 - span + i * span // lookups, kind=AuditKind.LOOKUP, sub="sue",
                                     name="Sue", role="support", what="session", target=f"s_{i % sessions:06d}",
                                     ip="10.0.0.7"))


def timed(label: str, fn: object, repeat: int = 5) -> object:
    assert callable(fn)
    best = float("inf")
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    print(f"  {label:<48} {best * 1000:8.1f} ms")
    return result


async def audit_rate(audit: AuditLog, concurrency: int, total: int) -> float:
    entry = AuditEntry(time_ms=T0, kind=AuditKind.LOOKUP, sub="b", name="Bench", role="support", what="query",
                       target="q", ip="127.0.0.1")
    t0 = time.perf_counter()
    for _ in range(total // concurrency):
        await asyncio.gather(*(audit.append(entry) for _ in range(concurrency)))
    return total / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--per-session", type=int, default=100)
    parser.add_argument("--lookups", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        eventlog = EventLog(Path(tmp) / "events.sqlite3")
        audit = AuditLog(Path(tmp) / "audit.sqlite3")
        t0 = time.perf_counter()
        fill(eventlog, audit, args.sessions, args.per_session, args.lookups)
        total = args.sessions * args.per_session
        print(f"{total:,} event-log entries in {args.sessions:,} sessions, {args.lookups:,} audit entries "
              f"(filled in {time.perf_counter() - t0:.1f} s; events file "
              f"{(Path(tmp) / 'events.sqlite3').stat().st_size / 1e6:.1f} MB)")

        def week(**kw: Any) -> LogQuery:
            return LogQuery(since_ms=T0 - 7 * DAY_MS, until_ms=T0 + 1, types=frozenset(LogType), **kw)

        paths = (eventlog.path, audit.path)
        print("search")
        timed("first page, all types, one week", lambda: search(*paths, week()))
        timed("free text (a patient reference)", lambda: search(*paths, week(text="p-1234)")))
        timed("offset 10,000", lambda: search(*paths, week(offset=10_000)))
        mine = frozenset(f"s_{s:06d}" for s in range(0, args.sessions, max(1, args.sessions // 500)))
        timed("department admin (500 sessions, no audit)",
              lambda: search(*paths, week(sessions=mine, include_audit=False)))
        print("CSV")
        rows = search(*paths, week(limit=100_000))
        text = timed(f"build {len(rows):,} rows", lambda: to_csv(rows), repeat=2)
        assert isinstance(text, str)
        print(f"  {'size':<48} {len(text.encode()) / 1e6:8.1f} MB")
        print("audit appends (committed before each returns)")
        for concurrency in (1, 50):
            rate = asyncio.run(audit_rate(audit, concurrency, 500 if concurrency == 1 else 5_000))
            print(f"  {f'{concurrency} concurrent':<48} {rate:8.0f} /s")
        print("retention")
        half = T0 - 7 * DAY_MS // 2
        timed("anonymise the older half", lambda: eventlog.anonymise_before_sync(half), repeat=1)
        timed("delete the older half", lambda: eventlog.delete_before_sync(half), repeat=1)
        eventlog.close()
        audit.close()


if __name__ == "__main__":
    main()
