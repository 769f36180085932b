"""The chat-channel state machine, chat messages and the retention policy.

    before_call ──call_started──► in_call ──call_ended──► after_call
         │  (send)                  │ (send)                 │ (send)
         └────────close─────────────┴────────close───────────┴──► closed

Two kinds of channel: one per consultation (opened at booking, so the waiting room can chat before
the call), and one per patient–clinician pair for messages after the call (opened in
``after_call``). The organisation's :class:`Retention` decides what survives: ``keep``;
``delete_on_call_end`` (the consultation channel's messages are deleted and the channel closed
when the call ends); ``delete_after_days`` (messages older than N days are purged by a sweep).

Message text is stored verbatim as text: HTML or script in it is never interpreted, escaped or
rewritten here, the display layer renders it as text. Only its size and control characters are
checked. Pure functions only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from rooms.errors import InvalidInput, InvalidTransition
from rooms.model import SessionId

DAY_MS: Final = 86_400_000


class State(StrEnum):
    BEFORE_CALL = "before_call"
    IN_CALL = "in_call"
    AFTER_CALL = "after_call"
    CLOSED = "closed"


class Event(StrEnum):
    SEND = "send"
    CALL_STARTED = "call_started"
    CALL_ENDED = "call_ended"
    CLOSE = "close"


TRANSITIONS: Final[Mapping[State, Mapping[Event, State]]] = {
    State.BEFORE_CALL: {
        Event.SEND: State.BEFORE_CALL,
        Event.CALL_STARTED: State.IN_CALL,
        Event.CLOSE: State.CLOSED,
    },
    State.IN_CALL: {
        Event.SEND: State.IN_CALL,
        Event.CALL_ENDED: State.AFTER_CALL,
        Event.CLOSE: State.CLOSED,
    },
    State.AFTER_CALL: {Event.SEND: State.AFTER_CALL, Event.CLOSE: State.CLOSED},
    State.CLOSED: {},
}


def apply(state: State, event: Event, subject: str | None = None) -> State:
    """The state after ``event``; raises :class:`InvalidTransition` naming both if not allowed."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(state, event, subject) from None


class RetentionKind(StrEnum):
    KEEP = "keep"
    DELETE_ON_CALL_END = "delete_on_call_end"
    DELETE_AFTER_DAYS = "delete_after_days"


@dataclass(frozen=True, slots=True)
class Retention:
    kind: RetentionKind = RetentionKind.KEEP
    days: int = 0

    def __post_init__(self) -> None:
        if self.kind is RetentionKind.DELETE_AFTER_DAYS and self.days < 1:
            raise InvalidInput("delete_after_days needs days >= 1")

    def cutoff_ms(self, now_ms: int) -> int | None:
        """Messages older than this are purged; None when time alone deletes nothing."""
        if self.kind is RetentionKind.DELETE_AFTER_DAYS:
            return now_ms - self.days * DAY_MS
        return None


class ChannelKind(StrEnum):
    CONSULTATION = "consultation"
    PAIR = "pair"


def consultation_channel_id(session_id: SessionId) -> str:
    return f"consultation:{session_id}"


def pair_channel_id(patient_ref: str, clinician: str) -> str:
    return f"pair:{patient_ref}:{clinician}"


@dataclass(frozen=True, slots=True)
class ChatChannel:
    channel_id: str
    kind: ChannelKind
    department: str
    patient_ref: str
    clinician: str | None
    created_ms: int
    session_id: SessionId | None = None
    state: State = State.BEFORE_CALL

    def move(self, event: Event) -> ChatChannel:
        return dataclasses.replace(self, state=apply(self.state, event, self.channel_id))

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["kind"] = self.kind.value
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ChatChannel:
        values = dict(doc)
        values["kind"] = ChannelKind(values["kind"])
        values["state"] = State(values["state"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    message_id: str
    channel_id: str
    sender: str
    sender_role: str
    text: str
    time_ms: int
    phase: State  # before, during or after the call

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["phase"] = self.phase.value
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ChatMessage:
        values = {k: v for k, v in doc.items() if k != "seq"}
        values["phase"] = State(values["phase"])
        return cls(**values)


_ALLOWED_CONTROLS: Final = frozenset("\t\n\r")


def validate_text(text: object, max_bytes: int) -> str:
    """The text unchanged if acceptable; raises :class:`InvalidInput` otherwise.

    HTML is fine (kept verbatim); empty text, C0 control characters other than tab/newline and
    text over ``max_bytes`` of UTF-8 are not.
    """
    if not isinstance(text, str):
        raise InvalidInput(f"chat text must be a string, not {type(text).__name__}")
    if not text.strip():
        raise InvalidInput("chat text is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("chat text is not valid unicode (lone surrogate)") from None
    if size > max_bytes:
        raise InvalidInput(f"chat text is {size} bytes, over the limit of {max_bytes}")
    for ch in text:
        if (ord(ch) < 32 and ch not in _ALLOWED_CONTROLS) or ord(ch) == 127:
            raise InvalidInput(f"chat text contains control character U+{ord(ch):04X}")
    return text
