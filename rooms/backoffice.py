"""Typed back-office entries: what each workflow transition says in support staff's words.

The service returns these; the caller writes them to the session's event log (rooms/ never logs).
Texts follow the back-office log support teams already read ("Booked a consultation at …",
"Patient is ready. …", "… has ended and lasted 65.08 seconds."). Chat entries never carry the
message text: support may see that a message was sent, not what it said.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from rooms.model import SessionId


class LogKind(StrEnum):
    CONSULTATION = "Consultation"
    QUEUE = "Queue"
    VIDEO_SESSION = "VideoSession"
    CHAT = "Chat"
    #: A video call ended: when, and how long it lasted (statistics).
    CALL_ENDED = "CallEnded"
    #: Who started a call: the clinician calling a booked patient in, or a patient who walked in
    #: without a booking being answered.
    DOCTOR_TO_PATIENT_CALL = "DoctorToPatientCall"
    PATIENT_TO_DOCTOR_CALL = "PatientToDoctorCall"


@dataclass(frozen=True, slots=True)
class BackofficeEntry:
    kind: LogKind
    text: str
    session_id: SessionId | None
    time_ms: int
    payload: Mapping[str, Any] = field(default_factory=dict)


def format_time(ms: int) -> str:
    """UTC wall time the way the log prints it: ``2022-06-29 09:15:00 UTC``."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds(ms: int) -> str:
    return f"{ms / 1000:.2f}"


def entry(
    kind: LogKind, text: str, session_id: SessionId | None, now_ms: int, **payload: Any
) -> BackofficeEntry:
    return BackofficeEntry(kind, text, session_id, now_ms, dict(payload))
