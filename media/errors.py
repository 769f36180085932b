"""Media errors: one root with a stable code; the edge maps them to wire error replies."""

from __future__ import annotations

from typing import ClassVar


class MediaError(Exception):
    """An SDP or ICE candidate could not be applied."""

    code: ClassVar[str] = "media_error"


class PeerNotFound(MediaError):
    code: ClassVar[str] = "not_found"


class OverCapacity(MediaError):
    """This node holds ``media.max_peer_connections`` peer connections already."""

    code: ClassVar[str] = "over_capacity"


class AlreadyAnswered(MediaError):
    """A subscription's offer was answered already (or an answer is being applied)."""

    code: ClassVar[str] = "invalid_state"


class CodecNotSupported(MediaError):
    """A publish offers no codec the SFU relays, or a subscriber cannot receive the codec the
    stream is published in (the SFU does not transcode)."""

    code: ClassVar[str] = "codec_not_supported"
