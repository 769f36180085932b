"""Event-log vocabulary: what kinds of entries exist, who emitted them, and the entry record itself.

An entry is what support staff read in the call inspector: a time, the session it belongs to,
optionally the connection and stream, a kind, a human sentence and a structured payload.
The sentence is written in the words support staff use ("Server detected connect: Anna
(patient)"); the payload carries the machine-readable details (reasons, candidate-pair types,
dimensions, quality figures).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final


class EventKind(StrEnum):
    """Every kind of event-log entry. Values are the camelCase names shown in the inspector."""

    # Connection lifecycle
    CONNECT_ATTEMPT = "connectAttempt"
    SERVER_DETECTED_CONNECT = "serverDetectedConnect"
    SUCCESSFULLY_JOINED = "successfullyJoined"
    TOKEN_REJECTED = "tokenRejected"
    DISCONNECT = "disconnect"  # payload: {"reason": DisconnectReason}
    # The server node holding the call stopped without releasing it; logged by the node that took
    # the room over. payload: {"node", "last_seen_ms", "by_node", "connections"}
    NODE_FAILURE = "nodeFailure"
    # Publishing
    PUBLISH_ATTEMPT = "publishAttempt"
    PUBLISH_SUCCESS = "publishSuccess"
    PUBLISH_FAILURE = "publishFailure"
    STREAM_CREATED = "streamCreated"
    STREAM_DESTROYED = "streamDestroyed"  # payload: {"reason": StreamDestroyedReason}
    # Subscribing
    SUBSCRIBE_ATTEMPT = "subscribeAttempt"
    SUBSCRIBE_SUCCESS = "subscribeSuccess"
    SUBSCRIBE_FAILURE = "subscribeFailure"
    UNSUBSCRIBED = "unsubscribed"
    # Transport and media
    ICE_STATE_CHANGED = "iceStateChanged"  # payload: {"state", "candidate_pair": CandidatePair?}
    DTLS_STATE_CHANGED = "dtlsStateChanged"  # payload: {"state", "candidate_pair": CandidatePair?}
    DIMENSIONS_CHANGED = "dimensionsChanged"  # payload: {"width", "height"}
    KEYFRAME_REQUESTED = "keyframeRequested"  # payload: {"method": "pli"|"fir", "by"?}
    QUALITY_ALERT = "qualityAlert"  # payload: {"metric", "value", "threshold", ...}
    # One interval of one track (the quality timeline); payload: media.events.QualitySample fields.
    # Kept out of the event list the inspector shows; read through the quality API.
    QUALITY_SAMPLE = "qualitySample"
    CLIENT_EVENT = "clientEvent"  # posted by the browser SDK
    CLIENT_STATS = "clientStats"  # a getStats() sample posted by the browser SDK
    # Back office: the room state machines' transitions. payload: {"from", "to", "event", ...}
    CONSULTATION = "Consultation"
    QUEUE = "Queue"
    VIDEO_SESSION = "VideoSession"
    CHAT = "Chat"
    CALL_ENDED = "CallEnded"
    DOCTOR_TO_PATIENT_CALL = "DoctorToPatientCall"
    PATIENT_TO_DOCTOR_CALL = "PatientToDoctorCall"


class Component(StrEnum):
    """Who observed the event: the server itself, or a client that reported it."""

    SERVER = "server"
    CLIENT = "client"


class CandidateType(StrEnum):
    """ICE candidate type of the local or remote end of the selected pair."""

    HOST = "host"
    SRFLX = "srflx"
    PRFLX = "prflx"
    RELAY = "relay"


class TransportProtocol(StrEnum):
    UDP = "udp"
    TCP = "tcp"


#: Session id used for entries that belong to no session, e.g. a token rejected before the
#: room (and so the session) could be known. When the room name is known, use
#: :func:`room_session_id` instead so support staff can still find it by room.
NO_SESSION: Final = "-"

#: Prefix of the pseudo session id :func:`room_session_id` builds. Real session ids start with
#: ``s_`` (see ``rooms.model.new_id``) so the two never collide.
ROOM_SESSION_PREFIX: Final = "room:"

TOKEN_PREVIEW_CHARS: Final = 4

#: Longest entry text and payload string value kept; longer ones are cut and end in
#: :data:`TRUNCATED`. Ids, kinds, components and payload keys are cut at :data:`MAX_NAME_CHARS`.
MAX_TEXT_CHARS: Final = 4_096
MAX_NAME_CHARS: Final = 256
#: Deepest payload nesting kept; anything deeper is replaced by :data:`TOO_DEEP`.
MAX_PAYLOAD_DEPTH: Final = 16
#: Most values kept from one payload (all levels together); the rest are left out (and counted).
MAX_PAYLOAD_ITEMS: Final = 10_000
TRUNCATED: Final = "…(truncated)"
TOO_DEEP: Final = "…(too deep)"
#: What replaces a lone surrogate or a control character other than tab and newline.
REPLACEMENT: Final = "\ufffd"

# Lone UTF-16 surrogates cannot be encoded as UTF-8 (SQLite, JSON for browsers); C0/C1
# control characters (NUL, ESC, CR…) forge lines and terminal output in what support reads.
_UNSAFE: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def now_ms() -> int:
    """Current UTC wall-clock time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def room_session_id(room: str | None) -> str:
    """Session id for an entry about a room whose session is not known (``"room:<name>"``)."""
    return f"{ROOM_SESSION_PREFIX}{room}" if room else NO_SESSION


def token_preview(token: str) -> str:
    """A token shortened for logs: never the whole credential, enough to tell two apart."""
    if len(token) <= TOKEN_PREVIEW_CHARS:
        return "…(truncated)"
    return f"{token[:TOKEN_PREVIEW_CHARS]}…(truncated)"


def safe_text(value: object, limit: int = MAX_TEXT_CHARS) -> str:
    """``value`` as text that any encoder accepts and support staff can read.

    Lone surrogates and control characters (all but tab and newline) become U+FFFD; text
    longer than ``limit`` characters is cut and ends in ``…(truncated)``. Never raises: a
    value whose ``str()`` fails becomes ``<unprintable: ErrorName>``.
    """
    if isinstance(value, str):
        text = str.__str__(value)  # a StrEnum member's value, not a subclass
    else:
        try:
            text = str(value)
        except Exception as exc:
            return f"<unprintable: {type(exc).__name__}>"
    if len(text) > limit:
        text = text[:limit] + TRUNCATED
    return _UNSAFE.sub(REPLACEMENT, text)


def safe_name(value: object) -> str:
    """:func:`safe_text` for ids, kinds and payload keys (cut at :data:`MAX_NAME_CHARS`)."""
    return safe_text(value, MAX_NAME_CHARS)


def safe_payload(payload: object) -> dict[str, Any]:
    """A payload as a JSON-ready dict whose every key and string is :func:`safe_text`.

    Nested mappings and sequences are copied (at most :data:`MAX_PAYLOAD_ITEMS` values in
    all, :data:`MAX_PAYLOAD_DEPTH` levels); keys become strings; booleans, ``None``, 64-bit
    integers and finite floats stay; anything else (non-finite floats, sets, paths, objects)
    becomes its ``str()``. Never raises. A payload that is not a mapping is kept under
    ``"value"``.
    """
    budget = [MAX_PAYLOAD_ITEMS]
    if isinstance(payload, Mapping):
        return _safe_mapping(payload, 1, budget)
    return {"value": _safe_value(payload, 1, budget)}


def _safe_mapping(mapping: Mapping[Any, Any], depth: int, budget: list[int]) -> dict[str, Any]:
    try:
        items = list(mapping.items())
    except Exception as exc:
        return {"payload_error": f"not readable: {type(exc).__name__}"}
    out: dict[str, Any] = {}
    for i, (key, value) in enumerate(items):
        if budget[0] <= 0:
            out[TRUNCATED] = f"{len(items) - i} more left out"
            break
        out[safe_name(key)] = _safe_value(value, depth + 1, budget)
    return out


def _safe_value(value: object, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, int):
        number = int.__index__(value)  # an IntEnum as its number
        return number if -(2**63) <= number < 2**63 else f"<integer of {number.bit_length()} bits>"
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)  # NaN is not JSON
    if depth > MAX_PAYLOAD_DEPTH:
        return TOO_DEEP
    if isinstance(value, Mapping):
        return _safe_mapping(value, depth, budget)
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for i, item in enumerate(value):
            if budget[0] <= 0:
                out.append(f"{TRUNCATED} {len(value) - i} more left out")
                break
            out.append(_safe_value(item, depth + 1, budget))
        return out
    return safe_text(value)


def candidate_pair(
    local_type: CandidateType | str,
    remote_type: CandidateType | str,
    protocol: TransportProtocol | str,
) -> dict[str, str]:
    """The payload shape for a selected candidate pair in ICE/DTLS state entries."""
    return {
        "local_type": str(local_type),
        "remote_type": str(remote_type),
        "protocol": str(protocol),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class LogEntry:
    """One immutable event-log entry (keyword-only fields).

    Fields may hold anything a client sent: the event log writes :meth:`made_safe` of every
    entry (see :func:`safe_text` and :func:`safe_payload`). ``payload`` is owned by the log
    once appended: do not mutate it afterwards.
    """

    time_ms: int  # UTC, ms since the epoch
    session_id: str  # or room_session_id(room) / NO_SESSION when there is no session
    connection_id: str | None = None
    stream_id: str | None = None
    kind: str  # an EventKind value
    component: Component = Component.SERVER
    text: str  # the human sentence support staff read
    payload: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def now(
        cls,
        session_id: str,
        kind: EventKind | str,
        text: str,
        *,
        component: Component = Component.SERVER,
        connection_id: str | None = None,
        stream_id: str | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> LogEntry:
        """An entry stamped with the current time."""
        return cls(
            time_ms=now_ms(),
            session_id=session_id,
            kind=str(kind),
            text=text,
            component=component,
            connection_id=connection_id,
            stream_id=stream_id,
            payload=payload if payload is not None else {},
        )

    def made_safe(self) -> LogEntry:
        """This entry as any encoder accepts it: every string through :func:`safe_text`
        (ids, kind and component as names), the payload through :func:`safe_payload`, and a
        time that is not a 64-bit integer replaced by the current time. Never raises."""
        time_ms = self.time_ms
        if isinstance(time_ms, bool) or not isinstance(time_ms, int) or not 0 <= time_ms < 2**63:
            time_ms = now_ms()
        return LogEntry(
            time_ms=int.__index__(time_ms),
            session_id=safe_name(self.session_id),
            connection_id=None if self.connection_id is None else safe_name(self.connection_id),
            stream_id=None if self.stream_id is None else safe_name(self.stream_id),
            kind=safe_name(self.kind),
            component=self.component,
            text=safe_text(self.text),
            payload=safe_payload(self.payload),
        )


def token_rejected(token: str, reason: str, room: str | None = None, *, code: str = "") -> LogEntry:
    """The entry for a rejected join token, in the words support staff know.

    ``"Failed to get valid token for token: eyJh…(truncated): token expired"``

    Every part may come from a hostile token (the reason can quote its header), so each is
    made safe here, as the event log would.
    """
    preview = safe_text(token_preview(token))
    reason = safe_text(reason, MAX_NAME_CHARS)
    payload: dict[str, Any] = {"token": preview, "reason": reason}
    if code:
        payload["code"] = safe_name(code)
    if room:
        room = safe_name(room)
        payload["room"] = room
    return LogEntry.now(
        room_session_id(room),
        EventKind.TOKEN_REJECTED,
        f"Failed to get valid token for token: {preview}: {reason}",
        payload=payload,
    )
