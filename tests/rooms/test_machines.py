"""Every (state, event) pair of every machine: allowed pairs reach the table's state, others raise."""

from __future__ import annotations

import itertools
from enum import StrEnum
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rooms import announcement, chat, consultation, waiting_room
from rooms.errors import InvalidTransition, RoomsError

MACHINES: list[ModuleType] = [consultation, waiting_room, chat, announcement]

# The expected tables, written out independently of the modules so a slip in either shows.
C, CE = consultation.State, consultation.Event
W, WE = waiting_room.State, waiting_room.Event
H, HE = chat.State, chat.Event
A, AE = announcement.State, announcement.Event
EXPECTED: dict[str, dict[tuple[Any, Any], Any]] = {
    "consultation": {
        (C.BOOKED, CE.INVITE): C.INVITED,
        (C.BOOKED, CE.CANCEL): C.CANCELLED,
        (C.BOOKED, CE.NO_SHOW): C.NO_SHOW,
        (C.BOOKED, CE.PHONE_FALLBACK): C.PHONE,
        (C.INVITED, CE.INVITE): C.INVITED,
        (C.INVITED, CE.PATIENT_READY): C.PATIENT_READY,
        (C.INVITED, CE.CANCEL): C.CANCELLED,
        (C.INVITED, CE.NO_SHOW): C.NO_SHOW,
        (C.INVITED, CE.PHONE_FALLBACK): C.PHONE,
        (C.PATIENT_READY, CE.PATIENT_READY): C.PATIENT_READY,
        (C.PATIENT_READY, CE.PATIENT_LEFT): C.INVITED,
        (C.PATIENT_READY, CE.ADMIT): C.IN_PROGRESS,
        (C.PATIENT_READY, CE.CANCEL): C.CANCELLED,
        (C.PATIENT_READY, CE.PHONE_FALLBACK): C.PHONE,
        (C.IN_PROGRESS, CE.END): C.ENDED,
        (C.IN_PROGRESS, CE.PHONE_FALLBACK): C.PHONE,
        (C.ENDED, CE.COMPLETE): C.COMPLETED,
        (C.PHONE, CE.COMPLETE): C.COMPLETED,
        (C.COMPLETED, CE.JOURNAL): C.JOURNAL_DONE,
    },
    "waiting_room": {
        (W.NOT_ENTERED, WE.ENTER): W.WAITING,
        (W.WAITING, WE.ADMIT): W.ADMITTED,
        (W.WAITING, WE.ABANDON): W.ABANDONED,
        (W.WAITING, WE.TRANSFER): W.WAITING,
        (W.WAITING, WE.REMOVE): W.REMOVED,
        (W.ABANDONED, WE.ENTER): W.WAITING,
    },
    "chat": {
        (H.BEFORE_CALL, HE.SEND): H.BEFORE_CALL,
        (H.BEFORE_CALL, HE.CALL_STARTED): H.IN_CALL,
        (H.BEFORE_CALL, HE.CLOSE): H.CLOSED,
        (H.IN_CALL, HE.SEND): H.IN_CALL,
        (H.IN_CALL, HE.CALL_ENDED): H.AFTER_CALL,
        (H.IN_CALL, HE.CLOSE): H.CLOSED,
        (H.AFTER_CALL, HE.SEND): H.AFTER_CALL,
        (H.AFTER_CALL, HE.CLOSE): H.CLOSED,
    },
    "announcement": {
        (A.ACTIVE, AE.EXPIRE): A.EXPIRED,
        (A.ACTIVE, AE.WITHDRAW): A.WITHDRAWN,
    },
}


def _name(m: ModuleType) -> str:
    return m.__name__.rsplit(".", 1)[1]


def _pairs() -> list[Any]:
    out = []
    for m in MACHINES:
        for s, e in itertools.product(m.State, m.Event):
            out.append(pytest.param(m, s, e, id=f"{_name(m)}-{s}-{e}"))
    return out


@pytest.mark.parametrize(("machine", "state", "event"), _pairs())
def test_every_state_event_pair(machine: ModuleType, state: StrEnum, event: StrEnum) -> None:
    expected = EXPECTED[_name(machine)].get((state, event))
    if expected is not None:
        assert machine.apply(state, event) == expected
    else:
        with pytest.raises(InvalidTransition) as err:
            machine.apply(state, event)
        assert err.value.code == "invalid_state"
        assert err.value.state == state and err.value.event == event
        assert f'"{state.value}"' in str(err.value) and event.value in str(err.value)
        assert isinstance(err.value, RoomsError)


@pytest.mark.parametrize("machine", MACHINES, ids=_name)
def test_table_is_complete_and_matches(machine: ModuleType) -> None:
    assert set(machine.TRANSITIONS) == set(machine.State)
    table = {(s, e): t for s, row in machine.TRANSITIONS.items() for e, t in row.items()}
    assert table == EXPECTED[_name(machine)]


def test_message_names_subject_state_and_event() -> None:
    with pytest.raises(InvalidTransition, match=r'^Cannot admit "abc" in state "ended"$'):
        consultation.apply(C.ENDED, CE.ADMIT, "abc")


@pytest.mark.parametrize("machine", MACHINES, ids=_name)
@given(data=st.data())
def test_random_sequences_follow_the_table(machine: ModuleType, data: st.DataObject) -> None:
    """Random event sequences: every step either follows the table or raises and stays put."""
    state = data.draw(st.sampled_from(list(machine.State)))
    events = data.draw(st.lists(st.sampled_from(list(machine.Event)), max_size=30))
    for event in events:
        allowed = machine.TRANSITIONS[state]
        try:
            new = machine.apply(state, event)
        except InvalidTransition:
            assert event not in allowed
            continue
        assert new == allowed[event]
        state = new
