"""The event-log contract on both backends (SQLite file, real PostgreSQL; see conftest.py): ordering,
batching, durability, flush/close, filters, drops; and a session written from two nodes."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from metrics import prometheus
from metrics.prometheus import EventLogDropReason
from metrics.eventlog import EventLog, EventStore
from metrics.eventlog_pg import PgEventLog
from metrics.events import (
    NO_SESSION,
    CandidateType,
    Component,
    EventKind,
    LogEntry,
    TransportProtocol,
    candidate_pair,
    room_session_id,
    token_preview,
    token_rejected,
)
from rooms.model import DisconnectReason
from tests.metrics.conftest import LogFactory
from tests.helpers import wait_until_sync
from tests.postgres_server import PostgresServer, postgres_server


def entry(
    session_id: str = "s_1",
    kind: EventKind = EventKind.CONNECT_ATTEMPT,
    time_ms: int = 1_000,
    text: str = "x",
    **kwargs: Any,
) -> LogEntry:
    return LogEntry(time_ms=time_ms, session_id=session_id, kind=kind, text=text, **kwargs)


@pytest.fixture
def log(logs: LogFactory) -> Iterator[EventStore]:
    event_log = logs.open()
    yield event_log
    event_log.close()


def counter_value(name: str, **labels: str) -> float:
    value = prometheus.REGISTRY.get_sample_value(name, labels)
    assert value is not None
    return value


def dropped_total() -> float:
    """The process-wide dropped counter, summed over its reasons."""
    return sum(counter_value("openconsult_eventlog_entries_dropped_total", reason=r.value) for r in EventLogDropReason)


def test_append_flush_query_order(log: EventStore) -> None:
    # Out of time order on purpose; equal times keep insertion order.
    log.append(entry(time_ms=30, text="c"))
    log.append(entry(time_ms=10, text="a1"))
    log.append(entry(time_ms=10, text="a2"))
    log.append(entry(time_ms=20, text="b"))
    log.append(entry(session_id="other", time_ms=15, text="elsewhere"))
    assert log.flush_sync(timeout=10)
    assert [e["text"] for e in log.events_sync("s_1")] == ["a1", "a2", "b", "c"]
    assert [e["text"] for e in log.events_sync("other")] == ["elsewhere"]
    assert log.events_sync("nobody") == []


def test_entry_round_trip_with_json_payload(log: EventStore) -> None:
    payload = {
        "reason": DisconnectReason.NETWORK_DISCONNECTED,
        "candidate_pair": candidate_pair(CandidateType.RELAY, CandidateType.SRFLX, TransportProtocol.TCP),
        "nested": {"list": [1, 2.5, None, True, "é"]},
    }
    log.append(
        entry(
            kind=EventKind.DTLS_STATE_CHANGED,
            time_ms=1234,
            text="DTLS connected via relay/tcp",
            component=Component.CLIENT,
            connection_id="c_1",
            stream_id="st_1",
            payload=payload,
        )
    )
    assert log.flush_sync(timeout=10)
    [row] = log.events_sync("s_1")
    assert row == {
        "seq": row["seq"],
        "time_ms": 1234,
        "session_id": "s_1",
        "connection_id": "c_1",
        "stream_id": "st_1",
        "kind": "dtlsStateChanged",
        "component": "client",
        "text": "DTLS connected via relay/tcp",
        "payload": {
            "reason": "networkDisconnected",
            "candidate_pair": {"local_type": "relay", "remote_type": "srflx", "protocol": "tcp"},
            "nested": {"list": [1, 2.5, None, True, "é"]},
        },
    }


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_unserialisable_payload_values_do_not_lose_entries(log: EventStore) -> None:
    log.append(entry(payload={"path": Path("/x"), "kinds": {1}}))
    log.append(entry(payload={"bad": Unprintable()}))
    log.append(entry(payload={"ok": 1}))
    assert log.flush_sync(timeout=10)
    rows = log.events_sync("s_1")
    assert [r["payload"] for r in rows] == [
        {"path": "/x", "kinds": "{1}"},
        {"bad": "<unprintable: RuntimeError>"},
        {"ok": 1},
    ]
    assert log.dropped == 0


def test_many_entries_are_batched_and_all_queryable(logs: LogFactory) -> None:
    batches: list[int] = []
    event_log = logs.open(batch_max=1_000, before_write=lambda batch: batches.append(len(batch)))
    written_before = counter_value("openconsult_eventlog_entries_written_total")
    try:
        for i in range(20_000):
            event_log.append(entry(time_ms=i, text=f"e{i}", payload={"i": i}))
        assert event_log.flush_sync(timeout=30)
        rows = event_log.events_sync("s_1", limit=50_000)
    finally:
        event_log.close()
    assert [r["payload"]["i"] for r in rows] == list(range(20_000))
    assert sum(batches) == 20_000
    assert max(batches) <= 1_000
    assert len(batches) < 200  # batched, not one transaction per entry
    assert event_log.written == 20_000
    assert counter_value("openconsult_eventlog_entries_written_total") - written_before == 20_000


def test_restart_durability(logs: LogFactory) -> None:
    first = logs.open()
    for i in range(100):
        first.append(entry(time_ms=i, text=f"before-{i}"))
    first.close()  # close flushes: no explicit flush here on purpose

    second = logs.open()
    try:
        second.append(entry(time_ms=1_000, text="after"))
        assert second.flush_sync(timeout=10)
        texts = [e["text"] for e in second.events_sync("s_1")]
    finally:
        second.close()
    assert texts == [f"before-{i}" for i in range(100)] + ["after"]


def test_queries_work_after_close(logs: LogFactory) -> None:
    event_log = logs.open()
    event_log.append(entry())
    event_log.close()
    assert len(event_log.events_sync("s_1")) == 1


def test_flush_waits_for_entries_appended_before_it(logs: LogFactory) -> None:
    # A long batch interval: without the flush the entry would sit in memory for a minute.
    event_log = logs.open(batch_interval_s=60.0)
    try:
        event_log.append(entry(text="one"))
        assert event_log.flush_sync(timeout=10)
        assert [e["text"] for e in event_log.events_sync("s_1")] == ["one"]
        # Flushing with nothing queued returns promptly too.
        assert event_log.flush_sync(timeout=10)
    finally:
        event_log.close()


def test_entries_reach_disk_within_the_batch_interval_without_flush(log: EventStore) -> None:
    log.append(entry(text="trickle"))
    deadline = time.monotonic() + 10
    while not log.events_sync("s_1"):
        assert time.monotonic() < deadline, "entry never written"
        time.sleep(0.01)


async def test_async_flush_and_queries(log: EventStore) -> None:
    log.append(entry(kind=EventKind.CONNECT_ATTEMPT, time_ms=1))
    log.append(entry(kind=EventKind.SUCCESSFULLY_JOINED, time_ms=2))
    assert await log.flush(timeout=10)
    rows = await log.events("s_1", kinds=[EventKind.SUCCESSFULLY_JOINED])
    assert [r["kind"] for r in rows] == ["successfullyJoined"]
    found = await log.sessions(0, 10)
    assert [s["session_id"] for s in found] == ["s_1"]


def test_close_is_idempotent_and_later_appends_are_dropped(logs: LogFactory) -> None:
    event_log = logs.open()
    event_log.append(entry())
    event_log.close()
    event_log.close()
    assert event_log.closed
    event_log.append(entry())  # must not raise
    assert event_log.dropped == 1
    assert event_log.flush_sync(timeout=1)
    assert len(event_log.events_sync("s_1")) == 1


async def test_aclose(logs: LogFactory) -> None:
    event_log = logs.open()
    event_log.append(entry())
    await event_log.aclose()
    await event_log.aclose()
    assert len(event_log.events_sync("s_1")) == 1


def test_concurrent_appends_from_threads(log: EventStore) -> None:
    threads_n, per_thread = 8, 2_000

    def produce(n: int) -> None:
        for i in range(per_thread):
            log.append(entry(session_id=f"s_{n}", time_ms=i, text=f"{n}-{i}", payload={"i": i}))

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.flush_sync(timeout=30)
    for n in range(threads_n):
        rows = log.events_sync(f"s_{n}")
        # Each producer's own entries keep their order.
        assert [r["payload"]["i"] for r in rows] == list(range(per_thread))
    assert log.dropped == 0


def test_concurrent_flushes_from_threads(log: EventStore) -> None:
    results: list[bool] = []

    def produce_and_flush(n: int) -> None:
        for i in range(200):
            log.append(entry(session_id=f"s_{n}", time_ms=i))
        results.append(log.flush_sync(timeout=30))
        # Read-your-writes after this thread's own flush.
        assert len(log.events_sync(f"s_{n}")) == 200

    threads = [threading.Thread(target=produce_and_flush, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 6


def test_event_filters(log: EventStore) -> None:
    kinds = [EventKind.CONNECT_ATTEMPT, EventKind.PUBLISH_ATTEMPT, EventKind.PUBLISH_SUCCESS, EventKind.DISCONNECT]
    for i, kind in enumerate(kinds):
        log.append(entry(kind=kind, time_ms=100 + i * 10, text=str(kind)))
    assert log.flush_sync(timeout=10)

    def texts(rows: Sequence[dict[str, Any]]) -> list[str]:
        return [r["text"] for r in rows]

    assert texts(log.events_sync("s_1", kinds=[EventKind.PUBLISH_ATTEMPT, EventKind.DISCONNECT])) == [
        "publishAttempt",
        "disconnect",
    ]
    assert log.events_sync("s_1", kinds=[]) == []
    assert texts(log.events_sync("s_1", since_ms=110)) == ["publishAttempt", "publishSuccess", "disconnect"]
    assert texts(log.events_sync("s_1", since_ms=110, until_ms=130)) == ["publishAttempt", "publishSuccess"]
    assert texts(log.events_sync("s_1", limit=2)) == ["connectAttempt", "publishAttempt"]


def test_sessions_search(log: EventStore) -> None:
    log.append(entry(session_id="s_a", time_ms=100, text="Server detected connect: Anna (patient)"))
    log.append(entry(session_id="s_a", time_ms=300, text="Disconnect", connection_id="c_anna"))
    log.append(entry(session_id="s_b", time_ms=200, text="Server detected connect: Bo (clinician)"))
    log.append(entry(session_id="s_c", time_ms=5_000, text="later"))
    log.append(entry(session_id="s_d", time_ms=150, text="100%_literal"))
    assert log.flush_sync(timeout=10)

    found = log.sessions_sync(0, 1_000)
    assert found == [
        {"session_id": "s_a", "first_ms": 100, "last_ms": 300, "count": 2},
        {"session_id": "s_b", "first_ms": 200, "last_ms": 200, "count": 1},
        {"session_id": "s_d", "first_ms": 150, "last_ms": 150, "count": 1},
    ]
    assert [s["session_id"] for s in log.sessions_sync(0, 1_000, text="anna")] == ["s_a"]
    assert [s["session_id"] for s in log.sessions_sync(0, 1_000, text="c_ann")] == ["s_a"]
    assert [s["session_id"] for s in log.sessions_sync(0, 1_000, text="s_b")] == ["s_b"]
    # LIKE wildcards in the search text are literal.
    assert [s["session_id"] for s in log.sessions_sync(0, 1_000, text="0%_")] == ["s_d"]
    assert log.sessions_sync(0, 1_000, text="%") == [{"session_id": "s_d", "first_ms": 150, "last_ms": 150, "count": 1}]
    assert [s["session_id"] for s in log.sessions_sync(1_000, 10_000)] == ["s_c"]
    assert log.sessions_sync(0, 1_000, limit=1)[0]["session_id"] == "s_a"


def test_append_never_blocks_when_writer_is_slow(logs: LogFactory) -> None:
    release = threading.Event()
    event_log = logs.open(max_queue=50, batch_max=10, before_write=lambda batch: release.wait(30))
    dropped_before = counter_value("openconsult_eventlog_entries_dropped_total", reason="queue_full")
    try:
        started = time.perf_counter()
        for i in range(2_000):
            event_log.append(entry(time_ms=i))
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0, f"append blocked: {elapsed:.3f}s for 2000 entries"
        # The writer holds at most one batch; the queue holds at most max_queue.
        assert 2_000 - 50 - 10 <= event_log.dropped <= 2_000 - 50
        dropped_after = counter_value("openconsult_eventlog_entries_dropped_total", reason="queue_full")
        assert dropped_after - dropped_before == event_log.dropped
        release.set()
        assert event_log.flush_sync(timeout=10)
        assert len(event_log.events_sync("s_1", limit=5_000)) == 2_000 - event_log.dropped
    finally:
        release.set()
        event_log.close()


def test_writer_survives_a_failing_disk(logs: LogFactory) -> None:
    # Every write fails while the "disk" is full: each entry is tried on its own, then dropped.
    full = [True]

    def disk(batch: Sequence[LogEntry]) -> None:
        if full[0]:
            raise OSError("disk full")

    event_log = logs.open(before_write=disk)
    try:
        event_log.extend(entry(text=f"lost-{i}") for i in range(5))
        assert event_log.flush_sync(timeout=10)
        assert event_log.dropped == 5
        full[0] = False
        event_log.append(entry(text="kept"))
        assert event_log.flush_sync(timeout=10)
        assert [e["text"] for e in event_log.events_sync("s_1")] == ["kept"]
        assert event_log.dropped == 5
    finally:
        event_log.close()


def test_bad_path_fails_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        EventLog(tmp_path / "missing-dir" / "events.db")


def test_token_rejected_entry() -> None:
    e = token_rejected("eyJhbGciOiJIUzI1NiJ9.secret", "token expired", room="clinic-7", code="token_expired")
    assert e.kind == EventKind.TOKEN_REJECTED
    assert e.text == "Failed to get valid token for token: eyJh…(truncated): token expired"
    assert e.session_id == "room:clinic-7"
    assert "secret" not in str(e.payload)
    assert token_rejected("abc", "malformed").session_id == NO_SESSION
    assert room_session_id(None) == NO_SESSION
    assert token_preview("ab") == "…(truncated)"


def test_event_kinds_cover_the_inspector_vocabulary() -> None:
    required = {
        "connectAttempt", "serverDetectedConnect", "successfullyJoined", "publishAttempt", "publishSuccess",
        "publishFailure", "streamCreated", "streamDestroyed", "subscribeAttempt", "subscribeSuccess",
        "subscribeFailure", "iceStateChanged", "dtlsStateChanged", "dimensionsChanged", "keyframeRequested",
        "qualityAlert", "tokenRejected", "disconnect", "Consultation", "Queue", "VideoSession", "Chat",
    }  # fmt: skip
    assert required <= {k.value for k in EventKind}


# --- PostgreSQL: several nodes, partitions ------------------------------------------------


def test_a_session_written_from_two_nodes_reads_complete_and_in_order_from_either(pg_srv: PostgresServer) -> None:
    url = pg_srv.new_database()
    node_a = PgEventLog(url, node_id="node-a", batch_max=7)
    node_b = PgEventLog(url, node_id="node-b", batch_max=5)
    written: list[tuple[int, str, str]] = []
    try:
        # Interleaved, with times that tie across nodes and batches that commit out of time order.
        for i in range(300):
            node, name = (node_a, "node-a") if i % 3 else (node_b, "node-b")
            time_ms = 1_764_374_400_000 + (i // 4) * 10  # several entries per millisecond, across nodes
            node.append(entry(session_id="s_shared", time_ms=time_ms, text=f"e{i}", payload={"i": i}))
            written.append((time_ms, name, f"e{i}"))
            if i % 50 == 0:
                assert node.flush_sync(timeout=10)
        assert node_a.flush_sync(timeout=10) and node_b.flush_sync(timeout=10)
        from_a = node_a.events_sync("s_shared")
        from_b = node_b.events_sync("s_shared")
    finally:
        node_a.close()
        node_b.close()
    assert from_a == from_b
    assert len(from_a) == 300
    # Time first, then node id; within one node, the order it wrote in.
    expected = sorted(written, key=lambda w: (w[0], w[1]))  # a stable sort keeps each node's order
    node_of = {text: name for _, name, text in written}
    assert [(r["time_ms"], node_of[r["text"]], r["text"]) for r in from_a] == expected
    assert node_a.sessions_sync(0, 2**62) == node_b.sessions_sync(0, 2**62) == [
        {"session_id": "s_shared", "first_ms": written[0][0], "last_ms": written[-1][0], "count": 300}]


def partitions(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                            " WHERE i.inhparent = 'events'::regclass ORDER BY 1").fetchall()
    return [str(r[0]) for r in rows]


def test_postgresql_partitions_by_day_and_retention_drops_whole_days(pg_srv: PostgresServer) -> None:
    url = pg_srv.new_database()
    day = 86_400_000
    start = 1_764_374_400_000  # 2025-11-29 00:00 UTC
    log = PgEventLog(url)
    try:
        log.extend(entry(time_ms=start + d * day + h * 3_600_000, text=f"d{d}h{h}")
                   for d in range(4) for h in (0, 12))
        assert log.flush_sync(timeout=10)
        assert partitions(url) == ["events_d20251129", "events_d20251130", "events_d20251201", "events_d20251202"]
        # The cut-off falls mid-day 3: days 1 and 2 are dropped whole, day 3 loses its morning.
        cut = start + 2 * day + 6 * 3_600_000
        assert log.delete_before_sync(cut) == 5
        assert partitions(url) == ["events_d20251201", "events_d20251202"]
        assert [e["text"] for e in log.events_sync("s_1")] == ["d2h12", "d3h0", "d3h12"]
        # Writing into a day whose partition was dropped creates it again.
        log.append(entry(time_ms=start + 1, text="late"))
        assert log.flush_sync(timeout=10)
        assert [e["text"] for e in log.events_sync("s_1")][:1] == ["late"] and log.dropped == 0
    finally:
        log.close()


def test_an_unreachable_database_fails_the_constructor() -> None:
    from tests.helpers import free_port

    with pytest.raises(psycopg.OperationalError):
        PgEventLog(f"postgresql://nobody@127.0.0.1:{free_port()}/none", connect_timeout_s=2)


@pytest.mark.slow
def test_a_postgresql_restart_costs_no_entry_and_an_outage_only_what_was_written_during_it() -> None:
    with postgres_server() as server:  # its own server: this test stops it
        log = PgEventLog(server.new_database(), batch_interval_s=0)
        try:
            log.append(entry(text="before"))
            assert log.flush_sync(timeout=10)
            server.ctl("restart", "-m", "fast")
            # The writer finds its connection broken, reconnects and writes the entry.
            log.append(entry(text="after a restart"))
            assert log.flush_sync(timeout=30)
            assert log.dropped == 0
            server.ctl("stop", "-m", "fast")
            log.append(entry(text="lost while down"))
            assert log.flush_sync(timeout=30)  # refused at once, not hung
            assert log.dropped == 1
            server.ctl("start")
            tries = iter(range(1_000))

            def written_again() -> bool:
                before = log.written
                log.append(entry(text=f"back-{next(tries)}"))
                assert log.flush_sync(timeout=30)
                return log.written > before

            wait_until_sync(written_again, timeout=30, interval=0.2, message="the writer reconnects")
            texts = [e["text"] for e in log.events_sync("s_1")]
        finally:
            log.close()
    assert texts[:2] == ["before", "after a restart"] and texts[-1].startswith("back-")
    assert "lost while down" not in texts
