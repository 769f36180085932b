"""The consultation state machine: one booked appointment from booking to journal note.

    booked ──invite──► invited ──patient_ready──► patient_ready ──admit──► in_progress ──end──► ended
       │                │  ▲ (re-invite)             │      │                   │                 │
       │                │  └──────patient_left───────┘      │                   │              complete
       │                │                                   │                   │                 ▼
       ├─cancel─► cancelled ◄─────────────────────────────────┤                   │   completed (awaiting journal)
       ├─no_show─► no_show  (booked/invited only)             │                   │                 │ journal
       └─phone_fallback─► phone ◄──────────────────────────────┴───────────────────┘                 ▼
                            └──────────complete──────────► completed                           journal_done

``phone`` is "ended as phone consultation": from before the call (no video session id) or from a
call in progress (the video session id is kept). A walk-in (no booking) is created directly in
``patient_ready``. The table is the whole rule set; :func:`apply` is the only way to move.
The :class:`Consultation` record's methods are pure: they return a new record, never do I/O.

Guests (a relative, an interpreter) are kept on the record: each has the id their link's token
names (its ``link`` claim); removing one stamps ``removed_ms`` and revokes that link. Guests may
be added while the consultation can still have a call (:data:`GUEST_STATES`), at most
:data:`GUESTS_ACTIVE_MAX` at a time and :data:`GUESTS_MAX` over the consultation's life (the
record stays bounded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from rooms.errors import InvalidGuest, InvalidTransition, NotFound
from rooms.model import SessionId


class State(StrEnum):
    BOOKED = "booked"
    INVITED = "invited"
    PATIENT_READY = "patient_ready"
    IN_PROGRESS = "in_progress"
    ENDED = "ended"
    COMPLETED = "completed"
    JOURNAL_DONE = "journal_done"
    CANCELLED = "cancelled"
    NO_SHOW = "no_show"
    PHONE = "phone"


class Event(StrEnum):
    INVITE = "invite"
    PATIENT_READY = "patient_ready"
    PATIENT_LEFT = "patient_left"
    ADMIT = "admit"
    END = "end"
    COMPLETE = "complete"
    JOURNAL = "journal"
    CANCEL = "cancel"
    NO_SHOW = "no_show"
    PHONE_FALLBACK = "phone_fallback"


TRANSITIONS: Final[Mapping[State, Mapping[Event, State]]] = {
    State.BOOKED: {
        Event.INVITE: State.INVITED,
        Event.CANCEL: State.CANCELLED,
        Event.NO_SHOW: State.NO_SHOW,
        Event.PHONE_FALLBACK: State.PHONE,
    },
    State.INVITED: {
        Event.INVITE: State.INVITED,  # the link is sent again
        Event.PATIENT_READY: State.PATIENT_READY,
        Event.CANCEL: State.CANCELLED,
        Event.NO_SHOW: State.NO_SHOW,
        Event.PHONE_FALLBACK: State.PHONE,
    },
    State.PATIENT_READY: {
        Event.PATIENT_READY: State.PATIENT_READY,  # reloaded the page, passed the check again
        Event.PATIENT_LEFT: State.INVITED,  # left the waiting room; the link still works
        Event.ADMIT: State.IN_PROGRESS,
        Event.CANCEL: State.CANCELLED,
        Event.PHONE_FALLBACK: State.PHONE,
    },
    State.IN_PROGRESS: {
        Event.END: State.ENDED,
        Event.PHONE_FALLBACK: State.PHONE,
    },
    State.ENDED: {Event.COMPLETE: State.COMPLETED},
    State.PHONE: {Event.COMPLETE: State.COMPLETED},
    State.COMPLETED: {Event.JOURNAL: State.JOURNAL_DONE},
    State.JOURNAL_DONE: {},
    State.CANCELLED: {},
    State.NO_SHOW: {},
}

TERMINAL: Final[frozenset[State]] = frozenset(s for s, t in TRANSITIONS.items() if not t)
#: States in which a guest may be added, and a guest's link lets them join: a call is ahead or on.
GUEST_STATES: Final[frozenset[State]] = frozenset({State.BOOKED, State.INVITED, State.PATIENT_READY,
                                                   State.IN_PROGRESS})
#: Guests with a working link at once (a group call: patient, clinician and up to this many more).
GUESTS_ACTIVE_MAX: Final = 8
#: Guests ever added to one consultation, removed ones included.
GUESTS_MAX: Final = 32


@dataclass(frozen=True, slots=True)
class Guest:
    """A third participant: ``guest_id`` is the ``link`` claim of their token."""

    guest_id: str
    name: str
    invited_by: str
    invited_ms: int
    removed_ms: int | None = None
    removed_by: str | None = None

    @property
    def active(self) -> bool:
        return self.removed_ms is None


def apply(state: State, event: Event, subject: str | None = None) -> State:
    """The state after ``event``; raises :class:`InvalidTransition` naming both if not allowed."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(state, event, subject) from None


@dataclass(frozen=True, slots=True)
class Consultation:
    """One consultation; ``session_id`` is its id and the id support staff paste."""

    session_id: SessionId
    department: str
    clinician: str | None
    patient_ref: str
    appointment_ms: int | None  # None for a walk-in
    state: State
    booked_ms: int
    link_token: str | None = None
    invited_ms: int | None = None
    ready_ms: int | None = None
    started_ms: int | None = None
    admitted_by: str | None = None
    video_session_id: str | None = None
    ended_ms: int | None = None
    duration_ms: int | None = None
    completed_ms: int | None = None
    journal_ms: int | None = None
    cancelled_ms: int | None = None
    no_show_ms: int | None = None
    phone: bool = False
    #: The patient's display name as the clinic knows it (booking's patient_name, a walk-in's name);
    #: shown to staff in the queue. None when none was given (records from before the field too).
    patient_name: str | None = None
    guests: tuple[Guest, ...] = ()

    @property
    def walk_in(self) -> bool:
        return self.appointment_ms is None

    def _move(self, event: Event, **changes: Any) -> Consultation:
        return dataclasses.replace(self, state=apply(self.state, event, self.session_id), **changes)

    def invite(self, token: str, now_ms: int) -> Consultation:
        return self._move(Event.INVITE, link_token=token, invited_ms=now_ms)

    def patient_ready(self, now_ms: int) -> Consultation:
        return self._move(Event.PATIENT_READY, ready_ms=now_ms)

    def patient_left(self) -> Consultation:
        return self._move(Event.PATIENT_LEFT, ready_ms=None)

    def admit(self, clinician: str, video_session_id: str, now_ms: int) -> Consultation:
        return self._move(
            Event.ADMIT, started_ms=now_ms, admitted_by=clinician, video_session_id=video_session_id
        )

    def end(self, now_ms: int) -> Consultation:
        started = self.started_ms if self.started_ms is not None else now_ms
        # Clocks of different nodes may disagree a little; a duration is never negative.
        return self._move(Event.END, ended_ms=now_ms, duration_ms=max(0, now_ms - started))

    def phone_fallback(self, now_ms: int) -> Consultation:
        duration = None if self.started_ms is None else max(0, now_ms - self.started_ms)
        return self._move(Event.PHONE_FALLBACK, ended_ms=now_ms, duration_ms=duration, phone=True)

    def complete(self, now_ms: int) -> Consultation:
        return self._move(Event.COMPLETE, completed_ms=now_ms)

    def journal(self, now_ms: int) -> Consultation:
        return self._move(Event.JOURNAL, journal_ms=now_ms)

    def cancel(self, now_ms: int) -> Consultation:
        return self._move(Event.CANCEL, cancelled_ms=now_ms)

    def no_show(self, now_ms: int) -> Consultation:
        return self._move(Event.NO_SHOW, no_show_ms=now_ms)

    def guest(self, guest_id: str) -> Guest | None:
        return next((g for g in self.guests if g.guest_id == guest_id), None)

    def add_guest(self, guest: Guest) -> Consultation:
        """A new record with ``guest`` added; ``InvalidGuest`` unless the state and counts allow it."""
        if self.state not in GUEST_STATES:
            raise InvalidGuest(f'Cannot add a guest to consultation "{self.session_id}" in state "{self.state}"')
        if sum(g.active for g in self.guests) >= GUESTS_ACTIVE_MAX:
            raise InvalidGuest(f'consultation "{self.session_id}" already has {GUESTS_ACTIVE_MAX} guests, '
                               "the most allowed; remove one first")
        if len(self.guests) >= GUESTS_MAX:
            raise InvalidGuest(f'consultation "{self.session_id}" has had {GUESTS_MAX} guests, the most allowed')
        return dataclasses.replace(self, guests=(*self.guests, guest))

    def remove_guest(self, guest_id: str, by: str, now_ms: int) -> Consultation:
        """A new record with that guest's link revoked; ``NotFound`` if unknown, ``InvalidGuest`` if
        removed already."""
        guest = self.guest(guest_id)
        if guest is None:
            raise NotFound("guest", guest_id)
        if not guest.active:
            raise InvalidGuest(f'Cannot remove guest "{guest_id}" of consultation "{self.session_id}": '
                               "removed already")
        removed = dataclasses.replace(guest, removed_ms=now_ms, removed_by=by)
        return dataclasses.replace(self, guests=tuple(removed if g is guest else g for g in self.guests))

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["state"] = self.state.value
        doc["guests"] = [dataclasses.asdict(g) for g in self.guests]
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Consultation:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in doc.items() if k in fields}
        values["state"] = State(values["state"])
        values["session_id"] = SessionId(values["session_id"])
        values["guests"] = tuple(Guest(**g) for g in values.get("guests") or ())
        return cls(**values)
