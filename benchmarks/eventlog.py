"""Event-log benchmark: what safe entries and committed replies cost.

Against a real SQLite file in a temp dir, prints:

- writer throughput: entries per second appended in bulk and flushed, for plain entries
  and for hostile ones (lone surrogates, control characters, a long text, a nested payload),
  which the writer makes safe one by one;
- group commit: C concurrent "requests", each appending a few entries and awaiting
  ``committed()`` before its "reply", for a fixed number of rounds; reports requests per
  second, the median and 99th-percentile wait, and how many commits served them.

    .venv/bin/python benchmarks/eventlog.py [--entries 50000] [--concurrency 1,10,100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from metrics.eventlog import EventLog
from metrics.events import EventKind, LogEntry


def plain(i: int) -> LogEntry:
    return LogEntry(time_ms=i, session_id=f"s_{i % 50}", connection_id=f"c_{i % 200}", kind=EventKind.CONNECT_ATTEMPT,
                    text=f"Connect attempt: Anna (patient) {i}", payload={"user_agent": "Mozilla/5.0", "ip": "10.0.0.1"})


def hostile(i: int) -> LogEntry:
    return LogEntry(time_ms=i, session_id=f"s_\ud800{i % 50}", connection_id="c_\x00", kind="tokenRejected\udfff",
                    text="Failed \x1b[31m\ud800 " + "x" * 6_000,
                    payload={"\ud800": {"nested": ["\udfff", {"deep": "\x00" * 10}], "n": list(range(20))}})


def throughput(make: str, entries: int, tmp: Path) -> float:
    build = plain if make == "plain" else hostile
    batch = [build(i) for i in range(entries)]
    log = EventLog(tmp / f"{make}.db", max_queue=entries + 10)
    try:
        started = time.perf_counter()
        log.extend(batch)
        assert log.flush_sync(timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        log.close()
    assert log.written == entries, (log.written, log.dropped)
    return entries / elapsed


async def group_commit(concurrency: int, rounds: int, tmp: Path) -> tuple[float, float, float, int]:
    commits: list[int] = []
    log = EventLog(tmp / f"group-{concurrency}.db", before_write=lambda part: commits.append(len(part)))
    waits: list[float] = []

    async def request(n: int) -> None:
        for r in range(rounds):
            for k in range(3):  # a join logs about three entries
                log.append(plain(n * rounds * 3 + r * 3 + k))
            started = time.perf_counter()
            await log.committed(log.appended)
            waits.append(time.perf_counter() - started)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(request(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await log.aclose()
    waits.sort()
    return (concurrency * rounds / elapsed, statistics.median(waits) * 1e3,
            waits[int(len(waits) * 0.99) - 1] * 1e3, len(commits))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--concurrency", default="1,10,100")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for make in ("plain", "hostile"):
            print(f"writer, {make:8s} entries: {throughput(make, args.entries, tmp):>10,.0f} entries/s")
        for c in (int(x) for x in args.concurrency.split(",")):
            rate, median_ms, p99_ms, commits = asyncio.run(group_commit(c, args.rounds, tmp))
            print(f"group commit, {c:>4d} concurrent: {rate:>8,.0f} replies/s, wait median {median_ms:.2f} ms,"
                  f" p99 {p99_ms:.2f} ms, {c * args.rounds} replies in {commits} commits")


if __name__ == "__main__":
    main()
