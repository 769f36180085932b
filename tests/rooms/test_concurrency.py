"""Concurrency: two store clients on one backing store, racing the same workflow commands."""

from __future__ import annotations

import asyncio

from rooms.errors import RoomsError
from rooms.model import Role, SessionId
from rooms.permissions import Actor
from rooms.service import WorkflowService
from rooms.store import Store
from rooms.waiting_room import State as Q
from tests.rooms.scenario import CLIN, CLIN2, T0, rooms, waiting


async def _outcome(coro: object) -> str:
    try:
        await coro  # type: ignore[misc]
        return "won"
    except RoomsError as err:
        return err.code


async def test_two_clients_admitting_one_patient_have_one_winner(store_pair: tuple[Store, Store]) -> None:
    a, b = WorkflowService(store_pair[0]), WorkflowService(store_pair[1])
    await rooms(a)
    sessions = [await waiting(a, f"p{i}") for i in range(6)]
    for sid in sessions:
        results = await asyncio.gather(
            _outcome(a.admit(CLIN, sid, now_ms=T0)), _outcome(b.admit(CLIN2, sid, now_ms=T0)),
            _outcome(b.admit(CLIN, sid, now_ms=T0)),
        )
        assert sorted(results) == ["invalid_state", "invalid_state", "won"], results
        entry = await b.queue_entry(CLIN, sid)
        assert entry.state is Q.ADMITTED and entry.admitted_by in ("dr_hansen", "dr_berg")
    assert (await a.waiting_room(CLIN, "cardio")).waiting == ()


async def test_concurrent_entries_keep_every_patient_once(store_pair: tuple[Store, Store]) -> None:
    a, b = WorkflowService(store_pair[0]), WorkflowService(store_pair[1])
    await rooms(a)

    async def walk(svc: WorkflowService, i: int) -> None:
        await svc.walk_in(Actor(Role.PATIENT, f"w{i}"), room_id="cardio", now_ms=T0 + i)

    await asyncio.gather(*(walk(a if i % 2 else b, i) for i in range(10)))
    room = await a.waiting_room(CLIN, "cardio")
    assert len(room.waiting) == 10 and len(set(room.waiting)) == 10


async def test_one_patient_racing_into_two_queues_waits_in_one(store_pair: tuple[Store, Store]) -> None:
    a, b = WorkflowService(store_pair[0]), WorkflowService(store_pair[1])
    await rooms(a)
    pat = Actor(Role.PATIENT, "racer")
    results = await asyncio.gather(
        _outcome(a.walk_in(pat, room_id="cardio", now_ms=T0)),
        _outcome(b.walk_in(pat, room_id="cardio2", now_ms=T0)),
    )
    assert sorted(results) == ["conflict", "won"]
    rooms_waiting = [(await a.waiting_room(CLIN, r)).waiting for r in ("cardio", "cardio2")]
    assert sum(len(w) for w in rooms_waiting) == 1
    sid = SessionId(next(s for w in rooms_waiting for s in w))
    assert (await b.queue_entry(pat, sid)).state is Q.WAITING
