"""The relayed-signalling benchmark's figures: percentiles per path, what the relay adds at p50 and p95 and
a table that leaves out what was not measured. No timing: figures come from running
benchmarks/cluster_join.py."""

from __future__ import annotations

from benchmarks.cluster_join import Samples, compare, format_table


def test_added_is_relayed_minus_direct() -> None:
    row = compare([float(v) for v in range(1, 101)], [float(v) + 10 for v in range(1, 101)])
    assert row["direct"]["p50"] == 50.5 and row["relayed"]["p50"] == 60.5
    assert row["direct"]["p95"] == 95.0 and row["relayed"]["p95"] == 105.0
    assert row["added_p50"] == 10.0 and row["added_p95"] == 10.0
    faster = compare([5.0, 5.0], [3.0, 3.0])
    assert faster["added_p95"] == -2.0  # noise can make the relayed path the quicker one


def test_added_is_none_without_samples_on_a_path() -> None:
    assert compare([], [1.0])["added_p95"] is None
    assert compare([1.0], [])["added_p95"] is None
    assert compare([], [])["added_p50"] is None


def test_table_prints_measured_rows_with_what_the_relay_adds_and_the_load() -> None:
    samples = Samples()
    for ms in (1.0, 2.0, 3.0):
        samples.add("direct", {"ping_ms": ms, "join_ms": 10 * ms})
        samples.add("relayed", {"ping_ms": ms + 4, "join_ms": 10 * ms + 4})
    table = format_table(samples).splitlines()
    rows = {line[:24].strip(): line.split() for line in table[1:-1]}
    assert set(rows) == {"ping", "join (socket open)"}  # first frame etc. were not measured
    assert rows["ping"][-2:] == ["+4.0", "+4.0"] and rows["ping"][1] == "3"
    assert table[-1].startswith("host: ") and "load average" in table[-1]
    assert len(samples.load) == 6
