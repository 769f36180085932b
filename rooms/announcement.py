"""The service-announcement state machine: a notice shown to patients waiting in one room.

    active ──expire──► expired
       └───withdraw──► withdrawn

"Running 10 minutes late": posted by staff with an expiry time. An active announcement whose
expiry has passed is shown to nobody even before the ``expire`` event is applied (see
:meth:`Announcement.visible`), so expiry needs no timer to be correct. Pure functions only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from rooms.errors import InvalidTransition


class State(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


class Event(StrEnum):
    EXPIRE = "expire"
    WITHDRAW = "withdraw"


TRANSITIONS: Final[Mapping[State, Mapping[Event, State]]] = {
    State.ACTIVE: {Event.EXPIRE: State.EXPIRED, Event.WITHDRAW: State.WITHDRAWN},
    State.EXPIRED: {},
    State.WITHDRAWN: {},
}


def apply(state: State, event: Event, subject: str | None = None) -> State:
    """The state after ``event``; raises :class:`InvalidTransition` naming both if not allowed."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(state, event, subject) from None


@dataclass(frozen=True, slots=True)
class Announcement:
    announcement_id: str
    room_id: str
    text: str
    author: str
    posted_ms: int
    expires_ms: int
    state: State = State.ACTIVE

    def visible(self, now_ms: int) -> bool:
        return self.state is State.ACTIVE and now_ms < self.expires_ms

    def expire(self) -> Announcement:
        return dataclasses.replace(self, state=apply(self.state, Event.EXPIRE, self.announcement_id))

    def withdraw(self) -> Announcement:
        return dataclasses.replace(
            self, state=apply(self.state, Event.WITHDRAW, self.announcement_id)
        )

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Announcement:
        values = dict(doc)
        values["state"] = State(values["state"])
        return cls(**values)
