"""Typed events the media plane emits to its observer (the edge logs them, metrics samples them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerStateChanged:
    """ICE or DTLS state of one peer connection (a publish or a subscription) changed."""

    peer_id: str
    stream_id: str
    layer: str  # "ice" | "dtls" | "connection"
    state: str
    pair: dict[str, str] | None = None


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
              | QualitySample)
Observer = Callable[[MediaEvent], None]
