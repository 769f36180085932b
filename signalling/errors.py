"""Coded errors of the wire protocol: one root, one subclass per code in docs/protocol.md.

Each error carries a human message that names the input and what was wrong. The codes are
what clients see in ``{"ok": false, "error": {"code", "message"}}``; nothing here knows HTTP or
WebSocket close codes, the handler maps them in one place.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Final

from rooms.errors import RoomsError

#: A request id as the client sent it: an integer or a short string (see the schemas).
RequestId = int | str


class ErrorCode(StrEnum):
    """Every error code of protocol v1 (the table in docs/protocol.md)."""

    INVALID_MESSAGE = "invalid_message"
    MESSAGE_TOO_LARGE = "message_too_large"
    UNAUTHORIZED = "unauthorized"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    ROOM_MISMATCH = "room_mismatch"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INVALID_STATE = "invalid_state"
    INVALID_INPUT = "invalid_input"
    CONFLICT = "conflict"
    TOO_EARLY = "too_early"
    TOO_LATE = "too_late"
    RATE_LIMITED = "rate_limited"
    MEDIA_ERROR = "media_error"
    OVER_CAPACITY = "over_capacity"
    CODEC_NOT_SUPPORTED = "codec_not_supported"
    CLUSTER_UNAVAILABLE = "cluster_unavailable"
    DRAINING = "draining"
    INTERNAL_ERROR = "internal_error"


class OpenConsultError(Exception):
    """Root of every coded error the edge turns into an error response."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ProtocolError(OpenConsultError):
    """A frame that could not be accepted as a request; ``request_id`` is set when it was readable."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_MESSAGE

    def __init__(self, message: str, request_id: RequestId | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, request_id={self.request_id!r})"


class InvalidMessage(ProtocolError):
    """Not JSON/msgpack, not an object, unknown ``type``, or a field missing or wrongly typed."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_MESSAGE


class MessageTooLarge(ProtocolError):
    """A frame bigger than ``server.max_message_bytes``."""

    code: ClassVar[ErrorCode] = ErrorCode.MESSAGE_TOO_LARGE


class AuthError(OpenConsultError):
    """Root of the join-token refusals (their codes label ``openconsult_tokens_rejected_total``)."""

    code: ClassVar[ErrorCode] = ErrorCode.UNAUTHORIZED


class Unauthorized(AuthError):
    """Token missing, malformed or forged, or a request before ``join``."""

    code: ClassVar[ErrorCode] = ErrorCode.UNAUTHORIZED


class TokenExpired(AuthError):
    code: ClassVar[ErrorCode] = ErrorCode.TOKEN_EXPIRED


class TokenNotYetValid(AuthError):
    code: ClassVar[ErrorCode] = ErrorCode.TOKEN_NOT_YET_VALID


class RoomMismatch(AuthError):
    code: ClassVar[ErrorCode] = ErrorCode.ROOM_MISMATCH


class Forbidden(OpenConsultError):
    """The role may not do this."""

    code: ClassVar[ErrorCode] = ErrorCode.FORBIDDEN


class NotFound(OpenConsultError):
    """Unknown stream, subscription or peer id."""

    code: ClassVar[ErrorCode] = ErrorCode.NOT_FOUND


class InvalidState(OpenConsultError):
    """Request not allowed now (join twice, publish before join, answer without offer)."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_STATE


class InvalidInput(OpenConsultError):
    """A well-formed request whose values the workflow refuses (empty or oversized chat text, …)."""

    code: ClassVar[ErrorCode] = ErrorCode.INVALID_INPUT


class Conflict(OpenConsultError):
    """Already exists, already waiting elsewhere, or lost a race to a concurrent writer."""

    code: ClassVar[ErrorCode] = ErrorCode.CONFLICT


class TooEarly(OpenConsultError):
    """Before a time window opened (a join link, a no-show before the grace period ran out)."""

    code: ClassVar[ErrorCode] = ErrorCode.TOO_EARLY


class TooLate(OpenConsultError):
    """After a time window closed (a join link)."""

    code: ClassVar[ErrorCode] = ErrorCode.TOO_LATE


class RateLimited(OpenConsultError):
    """Too many requests of one kind from one source; try again after ``retry_after_s``."""

    code: ClassVar[ErrorCode] = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, retry_after_s: int = 60) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MediaError(OpenConsultError):
    """The SDP or ICE candidate could not be applied."""

    code: ClassVar[ErrorCode] = ErrorCode.MEDIA_ERROR


class OverCapacity(OpenConsultError):
    """This node holds ``media.max_peer_connections`` peer connections already; nothing was done."""

    code: ClassVar[ErrorCode] = ErrorCode.OVER_CAPACITY


class CodecNotSupported(OpenConsultError):
    """A publish offers no codec the SFU relays, or a subscriber cannot receive the codec a
    stream is published in (the SFU does not transcode)."""

    code: ClassVar[ErrorCode] = ErrorCode.CODEC_NOT_SUPPORTED


class ClusterUnavailable(OpenConsultError):
    """The cluster's shared store (Redis) does not answer: what needs it (a new room, a walk-in)
    was not done; calls in progress go on. Retry shortly."""

    code: ClassVar[ErrorCode] = ErrorCode.CLUSTER_UNAVAILABLE


class Draining(OpenConsultError):
    """A join for a room this node does not hold reached it while it drains, and no other node
    can take the room: join through another node."""

    code: ClassVar[ErrorCode] = ErrorCode.DRAINING


class InternalError(OpenConsultError):
    """A bug on our side; the handler logs the trace and sends this without details."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR


#: The class for each code (the most specific one; ProtocolError and AuthError are bases).
ERRORS_BY_CODE: Final[dict[ErrorCode, type[OpenConsultError]]] = {
    cls.code: cls
    for cls in (
        InvalidMessage,
        MessageTooLarge,
        Unauthorized,
        TokenExpired,
        TokenNotYetValid,
        RoomMismatch,
        Forbidden,
        NotFound,
        InvalidState,
        InvalidInput,
        Conflict,
        TooEarly,
        TooLate,
        RateLimited,
        MediaError,
        OverCapacity,
        CodecNotSupported,
        ClusterUnavailable,
        Draining,
        InternalError,
    )
}

# rooms/ codes that have no class of their own on the wire.
_ROOMS_ALIASES: Final[dict[str, ErrorCode]] = {"invalid_token": ErrorCode.UNAUTHORIZED,
                                               "room_elsewhere": ErrorCode.CLUSTER_UNAVAILABLE}


def coded(error: OpenConsultError | RoomsError) -> OpenConsultError:
    """A rooms/ domain error as the wire error with the same code (the message is kept);
    wire errors are returned as they are. The WebSocket and HTTP error paths both call this."""
    if isinstance(error, OpenConsultError):
        return error
    try:
        code = _ROOMS_ALIASES.get(error.code) or ErrorCode(error.code)
    except ValueError:
        return InternalError(error.message)
    return ERRORS_BY_CODE[code](error.message)
