"""The inspector routes over a real server: /quality serves the raw samples or their roll-ups
(``resolution``, ``max_points``), refuses bad parameters with a coded error, and /summary and
/diagnosis (read from the roll-ups) equal what the same rules give over the raw entries. The
module runs once per event-log backend (a SQLite file in the data dir, or ``[eventlog] url`` on a
real PostgreSQL)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from metrics.diagnosis import diagnose
from metrics.eventlog import EventLog, EventStore
from metrics.eventlog_pg import PgEventLog
from metrics.summary import summary
from rooms.model import Role
from tests.metrics.conftest import BACKENDS
from tests.metrics.test_diagnosis import SID
from tests.metrics.test_rollup import random_call, to_entry
from tests.server import ServerProcess, start_server


@dataclass(frozen=True)
class Served:
    """The server and the URL of its event log in PostgreSQL ("" for its SQLite file)."""

    proc: ServerProcess
    eventlog_url: str


def open_log(proc: ServerProcess, url: str) -> EventStore:
    """The server's own event log: its SQLite file, or the PostgreSQL database it writes to."""
    return PgEventLog(url) if url else EventLog(proc.data_dir / "events.sqlite3")


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    url = request.getfixturevalue("pg_srv").new_database() if request.param == "postgresql" else ""
    config = f'[eventlog]\nurl = "{url}"\n' if url else ""
    proc = start_server(tmp_path_factory.mktemp("quality_route"), config)
    try:
        # A finished ten-minute call of three, written into the server's own event log.
        eventlog = open_log(proc, url)
        try:
            eventlog.extend(to_entry(e) for e in random_call(11).entries)
            assert eventlog.flush_sync(timeout=60)
        finally:
            eventlog.close()
        yield Served(proc, url)
    finally:
        proc.stop()


def get(served: Served, what: str) -> tuple[int, Any]:
    from tests.call_helpers import authority

    server = served.proc
    token = authority(server.data_dir).mint("support", Role.SUPPORT, "Support")
    request = urllib.request.Request(f"{server.url}/api/sessions/{SID}/{what}",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


SAMPLES = 300 * 15  # 300 ticks of 15 tracks (metrics/test_rollup.random_call)


@pytest.mark.parametrize(("query", "resolution", "points"), [
    ("", "raw", SAMPLES),  # under the default max_points: the raw samples
    ("?resolution=raw&max_points=10", "raw", SAMPLES),
    ("?max_points=1000", 10, None),  # too many raw samples: the finest roll-ups that fit
    ("?max_points=200", 60, None),
    ("?resolution=60", 60, None),
    ("?resolution=3599", 900, None),  # rounded down to a stored resolution
])
def test_quality_serves_raw_samples_or_rollups(server: Served, query: str, resolution: Any,
                                               points: int | None) -> None:
    status, body = get(server, "quality" + query)
    assert status == 200, body
    assert body["resolution"] == resolution
    samples = body["samples"]
    if resolution == "raw":
        assert len(samples) == points and all("samples" not in s for s in samples)
    else:
        assert sum(s["samples"] for s in samples) == SAMPLES
        assert {s["interval_s"] for s in samples} == {resolution}
        assert len(samples) <= 1000 and {"bitrate_kbps", "loss_max_pct", "quality_score"} <= set(samples[0])


@pytest.mark.parametrize(("query", "name"), [
    ("?resolution=abc", "resolution"), ("?resolution=5", "resolution"), ("?resolution=%C2%B2", "resolution"),
    ("?max_points=0", "max_points"), ("?max_points=100001", "max_points"),
])
def test_quality_refuses_bad_parameters(server: Served, query: str, name: str) -> None:
    status, body = get(server, "quality" + query)
    assert status == 400 and body["error"]["code"] == "invalid_message" and f'"{name}"' in body["error"]["message"]


def test_summary_and_diagnosis_from_rollups_equal_the_raw_computation(server: Served) -> None:
    reader = open_log(server.proc, server.eventlog_url)
    try:
        raw = reader.events_sync(SID, limit=1_000_000)
    finally:
        reader.close()
    status, served = get(server, "diagnosis")
    assert status == 200 and served == diagnose(SID, raw)
    assert {"high_loss", "high_jitter", "high_rtt"} <= {f["type"] for f in served["findings"]}
    status, served = get(server, "summary")
    assert status == 200 and served == json.loads(json.dumps(summary(SID, raw)))
