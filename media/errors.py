"""Media errors: one root with a stable code; the edge maps them to wire error replies."""

from __future__ import annotations

from typing import ClassVar


class MediaError(Exception):
    """An SDP or ICE candidate could not be applied."""

    code: ClassVar[str] = "media_error"


class PeerNotFound(MediaError):
    code: ClassVar[str] = "not_found"


class AlreadyAnswered(MediaError):
    """A subscription's offer was answered already (or an answer is being applied)."""

    code: ClassVar[str] = "invalid_state"
