"""The store contract: the same tests against memory, SQLite and a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from rooms.store import Append, Check, Doc, Put, Store, StoreConflict


async def test_get_missing_is_none(store: Store) -> None:
    assert await store.get("room", "nope") is None
    assert await store.keys("room") == []
    assert await store.read_log("chat", "nope") == []


async def test_put_creates_then_versions_grow(store: Store) -> None:
    await store.commit([Put("room", "r1", {"name": "A", "n": [1, 2]}, 0)])
    assert await store.get("room", "r1") == Doc(1, {"name": "A", "n": [1, 2]})
    await store.commit([Put("room", "r1", {"name": "B"}, 1)])
    assert await store.get("room", "r1") == Doc(2, {"name": "B"})
    assert await store.keys("room") == ["r1"]


async def test_stale_version_refused_and_nothing_written(store: Store) -> None:
    await store.commit([Put("room", "r1", {"name": "A"}, 0)])
    with pytest.raises(StoreConflict) as err:
        await store.commit(
            [
                Put("room", "r2", {"name": "new"}, 0),
                Append("chat", "c1", {"time_ms": 1, "text": "x"}),
                Put("room", "r1", {"name": "stale"}, 0),
            ]
        )
    assert err.value.code == "conflict"
    assert (err.value.kind, err.value.key, err.value.expected, err.value.actual) == ("room", "r1", 0, 1)
    assert await store.get("room", "r2") is None
    assert await store.get("room", "r1") == Doc(1, {"name": "A"})
    assert await store.read_log("chat", "c1") == []
    assert await store.keys("room") == ["r1"]


async def test_check_guards_without_writing(store: Store) -> None:
    await store.commit([Put("channel", "c", {"open": True}, 0)])
    await store.commit([Check("channel", "c", 1), Append("chat", "c", {"time_ms": 5, "t": "a"})])
    assert await store.get("channel", "c") == Doc(1, {"open": True})
    with pytest.raises(StoreConflict):
        await store.commit([Check("channel", "c", 2), Append("chat", "c", {"time_ms": 6, "t": "b"})])
    assert await store.read_log("chat", "c") == [{"time_ms": 5, "t": "a"}]


async def test_logs_keep_order_and_trim(store: Store) -> None:
    for t in [10, 20, 30, 40]:
        await store.commit([Append("chat", "c", {"time_ms": t, "text": f"m{t}"})])
    await store.commit([Append("chat", "other", {"time_ms": 1, "text": "o"})])
    assert [m["time_ms"] for m in await store.read_log("chat", "c")] == [10, 20, 30, 40]
    assert await store.trim_log("chat", "c", 25) == 2
    assert [m["text"] for m in await store.read_log("chat", "c")] == ["m30", "m40"]
    assert await store.trim_log("chat", "c", None) == 2
    assert await store.read_log("chat", "c") == []
    assert await store.read_log("chat", "other") == [{"time_ms": 1, "text": "o"}]


async def test_values_round_trip_verbatim(store: Store) -> None:
    body = {"text": "<script>alert('x')</script> æøå 🙂", "none": None, "f": 1.5, "b": True, "nested": {"l": [1, "a"]}}
    await store.commit([Put("k", "key with spaces/and:colons", body, 0)])
    assert await store.get("k", "key with spaces/and:colons") == Doc(1, body)


async def test_bad_batches_rejected(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.commit([Put("a", "x", {}, 0), Put("a", "x", {}, 0)])
    with pytest.raises(ValueError):
        await store.commit([Append("chat", "x", {"no_time": 1})])
    assert await store.get("a", "x") is None


async def test_concurrent_compare_and_set_has_one_winner(store: Store) -> None:
    await store.commit([Put("entry", "s", {"state": "waiting"}, 0)])

    async def admit(who: str) -> str:
        try:
            await store.commit([Put("entry", "s", {"state": "admitted", "by": who}, 1)])
            return who
        except StoreConflict:
            return "lost"

    results = await asyncio.gather(*(admit(f"c{i}") for i in range(8)))
    winners = [r for r in results if r != "lost"]
    assert len(winners) == 1
    doc = await store.get("entry", "s")
    assert doc == Doc(2, {"state": "admitted", "by": winners[0]})
