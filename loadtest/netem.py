"""A network profile applied in a synthetic client's own UDP path, like ``tc netem``
but per client and without privileges.

``Impairment`` is the pure part: given ``now`` and a datagram's size it says when
the datagram is delivered, or that it is dropped. In order:

1. burst loss: every ``burst.every_s`` seconds (from the first datagram) every
   datagram is dropped for ``burst.length_ms``;
2. random loss: each datagram independently with probability ``loss_pct`` / 100;
3. bandwidth cap: a FIFO link of ``bandwidth_kbps`` (serialization time
   size x 8 / rate) with a queue of at most ``QUEUE_S`` (200 ms) of waiting: a
   datagram that would wait longer is dropped (drop-tail), as a router's buffer
   does; a short burst within the queue is delayed, not dropped;
4. delay and jitter: ``delay_ms`` plus a uniform draw in ±``jitter_ms``, never
   earlier than the previous datagram's delivery, so jitter does not reorder
   (a retransmission is the only packet a receiver sees late).

``impair(pc, profile)`` puts one ``Impairment`` per direction on every ICE socket
of an aiortc peer connection: ``up`` wraps the socket's data send
(``StunProtocol.send_data``), ``down`` its ``datagram_received``. Only SRTP/SRTCP
datagrams (first byte 128-191, RFC 7983) are impaired: STUN (ICE checks and
consent) and DTLS (the handshake) pass untouched, so a lossy profile changes the
media, not whether the call connects or stays up. Delays are scheduled with
``loop.call_at``; nothing sleeps. Call it after ``setLocalDescription`` (the
sockets exist from candidate gathering on).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from loadtest import hooks

QUEUE_S: Final = 0.2
DIRECTIONS: Final = ("up", "down", "both")


@dataclass(frozen=True)
class BurstLoss:
    every_s: float              # a burst starts every every_s seconds
    length_ms: float            # and drops every packet for length_ms

    def __post_init__(self) -> None:
        if not self.every_s > 0 or not 0 <= self.length_ms <= self.every_s * 1000:
            raise ValueError(f"burst: every_s must be > 0 and length_ms within 0..every_s*1000, "
                             f"not every_s={self.every_s} length_ms={self.length_ms}")


@dataclass(frozen=True)
class NetworkProfile:
    loss_pct: float = 0.0       # random loss
    delay_ms: float = 0.0       # added one-way delay
    jitter_ms: float = 0.0      # uniform +- jitter on the delay
    bandwidth_kbps: float | None = None   # token-bucket cap
    burst: BurstLoss | None = None
    direction: str = "both"     # "up" (what the client sends), "down" (what it receives) or "both"

    def __post_init__(self) -> None:
        if not 0 <= self.loss_pct <= 100:
            raise ValueError(f"loss_pct must be within 0..100, not {self.loss_pct}")
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"delay_ms and jitter_ms must be >= 0, not {self.delay_ms} and {self.jitter_ms}")
        if self.bandwidth_kbps is not None and not self.bandwidth_kbps > 0:
            raise ValueError(f"bandwidth_kbps must be > 0, not {self.bandwidth_kbps}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {self.direction!r}")

    def applies(self, direction: str) -> bool:
        return self.direction in (direction, "both")


@dataclass
class ImpairmentCounts:
    """Datagrams seen and what happened to them (plain ints)."""

    passed: int = 0
    lost_random: int = 0
    lost_burst: int = 0
    lost_queue: int = 0
    bytes_passed: int = 0


class Impairment:
    """One direction of a profile: ``schedule(now, size)`` is the delivery time, or
    None for a drop. ``rng`` is passed in so tests are reproducible."""

    def __init__(self, profile: NetworkProfile, rng: random.Random | None = None) -> None:
        self.profile = profile
        self.rng = rng or random.Random()
        self.counts = ImpairmentCounts()
        self._loss = profile.loss_pct / 100.0
        self._delay = profile.delay_ms / 1000.0
        self._jitter = profile.jitter_ms / 1000.0
        self._rate = profile.bandwidth_kbps * 1000.0 / 8.0 if profile.bandwidth_kbps else 0.0  # bytes/s
        self._start: float | None = None
        self._link_free_at = 0.0
        self._last_due = 0.0

    def schedule(self, now: float, size: int) -> float | None:
        counts = self.counts
        burst = self.profile.burst
        if burst is not None:
            if self._start is None:
                self._start = now
            if (now - self._start) % burst.every_s < burst.length_ms / 1000.0:
                counts.lost_burst += 1
                return None
        if self._loss and self.rng.random() < self._loss:
            counts.lost_random += 1
            return None
        due = now
        if self._rate:
            start = max(now, self._link_free_at)
            if start - now > QUEUE_S:
                counts.lost_queue += 1
                return None
            self._link_free_at = due = start + size / self._rate
        if self._delay or self._jitter:
            due += self._delay + (self.rng.uniform(-self._jitter, self._jitter) if self._jitter else 0.0)
        if due < self._last_due:
            due = self._last_due
        self._last_due = due
        counts.passed += 1
        counts.bytes_passed += size
        return due


def _is_media(data: bytes) -> bool:
    return bool(data) and 127 < data[0] < 192


@dataclass
class NetworkImpairment:
    """The impairments installed on one client's peer connections, per direction."""

    profile: NetworkProfile
    up: Impairment | None = None
    down: Impairment | None = None
    _wrapped: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.profile.applies("up"):
            self.up = Impairment(self.profile)
        if self.profile.applies("down"):
            self.down = Impairment(self.profile)

    def install(self, pc: Any) -> None:
        """Wrap every ICE socket of ``pc`` (idempotent per socket)."""
        loop = asyncio.get_running_loop()
        for protocol in hooks.ice_protocols(pc):
            if id(protocol) in self._wrapped:
                continue
            self._wrapped.add(id(protocol))
            if self.up is not None:
                hooks.wrap_send_data(protocol, _impaired_send(self.up, protocol, loop))
            if self.down is not None:
                hooks.wrap_datagram_received(protocol, _impaired_receive(self.down, loop))


def _impaired_send(impairment: Impairment, protocol: Any,
                   loop: asyncio.AbstractEventLoop) -> Callable[[Callable[[bytes, Any], None]], Callable[[bytes, Any], None]]:
    def wrap(sendto: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
        def send(data: bytes, addr: Any) -> None:
            if not _is_media(data):
                sendto(data, addr)
                return
            now = loop.time()
            due = impairment.schedule(now, len(data))
            if due is None:
                return
            if due <= now:
                sendto(data, addr)
            else:
                loop.call_at(due, _send_if_open, protocol, sendto, data, addr)
        return send
    return wrap


def _send_if_open(protocol: Any, sendto: Callable[[bytes, Any], None], data: bytes, addr: Any) -> None:
    transport = getattr(protocol, "transport", None)
    if transport is not None and not transport.is_closing():
        sendto(data, addr)


def _impaired_receive(impairment: Impairment,
                      loop: asyncio.AbstractEventLoop) -> Callable[[Callable[[bytes, Any], None]], Callable[[bytes, Any], None]]:
    def wrap(received: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
        def datagram_received(data: bytes, addr: Any) -> None:
            if not _is_media(data):
                received(data, addr)
                return
            now = loop.time()
            due = impairment.schedule(now, len(data))
            if due is None:
                return
            if due <= now:
                received(data, addr)
            else:
                loop.call_at(due, received, data, addr)
        return datagram_received
    return wrap
