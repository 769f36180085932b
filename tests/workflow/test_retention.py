"""The chat retention sweep (``delete_after_days``) as a scheduled job.

Unit level: the job over a real SqliteStore, with messages posted through the service at old
times and the job's clock injected (the service takes time as ``now_ms``). Server level: the job
runs on its schedule (``workflow.retention_sweep_s``) in a real server, its run history is served
to organisation admins only, and it stops with the server."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rooms.backoffice import BackofficeEntry
from rooms.chat import DAY_MS, Retention, RetentionKind
from rooms.model import Role, SessionId
from rooms.permissions import Actor
from rooms.service import Result, WorkflowConfig, WorkflowService
from rooms.sqlite_store import SqliteStore
from signalling.workflow import RetentionJob
from tests.helpers import wait_until
from tests.server import start_server
from tests.workflow.helpers import Clinic

T0 = 1_800_000_000_000  # "now" for the unit tests
ADMIN = Actor(Role.DEPARTMENT_ADMIN, "dana", frozenset({"cardio"}))
DOCTOR = Actor(Role.CLINICIAN, "dr-who", frozenset({"cardio"}))
PATIENT = Actor(Role.PATIENT, "p1")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "workflow.sqlite3")
    yield store
    await store.close()


def service(store: SqliteStore, days: int = 30) -> WorkflowService:
    return WorkflowService(store, WorkflowConfig(retention=Retention(RetentionKind.DELETE_AFTER_DAYS, days)))


class Recorder:
    """Stands in for ``Workflow.record``: keeps the entries each run hands over."""

    def __init__(self, delay: float = 0.0) -> None:
        self.entries: list[BackofficeEntry] = []
        self.delay = delay
        self.active = 0
        self.max_active = 0

    async def __call__(self, result: Result[int]) -> object:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
            self.entries.extend(result.entries)
            return result.value
        finally:
            self.active -= 1


async def chat_at(svc: WorkflowService, times_ms: list[int]) -> SessionId:
    """A booked consultation whose patient posted one message at each of ``times_ms``."""
    booked = await svc.book(ADMIN, department="cardio", clinician="dr-who", patient_ref="p1",
                            appointment_ms=T0, now_ms=min(times_ms))
    sid = booked.value.session_id
    for t in times_ms:
        await svc.send_chat(dataclasses.replace(PATIENT, consultation=sid), f"consultation:{sid}", f"message at {t}", now_ms=t)
    return sid


async def test_a_run_deletes_what_is_older_than_n_days(store: SqliteStore) -> None:
    svc = service(store)
    old, edge, fresh = T0 - 40 * DAY_MS, T0 - 30 * DAY_MS + 1, T0 - DAY_MS
    sid = await chat_at(svc, [old, old + 1, edge, fresh])
    recorder = Recorder()
    job = RetentionJob(svc, recorder, 3600, clock=lambda: T0)
    run = await job.run_once()
    assert (run.ok, run.deleted, run.error, run.started_ms) == (True, 2, None, T0)
    assert run.duration_ms >= 0
    left = await svc.chat_history(DOCTOR, f"consultation:{sid}")
    assert [m.time_ms for m in left] == [edge, fresh]
    assert [(str(e.kind), e.text, e.session_id) for e in recorder.entries] == [
        ("Chat", "2 chat messages older than 30 days were deleted (retention policy).", sid)]
    # Nothing more to delete: a second run succeeds with 0 and records nothing.
    again = await job.run_once()
    assert (again.ok, again.deleted) == (True, 0) and len(recorder.entries) == 1
    status = job.status()
    assert (status["enabled"], status["policy"], status["period_s"]) == \
        (True, {"kind": "delete_after_days", "days": 30}, 3600)
    assert [r["deleted"] for r in status["runs"]] == [0, 2]  # newest first


async def test_a_failed_run_is_recorded_and_the_job_goes_on(store: SqliteStore) -> None:
    svc = service(store)
    await chat_at(svc, [T0 - 40 * DAY_MS])
    calls = 0

    async def flaky(result: Result[int]) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("event log is full")
        return result.value

    job = RetentionJob(svc, flaky, 0.05, clock=lambda: T0)
    failed = await job.run_once()
    assert (failed.ok, failed.error) == (False, "OSError: event log is full")
    ok = await job.run_once()
    assert ok.ok and ok.deleted == 0  # the first run's delete did happen; only its record failed
    assert [r["ok"] for r in job.status()["runs"]] == [True, False]


async def test_the_schedule_never_overlaps_and_stops_cleanly(store: SqliteStore) -> None:
    svc = service(store)
    recorder = Recorder(delay=0.05)  # each run takes longer than the period
    job = RetentionJob(svc, recorder, 0.01, clock=lambda: T0)
    job.start()
    manual = asyncio.gather(*(job.run_once() for _ in range(3)))
    await wait_until(lambda: len(job.runs) >= 6, timeout=10, message="six runs")
    await manual
    await job.stop()
    assert recorder.max_active == 1
    count = len(job.runs)
    await asyncio.sleep(0.1)
    assert len(job.runs) == count and not job.running
    assert all(r.ok for r in job.runs)
    await job.stop()  # idempotent


async def test_other_policies_do_not_schedule_the_job(store: SqliteStore) -> None:
    svc = WorkflowService(store, WorkflowConfig())  # keep
    job = RetentionJob(svc, Recorder(), 0.01, clock=lambda: T0)
    job.start()
    await asyncio.sleep(0.05)
    await job.stop()
    assert job.status() == {"job": "chat_retention", "enabled": False, "running": False, "period_s": 0.01,
                            "policy": {"kind": "keep", "days": 0}, "data_policy": None, "runs": []}


SWEEPING = '[workflow]\nchat_retention = "delete_after_days"\nchat_retention_days = 1\nretention_sweep_s = 0.2\n'


async def test_the_server_runs_the_sweep_and_serves_its_history(tmp_path: Path) -> None:
    server = start_server(tmp_path / "sweep", extra_config=SWEEPING)
    clinic = Clinic.open(server)
    try:
        org = clinic.staff(Role.ORGANISATION_ADMIN, "olga")
        admin = clinic.tokens.mint("staff", Role.ADMIN, "root", sub="root")
        for token in (clinic.staff(Role.SUPPORT, "sue"), clinic.staff(Role.CLINICIAN, "dr", "cardio"),
                      clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")):
            status, body = await clinic.call("GET", "/api/jobs/retention", token)
            assert (status, body["error"]["code"]) == (403, "forbidden")
        status, body = await clinic.call("GET", "/api/jobs/retention", None)
        assert (status, body["error"]["code"]) == (401, "unauthorized")

        async def runs() -> list[dict[str, Any]]:
            data = await clinic.ok("GET", "/api/jobs/retention", org)
            assert (data["enabled"], data["period_s"], data["policy"]) == \
                (True, 0.2, {"kind": "delete_after_days", "days": 1})
            return list(data["runs"])

        seen: list[dict[str, Any]] = []
        for _ in range(100):
            seen = await runs()
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.1)
        assert len(seen) >= 3, seen
        assert all(r["ok"] and r["deleted"] == 0 and r["error"] is None for r in seen)
        starts = [r["started_ms"] for r in seen]
        assert starts == sorted(starts, reverse=True)
        assert all(a["started_ms"] >= b["finished_ms"] for a, b in itertools.pairwise(seen))  # never overlapping
        assert (await clinic.ok("GET", "/api/jobs/retention", admin))["runs"]
        assert server.stop(signal.SIGTERM) == 0
        assert "chat retention sweep: deleted 0 chat messages" in server.log_path.read_text()
        assert "did not stop" not in server.log_path.read_text()
    finally:
        await clinic.close()
        server.stop()


async def test_with_the_default_policy_the_job_is_off(tmp_path: Path) -> None:
    server = start_server(tmp_path / "keep")
    clinic = Clinic.open(server)
    try:
        data = await clinic.ok("GET", "/api/jobs/retention", clinic.staff(Role.ORGANISATION_ADMIN, "olga"))
        assert (data["enabled"], data["period_s"], data["runs"]) == (False, 3600.0, [])
    finally:
        await clinic.close()
        server.stop()
