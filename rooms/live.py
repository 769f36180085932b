"""Live sessions: who is connected to a room instance right now, what they publish
and who subscribes to it. Pure bookkeeping (no I/O); the edge persists and emits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rooms.model import ConnectionId, Role, SessionId, StreamId, SubscriptionId, new_id


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class LiveConnection:
    connection_id: ConnectionId
    name: str
    role: Role
    user_id: str
    user_agent: str = ""
    ip: str = ""
    joined_at: int = field(default_factory=_now_ms)

    def public(self) -> dict[str, Any]:
        return {"connection_id": self.connection_id, "name": self.name, "role": str(self.role),
                "joined_at": self.joined_at}


@dataclass
class LiveStream:
    stream_id: StreamId
    connection_id: ConnectionId
    name: str
    video_source: str
    has_audio: bool
    has_video: bool
    created_at: int = field(default_factory=_now_ms)

    def public(self) -> dict[str, Any]:
        return {"stream_id": self.stream_id, "connection_id": self.connection_id, "name": self.name,
                "video_source": self.video_source, "has_audio": self.has_audio, "has_video": self.has_video,
                "created_at": self.created_at}


@dataclass
class LiveSubscription:
    subscription_id: SubscriptionId
    connection_id: ConnectionId
    stream_id: StreamId


@dataclass
class LiveSession:
    """One room instance: created at the first join, ended when the last connection leaves."""

    session_id: SessionId
    room: str
    started_at: int = field(default_factory=_now_ms)
    connections: dict[ConnectionId, LiveConnection] = field(default_factory=dict)
    streams: dict[StreamId, LiveStream] = field(default_factory=dict)
    subscriptions: dict[SubscriptionId, LiveSubscription] = field(default_factory=dict)

    def streams_of(self, connection_id: ConnectionId) -> list[LiveStream]:
        return [s for s in self.streams.values() if s.connection_id == connection_id]

    def subscriptions_of(self, connection_id: ConnectionId) -> list[LiveSubscription]:
        return [s for s in self.subscriptions.values() if s.connection_id == connection_id]

    def subscriptions_to(self, stream_id: StreamId) -> list[LiveSubscription]:
        return [s for s in self.subscriptions.values() if s.stream_id == stream_id]


class LiveRegistry:
    """The live sessions of this node, by session id and by room."""

    def __init__(self) -> None:
        self.sessions: dict[SessionId, LiveSession] = {}
        self.by_room: dict[str, SessionId] = {}

    def session_for_room(self, room: str, session_id: SessionId | None = None) -> tuple[LiveSession, bool]:
        """The room's current session, or a new one (with ``session_id`` if given, else a
        fresh id); the flag says whether it was created."""
        current = self.by_room.get(room)
        if current is not None:
            return self.sessions[current], False
        session = LiveSession(session_id or SessionId(new_id("s")), room)
        self.sessions[session.session_id] = session
        self.by_room[room] = session.session_id
        return session, True

    def end_if_empty(self, session: LiveSession) -> bool:
        if session.connections:
            return False
        self.sessions.pop(session.session_id, None)
        if self.by_room.get(session.room) == session.session_id:
            del self.by_room[session.room]
        return True
