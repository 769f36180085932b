"""Property tests: random command sequences against the service keep the workflow's invariants.

- a patient waits in at most one queue, and queue order, entries and the patient index agree;
- durations are never negative (even when the clock steps back);
- a completed (or journalled) consultation has an end time.
Commands that are illegal at that moment must fail with a coded RoomsError, never anything else.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rooms import chat
from rooms.consultation import Consultation
from rooms.consultation import State as C
from rooms.errors import RoomsError
from rooms.model import Role, SessionId
from rooms.permissions import Actor
from rooms.service import CONSULTATION, ENTRY, PATIENT, ROOM, WorkflowService
from rooms.store import MemoryStore
from rooms.waiting_room import QueueEntry, WaitingRoom
from rooms.waiting_room import State as Q
from tests.rooms.scenario import CARDIO, CLIN, CLIN2, MIN, ORG_ADMIN, T0, rooms

PATIENTS = ["pa", "pb", "pc"]
ROOMS = ["cardio", "cardio2", "q_hansen"]
OPS = ["book", "invite", "ready", "enter", "walk_in", "admit", "abandon", "remove", "transfer", "end",
       "complete", "journal", "phone", "cancel", "no_show", "chat"]

# An op, or "next" (the natural next step for that patient) so that deep states are reached often.
command = st.tuples(
    st.sampled_from(["next"] * len(OPS) + OPS),
    st.integers(0, len(PATIENTS) - 1),
    st.integers(0, len(ROOMS) - 1),
    st.booleans(),
    st.integers(-2 * MIN, 10 * MIN),
)


async def natural_next(svc: WorkflowService, sid: SessionId, ri: int, alt: bool) -> str:
    """The step a real clinic would take next for this session."""
    c = await svc.store.get(CONSULTATION, sid)
    if c is None:
        return "walk_in" if alt else "book"
    state = C(c.body["state"])
    if state is C.PATIENT_READY:
        e = await svc.store.get(ENTRY, sid)
        if e is None or e.body["state"] != Q.WAITING.value:
            return "enter"
        return ["admit", "transfer", "abandon"][ri] if alt else "admit"
    return {
        C.BOOKED: "invite", C.INVITED: "ready", C.IN_PROGRESS: "phone" if alt and ri == 0 else "end",
        C.ENDED: "complete", C.PHONE: "complete", C.COMPLETED: "journal",
    }.get(state, "walk_in" if alt else "book")


async def check_invariants(store: MemoryStore) -> None:
    rooms_ = [WaitingRoom.from_doc(d.body) for k in await store.keys(ROOM) if (d := await store.get(ROOM, k))]
    entries = {k: QueueEntry.from_doc(d.body) for k in await store.keys(ENTRY) if (d := await store.get(ENTRY, k))}
    cons = {k: Consultation.from_doc(d.body) for k in await store.keys(CONSULTATION)
            if (d := await store.get(CONSULTATION, k))}
    queued = [(sid, r.room_id) for r in rooms_ for sid in r.waiting]
    # Every queued session is a WAITING entry in that room, a ready consultation, listed once.
    assert len({sid for sid, _ in queued}) == len(queued)
    for sid, room_id in queued:
        assert entries[sid].state is Q.WAITING and entries[sid].room_id == room_id
        assert cons[sid].state is C.PATIENT_READY
    waiting_entries = {sid for sid, e in entries.items() if e.state is Q.WAITING}
    assert waiting_entries == {sid for sid, _ in queued}
    # A patient is in at most one queue; the index names exactly that session.
    per_patient = Counter(entries[sid].patient_ref for sid, _ in queued)
    assert all(n == 1 for n in per_patient.values()), per_patient
    for ref in await store.keys(PATIENT):
        doc = await store.get(PATIENT, ref)
        assert doc is not None
        indexed = doc.body["session_id"]
        mine = [sid for sid, _ in queued if entries[sid].patient_ref == ref]
        assert mine == ([] if indexed is None else [indexed])
    for c in cons.values():
        assert c.duration_ms is None or c.duration_ms >= 0
        if c.state in (C.COMPLETED, C.JOURNAL_DONE, C.ENDED, C.PHONE):
            assert c.ended_ms is not None
    for e in entries.values():
        assert all((s.waited_ms or 0) >= 0 for s in e.segments)
        assert e.waited_ms >= 0


async def run(commands: list[tuple[str, int, int, bool, int]]) -> None:
    store = MemoryStore()
    svc = WorkflowService(store)
    await rooms(svc)
    latest: dict[str, SessionId] = {}
    now = T0 - 30 * MIN
    for op, pi, ri, alt, dt in commands:
        now = max(0, now + dt)
        ref = PATIENTS[pi]
        pat = Actor(Role.PATIENT, ref)
        clin = CLIN2 if alt else CLIN
        sid = latest.get(ref, SessionId("s_none"))
        if op == "next":
            op = await natural_next(svc, sid, ri, alt)
            alt = alt and op != "enter"
        try:
            if op == "book":
                c = (await svc.book(clin, department=CARDIO, clinician=None, patient_ref=ref,
                                    appointment_ms=now + 10 * MIN, now_ms=now)).value
                latest[ref] = c.session_id
            elif op == "invite":
                await svc.invite(clin, sid, now_ms=now)
            elif op == "ready":
                c = await svc.consultation(pat, sid)
                await svc.patient_ready(pat, sid, token=c.link_token or "", device_check_passed=True, now_ms=now)
            elif op == "enter":
                await svc.enter_waiting_room(pat if alt else clin, sid, room_id=ROOMS[ri], now_ms=now)
            elif op == "walk_in":
                latest[ref] = (await svc.walk_in(pat, room_id=ROOMS[ri], now_ms=now)).value.session_id
            elif op == "admit":
                await svc.admit(clin, sid, now_ms=now)
            elif op == "abandon":
                await svc.abandon(pat, sid, now_ms=now)
            elif op == "remove":
                await svc.remove(ORG_ADMIN, sid, now_ms=now)
            elif op == "transfer":
                await svc.transfer(clin, sid, to_room_id=ROOMS[ri], now_ms=now)
            elif op in ("end", "complete", "journal", "cancel", "no_show"):
                await getattr(svc, op)(clin, sid, now_ms=now)
            elif op == "phone":
                await svc.phone_fallback(clin, sid, now_ms=now)
            elif op == "chat":
                await svc.send_chat(pat, chat.consultation_channel_id(sid), "<b>hi</b>", now_ms=now)
        except RoomsError as err:
            assert err.code in {"invalid_state", "not_found", "forbidden", "invalid_input", "conflict",
                                "too_early", "too_late", "invalid_token"}
        await check_invariants(store)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(command, max_size=40))
def test_random_workflows_keep_invariants(commands: list[tuple[str, int, int, bool, int]]) -> None:
    asyncio.run(run(commands))
