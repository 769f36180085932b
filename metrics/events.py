"""Event-log vocabulary: what kinds of entries exist, who emitted them, and the entry record itself.

An entry is what support staff read in the call inspector: a time, the session it belongs to,
optionally the connection and stream, a kind, a human sentence and a structured payload.
The sentence is written in the words support staff use ("Server detected connect: Anna
(patient)"); the payload carries the machine-readable details (reasons, candidate-pair types,
dimensions, quality figures).
"""

from __future__ import annotations

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

    ``payload`` must be JSON-serialisable (values that are not are written with ``str()``)
    and is owned by the log once appended: do not mutate it afterwards.
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


def token_rejected(token: str, reason: str, room: str | None = None, *, code: str = "") -> LogEntry:
    """The entry for a rejected join token, in the words support staff know.

    ``"Failed to get valid token for token: eyJh…(truncated): token expired"``
    """
    payload: dict[str, Any] = {"token": token_preview(token), "reason": reason}
    if code:
        payload["code"] = code
    if room:
        payload["room"] = room
    return LogEntry.now(
        room_session_id(room),
        EventKind.TOKEN_REJECTED,
        f"Failed to get valid token for token: {token_preview(token)}: {reason}",
        payload=payload,
    )
