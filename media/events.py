"""Typed events the media plane emits to its observer (the edge logs them, metrics samples them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class DatagramDropReason(StrEnum):
    """Why a UDP datagram on a media socket never reached aiortc (RFC 7983 demux, and the
    routing of the shared port when ``media.udp_port`` is set)."""

    #: A zero-length datagram.
    EMPTY = "empty"
    #: First byte outside the STUN (0-3), DTLS (20-63) and RTP/RTCP (128-191) ranges.
    UNKNOWN = "unknown"
    #: First byte says STUN but the message does not parse or cannot be handled.
    MALFORMED_STUN = "malformed_stun"
    #: DTLS or SRTP/SRTCP from an address other than the selected ICE pair's remote one
    #: (or before a pair is selected).
    NOT_SELECTED_PAIR = "not_selected_pair"
    #: Shared port: DTLS, SRTP/SRTCP, a STUN response or junk from an address no peer
    #: connection holds (it never sent an authenticated check, nor was sent one).
    UNKNOWN_ADDRESS = "unknown_address"
    #: Shared port: a STUN request whose USERNAME names no peer connection (or has none).
    UNKNOWN_USERNAME = "unknown_username"


class ForwardDropReason(StrEnum):
    """Why an RTP packet of a published track was not sent to one subscriber."""

    #: Video before the subscriber's first keyframe (at its start or after the publisher's
    #: source changed): its decoder could not use it.
    WAITING_KEYFRAME = "waiting_keyframe"
    #: Older than the first packet the subscriber got from this source (late reordering).
    TOO_OLD = "too_old"
    #: The subscriber's transport could not send (not connected, or being closed).
    NOT_SENT = "not_sent"


@dataclass(frozen=True)
class PeerStateChanged:
    """ICE or DTLS state of one peer connection (a publish or a subscription) changed."""

    peer_id: str
    stream_id: str
    layer: str  # "ice" | "dtls" | "connection"
    state: str
    pair: dict[str, str] | None = None
    #: On "failed": the candidates each side offered (``Peer.offered_candidates``).
    local_candidates: tuple[dict[str, str], ...] = ()
    remote_candidates: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class KeyframeRequested:
    stream_id: str
    reason: str
    subscription_id: str | None = None


@dataclass(frozen=True)
class DimensionsChanged:
    stream_id: str
    width: int
    height: int


@dataclass(frozen=True)
class MediaFlowChanged:
    """A published track stopped (no packet for ``idle_s``) or started flowing again."""

    stream_id: str
    kind: str
    flowing: bool
    idle_s: float


@dataclass(frozen=True)
class PeerFailed:
    """A peer connection failed or was closed by the far end; its owner cleans up."""

    peer_id: str
    stream_id: str
    state: str


@dataclass(frozen=True)
class PeerTimedOut:
    """A peer connection was not connected (ICE and DTLS) within ``timeout_s``; the router
    has closed it, its owner cleans up. ``ice_state`` is how far ICE got ("completed": a pair
    was nominated but DTLS never connected over it); the candidates are what each side
    offered: the server's own and the client's (``{"type", "protocol", "address"}``)."""

    peer_id: str
    stream_id: str
    timeout_s: float
    ice_state: str = "new"
    local_candidates: tuple[dict[str, str], ...] = ()
    remote_candidates: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class PeerClosedUnconnected:
    """A peer connection its owner closed (unpublish, unsubscribe, leave) ``after_s`` after it was
    created without ever connecting (e.g. the client gave up on its own deadline): how far ICE
    got and the candidates each side offered, as in :class:`PeerTimedOut`."""

    peer_id: str
    stream_id: str
    after_s: float
    ice_state: str = "new"
    local_candidates: tuple[dict[str, str], ...] = ()
    remote_candidates: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class DatagramsDropped:
    """Datagrams dropped by the demultiplexer since the previous event, by reason."""

    counts: Mapping[DatagramDropReason, int]


@dataclass(frozen=True)
class PacketsDropped:
    """RTP packets not forwarded to a subscriber since the previous event, by reason."""

    counts: Mapping[ForwardDropReason, int]


@dataclass(frozen=True)
class QualitySample:
    """One interval of one track, upstream (direction "in", a publisher) or
    downstream (direction "out", a subscriber)."""

    peer_id: str
    stream_id: str
    direction: str
    kind: str
    time_ms: int
    interval_s: float
    bitrate_kbps: float
    packets: int
    packets_lost: int
    loss_pct: float
    jitter_ms: float | None
    rtt_ms: float | None
    frame_rate: float | None
    width: int | None
    height: int | None
    nacks: int
    plis: int
    remb_kbps: float | None = None
    #: RTP payload bytes in the interval, and (downstream) packets resent for NACKs.
    octets: int = 0
    retransmitted: int = 0


MediaEvent = (PeerStateChanged | KeyframeRequested | DimensionsChanged | MediaFlowChanged | PeerFailed
              | PeerTimedOut | PeerClosedUnconnected | DatagramsDropped | PacketsDropped | QualitySample)
Observer = Callable[[MediaEvent], None]
