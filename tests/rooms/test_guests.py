"""Guests on the consultation record and in the service: the states that take them, the bounds,
removal, the door check at join, the link window, and the record's round trip through a store."""

from __future__ import annotations

import pytest

from rooms.consultation import GUEST_STATES, GUESTS_ACTIVE_MAX, GUESTS_MAX, Consultation, Guest, State
from rooms.errors import Forbidden, InvalidGuest, InvalidInput, NotFound, TooLate
from rooms.model import SessionId
from rooms.service import WorkflowConfig, WorkflowService
from rooms.store import MemoryStore
from tests.rooms.scenario import CLIN, MIN, T0, rooms, waiting


def record(state: State) -> Consultation:
    return Consultation(SessionId("s_1"), "cardiology", None, "p1", T0, state, T0)


@pytest.mark.parametrize("state", list(State), ids=str)
def test_guests_are_added_only_while_a_call_is_ahead_or_on(state: State) -> None:
    guest = Guest("g_1", "Ida", "dr", T0)
    if state in GUEST_STATES:
        assert record(state).add_guest(guest).guests == (guest,)
    else:
        with pytest.raises(InvalidGuest, match=f'in state "{state}"'):
            record(state).add_guest(guest)


def test_guests_are_bounded_at_once_and_over_the_consultations_life() -> None:
    c = record(State.IN_PROGRESS)
    for i in range(GUESTS_ACTIVE_MAX):
        c = c.add_guest(Guest(f"g_{i}", "G", "dr", T0))
    with pytest.raises(InvalidGuest, match="the most allowed; remove one first"):
        c.add_guest(Guest("g_x", "G", "dr", T0))
    n = GUESTS_ACTIVE_MAX
    while len(c.guests) < GUESTS_MAX:
        c = c.remove_guest(f"g_{len(c.guests) - GUESTS_ACTIVE_MAX}", "dr", T0).add_guest(Guest(f"g_{n}", "G", "dr", T0))
        n += 1
    c = c.remove_guest(f"g_{len(c.guests) - GUESTS_ACTIVE_MAX}", "dr", T0)
    with pytest.raises(InvalidGuest, match=f"has had {GUESTS_MAX} guests"):
        c.add_guest(Guest("g_y", "G", "dr", T0))


def test_removing_stamps_the_guest_once_and_survives_a_round_trip() -> None:
    c = record(State.BOOKED).add_guest(Guest("g_1", "Ida", "dr", T0)).add_guest(Guest("g_2", "Rolf", "dr", T0))
    c = c.remove_guest("g_1", "dr_hansen", T0 + MIN)
    assert [(g.guest_id, g.active, g.removed_by) for g in c.guests] == [("g_1", False, "dr_hansen"), ("g_2", True, None)]
    with pytest.raises(InvalidGuest, match="removed already"):
        c.remove_guest("g_1", "dr", T0)
    with pytest.raises(NotFound):
        c.remove_guest("g_3", "dr", T0)
    assert Consultation.from_doc(c.to_doc()) == c
    old = c.to_doc()
    del old["guests"]  # a record from before guests existed
    assert Consultation.from_doc(old).guests == ()


async def test_the_service_adds_checks_and_removes_a_guest() -> None:
    svc = WorkflowService(MemoryStore(), WorkflowConfig())
    await rooms(svc)
    sid = await waiting(svc)
    with pytest.raises(InvalidInput):
        await svc.invite_guest(CLIN, sid, name="   ", now_ms=T0)
    c, guest = (await svc.invite_guest(CLIN, sid, name=" Ida ", now_ms=T0)).value
    assert guest.name == "Ida" and (await svc.check_guest(sid, guest.guest_id)) == guest
    with pytest.raises(Forbidden, match="was not issued"):
        await svc.check_guest(sid, "g_forged")
    with pytest.raises(Forbidden, match="was not issued"):
        await svc.check_guest(SessionId("s_none"), guest.guest_id)
    await svc.remove_guest(CLIN, sid, guest.guest_id, now_ms=T0 + MIN)
    with pytest.raises(Forbidden, match="was revoked"):
        await svc.check_guest(sid, guest.guest_id)
    # The window: around the appointment; past it a booked consultation takes no guest; a call on does.
    assert svc.guest_window(c, T0, 4 * 60 * MIN) == (T0 - 60 * MIN, T0 + 60 * MIN)
    with pytest.raises(TooLate):
        svc.guest_window(c, T0 + 61 * MIN, 4 * 60 * MIN)
    await svc.admit(CLIN, sid, now_ms=T0 + 2 * MIN)
    on = await svc.consultation(CLIN, sid)
    assert svc.guest_window(on, T0 + 90 * MIN, 4 * 60 * MIN) == (T0 + 90 * MIN, T0 + 330 * MIN)
    # Over: no guest link works any more.
    second = (await svc.invite_guest(CLIN, sid, name="Rolf", now_ms=T0 + 3 * MIN)).value[1]
    await svc.end(CLIN, sid, now_ms=T0 + 10 * MIN)
    with pytest.raises(Forbidden, match="no longer work"):
        await svc.check_guest(sid, second.guest_id)
