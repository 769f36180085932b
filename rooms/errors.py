"""Domain errors of rooms/: one root with a stable ``code``, no HTTP knowledge.

The edge (signalling/) maps ``code`` to an HTTP status or a WebSocket error frame in one place.
Every error is raised *before* anything is persisted, so a caught error means nothing changed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class RoomsError(Exception):
    """Root of every error rooms/ raises on purpose."""

    code: ClassVar[str] = "rooms_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidTransition(RoomsError):
    """An event that the machine's transition table does not allow in the current state."""

    code: ClassVar[str] = "invalid_state"

    def __init__(self, state: StrEnum, event: StrEnum, subject: str | None = None) -> None:
        self.state = state
        self.event = event
        self.subject = subject
        what = f' "{subject}"' if subject else ""
        super().__init__(f'Cannot {event.value}{what} in state "{state.value}"')


class NotFound(RoomsError):
    code: ClassVar[str] = "not_found"

    def __init__(self, what: str, ident: str) -> None:
        self.what = what
        self.ident = ident
        super().__init__(f'No {what} "{ident}"')


class Forbidden(RoomsError):
    code: ClassVar[str] = "forbidden"


class InvalidInput(RoomsError):
    code: ClassVar[str] = "invalid_input"


class Conflict(RoomsError):
    """A compare-and-set lost against a concurrent writer, or a uniqueness rule was hit."""

    code: ClassVar[str] = "conflict"


class TooEarly(RoomsError):
    """A join link or a no-show used before its time window opened."""

    code: ClassVar[str] = "too_early"


class TooLate(RoomsError):
    """A join link used after its time window closed."""

    code: ClassVar[str] = "too_late"


class InvalidToken(RoomsError):
    code: ClassVar[str] = "invalid_token"


class InvalidGuest(RoomsError):
    """A guest that cannot be added (the consultation's state, too many guests) or removed (already
    removed)."""

    code: ClassVar[str] = "invalid_state"
