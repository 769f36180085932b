"""The event log loses nothing it should keep: hostile strings and payloads are made safe
where they are stored, a write SQLite refuses costs only the entries that fail on their own,
and ``committed()`` tells a request when what it logged is on disk (group commit)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics import prometheus
from metrics.eventlog import EventLog, EventStore
from metrics.eventlog_pg import PgEventLog
from metrics.events import (
    MAX_NAME_CHARS,
    MAX_PAYLOAD_DEPTH,
    MAX_TEXT_CHARS,
    TOO_DEEP,
    TRUNCATED,
    EventKind,
    LogEntry,
    safe_payload,
    safe_text,
    token_rejected,
)
from tests.metrics.conftest import BACKENDS, LogFactory

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
CONTROLS = ["\x00", "\x01", "\x1b", "\r", "\x7f", "\x85", "\x9f"]


def entry(text: str = "x", session_id: str = "s_1", **kwargs: Any) -> LogEntry:
    fields: dict[str, Any] = {"time_ms": 1_000, "kind": EventKind.CLIENT_EVENT, **kwargs}
    return LogEntry(session_id=session_id, text=text, **fields)


def refused_total() -> float:
    value = prometheus.REGISTRY.get_sample_value("openconsult_eventlog_entries_dropped_total",
                                                 {"reason": "write_failed"})
    assert value is not None
    return value


def is_safe(text: str) -> bool:
    """Encodable as UTF-8 and free of control characters other than tab and newline."""
    text.encode("utf-8")  # raises on a lone surrogate
    return all(c in "\t\n" or not (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) for c in text)


def all_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from all_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from all_strings(item)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


# --- made safe at the boundary ------------------------------------------------------------


def test_safe_text_replaces_surrogates_and_controls_and_keeps_tab_and_newline() -> None:
    assert safe_text("a\ud800b\x00c\x1b[31md\re\x85f\tg\nh") == "a\ufffdb\ufffdc\ufffd[31md\ufffde\ufffdf\tg\nh"
    assert safe_text("Zoë 👩‍⚕️ 漢字") == "Zoë 👩‍⚕️ 漢字"  # real text passes untouched
    assert safe_text("x" * (MAX_TEXT_CHARS + 1)) == "x" * MAX_TEXT_CHARS + TRUNCATED
    assert safe_text("x" * MAX_TEXT_CHARS) == "x" * MAX_TEXT_CHARS
    assert safe_text(EventKind.CHAT) == "Chat" and type(safe_text(EventKind.CHAT)) is str
    assert safe_text(Unprintable()) == "<unprintable: RuntimeError>"


def test_safe_payload_makes_every_key_and_value_json_ready() -> None:
    cyclic: dict[str, Any] = {"name": "loop"}
    cyclic["self"] = cyclic
    payload = {
        "\ud800key": ["\udfff", {"deep\x00": "v\x1b"}],
        1: "int key",
        ("t", 1): "tuple key",
        "nan": math.nan, "inf": -math.inf, "huge": 10**40, "small": -(2**63),
        "set": {1}, "path": Path("/x"), "bad": Unprintable(), "none": None, "yes": True,
        "cyclic": cyclic,
    }  # fmt: skip
    safe = safe_payload(payload)
    json.dumps(safe, allow_nan=False).encode("utf-8")  # JSON, UTF-8: nothing left to fail
    assert safe["\ufffdkey"] == ["\ufffd", {"deep\ufffd": "v\ufffd"}]
    assert (safe["1"], safe["('t', 1)"]) == ("int key", "tuple key")
    assert (safe["nan"], safe["inf"], safe["huge"], safe["small"]) == ("nan", "-inf", "<integer of 133 bits>", -(2**63))
    assert (safe["set"], safe["path"], safe["bad"], safe["none"], safe["yes"]) == (
        "{1}", "/x", "<unprintable: RuntimeError>", None, True)
    levels, node = 2, safe["cyclic"]  # the payload itself, then "cyclic"
    while isinstance(node["self"], dict):
        levels, node = levels + 1, node["self"]
    assert (levels, node["self"]) == (MAX_PAYLOAD_DEPTH, TOO_DEEP)
    assert safe_payload(["not", "a", "mapping"]) == {"value": ["not", "a", "mapping"]}


def test_payload_size_is_bounded() -> None:
    safe = safe_payload({"many": list(range(50_000)), "after": 1})
    assert len(safe["many"]) < 50_000 and safe["many"][-1].startswith(TRUNCATED)
    assert safe["…(truncated)"] == "1 more left out"


def test_token_rejected_with_a_hostile_header_is_safe() -> None:
    e = token_rejected("\ud800\udfffAB.x", 'token algorithm "\ud800" is not the configured HS256',
                       room="r\x00" + "o" * 1_000, code="unauthorized")
    for text in [e.text, e.session_id, *all_strings(dict(e.payload))]:
        assert is_safe(text)
    assert e.text == 'Failed to get valid token for token: \ufffd\ufffdAB…(truncated): token algorithm "\ufffd" is not the configured HS256'
    assert len(e.session_id) < MAX_NAME_CHARS + 20


# --- one bad entry never costs another ----------------------------------------------------


def test_a_poisoned_batch_keeps_every_other_entry(logs: LogFactory) -> None:
    # A real per-entry refusal from the store: a trigger that aborts some inserts.
    event_log = logs.open(batch_interval_s=60.0)  # everything lands in one batch
    logs.refuse_texts_like("%refuse-me%")
    poison = [
        entry("lone \ud800 surrogate"),
        entry("ok", session_id="s_1", connection_id="c_\udfff", stream_id="\udc00", kind="kind\ud800",
              component="client\x00"),
        entry("ok", payload={"\ud800": {"nested": ["\udfff", "\x00"]}}),
        entry("nul \x00 esc \x1b cr \r tab \t nl \n"),
        entry("unserialisable", payload={"bad": Unprintable(), "set": {1, 2}, "nan": math.nan}),
        entry("h" * 1_000_000),
        entry("refuse-me 1"),
        entry("refuse-me 2", payload={"\ud800": 1}),
        entry("refuse-me 3"),
    ]
    normal = [entry(f"normal-{i}", payload={"i": i}) for i in range(300)]
    batch = list(itertools.chain.from_iterable(zip(normal[:len(poison)], poison))) + normal[len(poison):]
    refused_before = refused_total()
    try:
        event_log.extend(batch)
        assert event_log.flush_sync(timeout=30)
        rows = event_log.events_sync("s_1", limit=1_000)
    finally:
        event_log.close()
    kept = [e for e in batch if "refuse-me" not in e.text]
    assert [r["text"] for r in rows] == [e.made_safe().text for e in kept]
    assert [r["payload"] for r in rows] == [e.made_safe().payload for e in kept]
    assert event_log.dropped == 3 and event_log.written == len(batch) - 3
    assert refused_total() - refused_before == 3
    for row in rows:
        for text in [row["text"], row["kind"], row["component"], row["connection_id"] or "", row["stream_id"] or "",
                     *all_strings(row["payload"])]:
            assert is_safe(text)
    def starting(prefix: str) -> dict[str, Any]:
        return next(r for r in rows if r["text"].startswith(prefix))

    assert starting("lone")["text"] == "lone \ufffd surrogate"
    assert starting("nul")["text"] == "nul \ufffd esc \ufffd cr \ufffd tab \t nl \n"
    assert starting("hhh")["text"] == "h" * MAX_TEXT_CHARS + TRUNCATED
    assert starting("unserialisable")["payload"] == {"bad": "<unprintable: RuntimeError>", "set": "{1, 2}",
                                                     "nan": "nan"}
    assert [(r["kind"], r["component"], r["connection_id"], r["stream_id"]) for r in rows if r["kind"] != "clientEvent"] \
        == [("kind\ufffd", "client\ufffd", "c_\ufffd", "\ufffd")]


def test_a_forced_failure_costs_only_the_failing_entries(logs: LogFactory) -> None:
    tries: list[int] = []

    def failing_disk(part: Sequence[LogEntry]) -> None:
        tries.append(len(part))
        if any(e.text.startswith("poison") for e in part):
            raise sqlite3.OperationalError("disk I/O error")

    event_log = logs.open(batch_interval_s=60.0, before_write=failing_disk)
    texts = [f"poison-{i}" if i in (0, 500, 501, 1_023) else f"ok-{i}" for i in range(1_024)]
    refused_before = refused_total()
    try:
        event_log.extend(entry(t) for t in texts)
        assert event_log.flush_sync(timeout=30)
        rows = event_log.events_sync("s_1", limit=2_000)
    finally:
        event_log.close()
    assert [r["text"] for r in rows] == [t for t in texts if t.startswith("ok")]
    assert event_log.dropped == 4 and refused_total() - refused_before == 4
    assert len(tries) < 100  # bisected, not retried one entry at a time


# --- a hypothesis property: anything appended is read back, made safe -----------------------

hostile_chars = st.one_of(st.characters(), st.sampled_from(SURROGATES + CONTROLS))
hostile_text = st.text(hostile_chars, max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text)
payloads = st.dictionaries(
    hostile_text,
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
                 max_leaves=20),
    max_size=6,
)
entries = st.builds(
    LogEntry,
    time_ms=st.integers(0, 2**53),
    session_id=hostile_text,
    connection_id=st.none() | hostile_text,
    stream_id=st.none() | hostile_text,
    kind=st.sampled_from(list(EventKind)) | hostile_text,
    text=st.text(hostile_chars, max_size=5_000),
    payload=payloads,
)


@pytest.fixture(scope="module", params=BACKENDS)
def hypothesis_log(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventStore]:
    """One log per backend for every example (emptied by each example: a store per example would
    make a PostgreSQL database per example)."""
    log: EventStore
    if request.param == "sqlite":
        log = EventLog(tmp_path_factory.mktemp("hypothesis") / "events.db")
    else:
        log = PgEventLog(request.getfixturevalue("pg_srv").new_database())
    yield log
    log.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(entries, min_size=1, max_size=8))
def test_anything_appended_is_read_back_made_safe(hypothesis_log: EventStore, batch: list[LogEntry]) -> None:
    event_log = hypothesis_log
    dropped = event_log.dropped
    event_log.delete_before_sync(2**63 - 1)
    event_log.extend(batch)
    assert event_log.flush_sync(timeout=30)
    sessions = {e.made_safe().session_id for e in batch}
    rows = [r for s in sorted(sessions) for r in event_log.events_sync(s)]
    assert event_log.dropped == dropped
    expected = sorted((e.made_safe() for e in batch), key=lambda e: (e.session_id, e.time_ms))
    got = sorted(rows, key=lambda r: (r["session_id"], r["time_ms"], r["seq"]))
    assert [(r["session_id"], r["time_ms"], r["kind"], r["text"], r["connection_id"], r["stream_id"], r["payload"])
            for r in got] == [(e.session_id, e.time_ms, e.kind, e.text, e.connection_id, e.stream_id, e.payload)
                              for e in _stable(expected, batch)]
    for row in rows:
        for text in [row["session_id"], row["kind"], row["text"], *all_strings(row["payload"])]:
            assert is_safe(text)


def _stable(expected: list[LogEntry], batch: list[LogEntry]) -> list[LogEntry]:
    """Entries with equal session and time come back in insertion order: sort stably."""
    order = {id(e): i for i, e in enumerate(batch)}
    made = [(e.made_safe(), order[id(e)]) for e in batch]
    made.sort(key=lambda pair: (pair[0].session_id, pair[0].time_ms, pair[1]))
    assert [m.session_id for m, _ in made] == [e.session_id for e in expected]
    return [m for m, _ in made]


# --- committed(): a reply waits for its entries' commit -------------------------------------


async def test_committed_resolves_once_the_entry_is_on_disk(logs: LogFactory) -> None:
    # A minute-long batch window: only the waiter makes the writer commit now.
    event_log = logs.open(batch_interval_s=60.0)
    try:
        assert event_log.appended == 0
        await asyncio.wait_for(event_log.committed(0), 10)  # nothing to wait for
        event_log.append(entry("acknowledged"))
        mark = event_log.appended
        assert mark == 1
        await asyncio.wait_for(event_log.committed(mark), 30)
        # Read without flushing: committed means another connection sees it.
        assert [e["text"] for e in event_log.events_sync("s_1")] == ["acknowledged"]
    finally:
        await event_log.aclose()


async def test_many_waiters_share_few_commits(logs: LogFactory) -> None:
    hold = threading.Event()
    batches: list[int] = []

    def slow_disk(part: Sequence[LogEntry]) -> None:
        batches.append(len(part))
        hold.wait(30)

    event_log = logs.open(batch_interval_s=60.0, before_write=slow_disk)
    seen: list[int] = []

    async def request(i: int) -> None:
        event_log.append(entry(f"r{i}", session_id=f"s_{i}"))
        await event_log.committed(event_log.appended)
        seen.append(len(event_log.events_sync(f"s_{i}")))

    try:
        tasks = [asyncio.create_task(request(i)) for i in range(50)]
        await asyncio.sleep(0)  # let every request append and start waiting
        assert not any(t.done() for t in tasks)
        hold.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        hold.set()
        await event_log.aclose()
    assert seen == [1] * 50  # each request's entry was on disk when it was released
    assert sum(batches) == 50 and len(batches) <= 3, batches


async def test_committed_since_waits_only_when_the_count_moved(logs: LogFactory) -> None:
    hold = threading.Event()
    event_log = logs.open(before_write=lambda part: hold.wait(30))
    try:
        event_log.append(entry("someone else's, stuck on a slow disk"))
        mark = event_log.appended
        await asyncio.wait_for(event_log.committed_since(mark), 10)  # nothing of ours: no wait
        event_log.append(entry("ours"))
        waiting = asyncio.create_task(event_log.committed_since(mark))
        await asyncio.sleep(0)
        assert not waiting.done()
        hold.set()
        await asyncio.wait_for(waiting, 30)
    finally:
        hold.set()
        await event_log.aclose()


async def test_waiters_never_hang_on_refused_dropped_or_closed(logs: LogFactory) -> None:
    hold = threading.Event()

    def disk(part: Sequence[LogEntry]) -> None:
        hold.wait(30)
        if any(e.text == "refused" for e in part):
            raise OSError("refused")

    event_log = logs.open(max_queue=5, batch_max=1, batch_interval_s=60.0, before_write=disk)
    try:
        event_log.append(entry("refused"))
        refused_mark = event_log.appended
        for i in range(20):  # the queue takes 5 (and the writer perhaps one more); the rest are dropped
            event_log.append(entry(f"e{i}"))
        assert 15 <= event_log.dropped <= 16
        assert event_log.appended == 21 - event_log.dropped  # dropped entries get no number
        waiters = [asyncio.create_task(event_log.committed(m)) for m in (refused_mark, event_log.appended)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        hold.set()
        await asyncio.wait_for(asyncio.gather(*waiters), 30)
        assert event_log.written == event_log.appended - 1  # the refused one is counted, not waited for
        # A waiter left when the log closes is released too.
        hold.clear()
        event_log.append(entry("pending at close"))
        at_close = asyncio.create_task(event_log.committed(event_log.appended))
        await asyncio.sleep(0)
        hold.set()
        await event_log.aclose()
        await asyncio.wait_for(at_close, 30)
        # After close nothing is numbered and nothing waits.
        mark = event_log.appended
        event_log.append(entry("after close"))
        assert event_log.appended == mark
        await asyncio.wait_for(event_log.committed(mark + 100), 10)
    finally:
        hold.set()
        await event_log.aclose()


def test_write_failures_are_warned_about_rate_limited(logs: LogFactory, caplog: pytest.LogCaptureFixture) -> None:
    def full_disk(part: Sequence[LogEntry]) -> None:
        raise OSError("No space left on device")

    event_log = logs.open(batch_interval_s=60.0, before_write=full_disk)
    try:
        with caplog.at_level("WARNING", logger="metrics.eventlog"):
            event_log.extend(entry(f"e{i}") for i in range(200))
            assert event_log.flush_sync(timeout=30)
    finally:
        event_log.close()
    assert event_log.dropped == 200
    # One line saying why, one saying what was lost: not one per entry.
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"Event-log writer could not write an entry to {logs.where}: ")
    assert messages[1].startswith(f"Dropping event-log entries for {logs.where}: ")


async def test_a_cancelled_waiter_costs_the_others_nothing(logs: LogFactory) -> None:
    hold = threading.Event()
    event_log = logs.open(before_write=lambda part: hold.wait(30))
    try:
        event_log.append(entry("first"))
        cancelled = asyncio.create_task(event_log.committed(event_log.appended))
        event_log.append(entry("second"))
        kept = asyncio.create_task(event_log.committed(event_log.appended))
        await asyncio.sleep(0)
        cancelled.cancel()
        hold.set()
        await asyncio.wait_for(kept, 30)
        assert cancelled.cancelled()
        assert [e["text"] for e in event_log.events_sync("s_1")] == ["first", "second"]
    finally:
        hold.set()
        await event_log.aclose()
