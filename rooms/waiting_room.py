"""The waiting-room (queue) state machine: one patient's place in line, per session.

    not_entered ──enter──► waiting ──admit──► admitted
                    ▲        │  ▲
                    │        │  └─transfer─┘   (to another waiting room; the session id is kept and
                    │        │                  a new segment starts with its clinic and clinician)
                    │        ├──abandon──► abandoned ──enter──► waiting   (came back)
                    │        └──remove───► removed                         (by staff)

A waiting room exists per department/clinic and per clinician. Its :class:`WaitingRoom` record keeps
the live order (position = index + 1); a :class:`QueueEntry` keeps the patient's state and one
:class:`Segment` per room visited. Arrival is classified against the booking: early, on time, late,
or walk-in (no booking). The patient's device check only advises: the entry keeps what it found
(:class:`Devices`: camera and microphone each ok / denied / not found / in use …) so the clinician
sees who comes with audio only or no devices, and why; it never keeps anyone out. Concurrent admits resolve in the store by compare-and-set on the entry:
the second one sees ``admitted`` and gets ``Cannot admit … in state "admitted"``.
All functions here are pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from rooms.announcement import Announcement
from rooms.errors import InvalidTransition
from rooms.model import SessionId


class State(StrEnum):
    NOT_ENTERED = "not_entered"
    WAITING = "waiting"
    ADMITTED = "admitted"
    ABANDONED = "abandoned"
    REMOVED = "removed"


class Event(StrEnum):
    ENTER = "enter"
    ADMIT = "admit"
    ABANDON = "abandon"
    TRANSFER = "transfer"
    REMOVE = "remove"


TRANSITIONS: Final[Mapping[State, Mapping[Event, State]]] = {
    State.NOT_ENTERED: {Event.ENTER: State.WAITING},
    State.WAITING: {
        Event.ADMIT: State.ADMITTED,
        Event.ABANDON: State.ABANDONED,
        Event.TRANSFER: State.WAITING,
        Event.REMOVE: State.REMOVED,
    },
    State.ABANDONED: {Event.ENTER: State.WAITING},
    State.ADMITTED: {},
    State.REMOVED: {},
}


def apply(state: State, event: Event, subject: str | None = None) -> State:
    """The state after ``event``; raises :class:`InvalidTransition` naming both if not allowed."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(state, event, subject) from None


class Arrival(StrEnum):
    """How a patient arrived against the booking (green / red / yellow corner in the UI)."""

    EARLY = "early"
    ON_TIME = "on_time"
    LATE = "late"
    WALK_IN = "walk_in"


class Outcome(StrEnum):
    """How one segment (one stay in one waiting room) ended."""

    ADMITTED = "admitted"
    ABANDONED = "abandoned"
    TRANSFERRED = "transferred"
    REMOVED = "removed"


class DeviceState(StrEnum):
    """What the patient's browser found for one device (the ``deviceCheck`` client event's words)."""

    OK = "ok"
    DENIED = "denied"  # the person (or a policy) refused the permission
    NOT_FOUND = "not_found"  # no such device
    IN_USE = "in_use"  # another program holds it
    ERROR = "error"  # it could not be started for another reason
    SKIPPED = "skipped"  # not asked for
    UNKNOWN = "unknown"  # not reported (an older client, or entered by staff)


#: How the queue names a device that is not working: "camera denied", "no camera", ….
_DEVICE_WORDS: Final[Mapping[DeviceState, str]] = {
    DeviceState.DENIED: "{} denied", DeviceState.NOT_FOUND: "no {}", DeviceState.IN_USE: "{} in use",
    DeviceState.ERROR: "{} not working", DeviceState.SKIPPED: "no {} (skipped)",
}


@dataclass(frozen=True, slots=True)
class Devices:
    """The device check's result as the patient entered: advice for the clinician, never a gate."""

    camera: DeviceState = DeviceState.UNKNOWN
    microphone: DeviceState = DeviceState.UNKNOWN

    @property
    def media(self) -> str:
        """``audio_video``, ``audio_only``, ``video_only``, ``none`` or ``unknown`` (nothing reported)."""
        if self.camera is DeviceState.UNKNOWN and self.microphone is DeviceState.UNKNOWN:
            return "unknown"
        video, audio = self.camera is DeviceState.OK, self.microphone is DeviceState.OK
        return ("audio_video" if video and audio else "audio_only" if audio else "video_only" if video
                else "none")

    @property
    def problems(self) -> tuple[str, ...]:
        """Plain words for each device that does not work: ``("camera denied",)``."""
        return tuple(_DEVICE_WORDS[state].format(device)
                     for device, state in (("camera", self.camera), ("microphone", self.microphone))
                     if state in _DEVICE_WORDS)

    def to_doc(self) -> dict[str, str]:
        return {"camera": self.camera.value, "microphone": self.microphone.value}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Devices:
        if not doc:
            return cls()
        return cls(DeviceState(doc.get("camera", "unknown")), DeviceState(doc.get("microphone", "unknown")))


def classify(appointment_ms: int | None, now_ms: int, on_time_window_ms: int) -> Arrival:
    """Early/on time/late: within ``on_time_window_ms`` either side of the appointment is on time."""
    if appointment_ms is None:
        return Arrival.WALK_IN
    if now_ms < appointment_ms - on_time_window_ms:
        return Arrival.EARLY
    if now_ms > appointment_ms + on_time_window_ms:
        return Arrival.LATE
    return Arrival.ON_TIME


@dataclass(frozen=True, slots=True)
class Segment:
    room_id: str
    department: str
    clinician: str | None
    entered_ms: int
    arrival: Arrival
    added_by: str
    left_ms: int | None = None
    outcome: Outcome | None = None
    by: str | None = None  # who admitted/transferred/removed

    @property
    def waited_ms(self) -> int | None:
        return None if self.left_ms is None else max(0, self.left_ms - self.entered_ms)

    def close(self, outcome: Outcome, now_ms: int, by: str | None) -> Segment:
        return dataclasses.replace(self, left_ms=now_ms, outcome=outcome, by=by)

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["arrival"] = self.arrival.value
        doc["outcome"] = None if self.outcome is None else self.outcome.value
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Segment:
        values = dict(doc)
        values["arrival"] = Arrival(values["arrival"])
        values["outcome"] = None if values.get("outcome") is None else Outcome(values["outcome"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One session's place in the queues, across transfers."""

    session_id: SessionId
    patient_ref: str
    state: State = State.NOT_ENTERED
    room_id: str | None = None
    segments: tuple[Segment, ...] = ()
    admitted_ms: int | None = None
    admitted_by: str | None = None
    abandoned_ms: int | None = None
    removed_ms: int | None = None
    devices: Devices = Devices()

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    @property
    def waited_ms(self) -> int:
        """Total time spent waiting over all closed segments."""
        return sum(s.waited_ms or 0 for s in self.segments)

    def _check(self, event: Event) -> State:
        return apply(self.state, event, self.session_id)

    def enter(self, room: WaitingRoom, arrival: Arrival, added_by: str, now_ms: int,
              devices: Devices | None = None) -> QueueEntry:
        state = self._check(Event.ENTER)
        seg = Segment(room.room_id, room.department, room.clinician, now_ms, arrival, added_by)
        return dataclasses.replace(
            self, state=state, room_id=room.room_id, segments=(*self.segments, seg), abandoned_ms=None,
            devices=self.devices if devices is None else devices,
        )

    def with_devices(self, devices: Devices) -> QueueEntry:
        """The device check ran again (e.g. a reload after allowing the camera): no state change."""
        return dataclasses.replace(self, devices=devices)

    def _leave(self, event: Event, outcome: Outcome, now_ms: int, by: str | None) -> QueueEntry:
        state = self._check(event)
        segs = (*self.segments[:-1], self.current.close(outcome, now_ms, by))
        return dataclasses.replace(self, state=state, segments=segs)

    def admit(self, clinician: str, now_ms: int) -> QueueEntry:
        out = self._leave(Event.ADMIT, Outcome.ADMITTED, now_ms, clinician)
        return dataclasses.replace(out, admitted_ms=now_ms, admitted_by=clinician)

    def abandon(self, now_ms: int) -> QueueEntry:
        out = self._leave(Event.ABANDON, Outcome.ABANDONED, now_ms, None)
        return dataclasses.replace(out, abandoned_ms=now_ms, room_id=None)

    def remove(self, by: str, now_ms: int) -> QueueEntry:
        out = self._leave(Event.REMOVE, Outcome.REMOVED, now_ms, by)
        return dataclasses.replace(out, removed_ms=now_ms, room_id=None)

    def transfer(self, target: WaitingRoom, by: str, now_ms: int) -> QueueEntry:
        out = self._leave(Event.TRANSFER, Outcome.TRANSFERRED, now_ms, by)
        seg = Segment(
            target.room_id, target.department, target.clinician, now_ms, self.current.arrival, by
        )
        return dataclasses.replace(out, room_id=target.room_id, segments=(*out.segments, seg))

    def to_doc(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "patient_ref": self.patient_ref,
            "state": self.state.value,
            "room_id": self.room_id,
            "segments": [s.to_doc() for s in self.segments],
            "admitted_ms": self.admitted_ms,
            "admitted_by": self.admitted_by,
            "abandoned_ms": self.abandoned_ms,
            "removed_ms": self.removed_ms,
            "devices": self.devices.to_doc(),
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> QueueEntry:
        return cls(
            session_id=SessionId(doc["session_id"]),
            patient_ref=doc["patient_ref"],
            state=State(doc["state"]),
            room_id=doc["room_id"],
            segments=tuple(Segment.from_doc(s) for s in doc["segments"]),
            admitted_ms=doc["admitted_ms"],
            admitted_by=doc["admitted_by"],
            abandoned_ms=doc["abandoned_ms"],
            removed_ms=doc["removed_ms"],
            devices=Devices.from_doc(doc.get("devices")),
        )


@dataclass(frozen=True, slots=True)
class WaitingRoom:
    """A department's (clinician is None) or one clinician's waiting room and its live order."""

    room_id: str
    name: str
    department: str
    clinician: str | None = None
    waiting: tuple[SessionId, ...] = ()
    announcements: tuple[Announcement, ...] = ()

    def position(self, session_id: SessionId) -> int | None:
        """1-based place in line, or None if not waiting here."""
        try:
            return self.waiting.index(session_id) + 1
        except ValueError:
            return None

    def add(self, session_id: SessionId) -> WaitingRoom:
        return dataclasses.replace(self, waiting=(*self.waiting, session_id))

    def discard(self, session_id: SessionId) -> WaitingRoom:
        return dataclasses.replace(self, waiting=tuple(s for s in self.waiting if s != session_id))

    def with_announcements(self, announcements: tuple[Announcement, ...]) -> WaitingRoom:
        return dataclasses.replace(self, announcements=announcements)

    def to_doc(self) -> dict[str, Any]:
        return {
            "room_id": self.room_id,
            "name": self.name,
            "department": self.department,
            "clinician": self.clinician,
            "waiting": list(self.waiting),
            "announcements": [a.to_doc() for a in self.announcements],
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> WaitingRoom:
        return cls(
            room_id=doc["room_id"],
            name=doc["name"],
            department=doc["department"],
            clinician=doc["clinician"],
            waiting=tuple(SessionId(s) for s in doc["waiting"]),
            announcements=tuple(Announcement.from_doc(a) for a in doc["announcements"]),
        )
