"""Typed ids and the reason enums shared by the event log, the wire protocol and metric labels."""

from __future__ import annotations

import secrets
from enum import StrEnum
from typing import NewType

SessionId = NewType("SessionId", str)
ConnectionId = NewType("ConnectionId", str)
StreamId = NewType("StreamId", str)
SubscriptionId = NewType("SubscriptionId", str)
NodeId = NewType("NodeId", str)


def new_id(prefix: str) -> str:
    """A url-safe random id with a short prefix that says what it names (``s_``, ``c_`` …)."""
    return f"{prefix}_{secrets.token_urlsafe(12)}"


class Role(StrEnum):
    """Who an actor is. ``ADMIN`` is the generic admin of the first skeleton; rooms/ treats it as an
    organisation admin. ``DEPARTMENT_ADMIN`` and ``ORGANISATION_ADMIN`` come from the clinical
    workflow (strict department separation). ``GUEST`` is a third participant added by link."""

    PATIENT = "patient"
    CLINICIAN = "clinician"
    SUPPORT = "support"
    ADMIN = "admin"
    DEPARTMENT_ADMIN = "department_admin"
    ORGANISATION_ADMIN = "organisation_admin"
    #: Someone the clinician added to a consultation (a relative, an interpreter): joins the
    #: consultation's media room on a guest link and holds no workflow permission at all.
    GUEST = "guest"


class DisconnectReason(StrEnum):
    """Why a connection went away (also why its streams did)."""

    CLIENT_DISCONNECTED = "clientDisconnected"
    NETWORK_DISCONNECTED = "networkDisconnected"
    FORCE_DISCONNECTED = "forceDisconnected"
    SERVER_SHUTDOWN = "serverShutdown"
    #: The client did not read what the server sent it (a write waited past
    #: ``server.write_timeout_s`` or its send queue overflowed).
    SLOW_CONSUMER = "slowConsumer"
    #: The server node holding the call stopped (killed, crashed, paused past its lease) or lost
    #: the room to another node: logged by a node that saw it happen, never by the node itself.
    NODE_FAILURE = "nodeFailure"


class StreamDestroyedReason(StrEnum):
    """Why a stream went away: every DisconnectReason plus the stream-only ones."""

    CLIENT_DISCONNECTED = "clientDisconnected"
    NETWORK_DISCONNECTED = "networkDisconnected"
    FORCE_DISCONNECTED = "forceDisconnected"
    SERVER_SHUTDOWN = "serverShutdown"
    SLOW_CONSUMER = "slowConsumer"
    NODE_FAILURE = "nodeFailure"
    MEDIA_STOPPED = "mediaStopped"
    FORCE_UNPUBLISHED = "forceUnpublished"

    @classmethod
    def from_disconnect(cls, reason: DisconnectReason) -> StreamDestroyedReason:
        return cls(reason.value)
