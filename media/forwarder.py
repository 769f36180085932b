"""The forwarder's decisions as pure parts: each takes a packet's fields (or an RTCP
request) and ``now``, and returns what to send or why it drops. None reads the
clock or does I/O; ``media/router.py`` wires them to aiortc and sends.

- ``RtpTranslator``: one subscriber's sequence numbers and timestamps. The
  subscriber sees one continuous stream (its own random base, 16-bit sequence and
  32-bit timestamp wraparound) whatever the publisher does: gaps pass through as
  gaps, packets older than the subscriber's start are dropped, and a new source
  (the publisher's SSRC changed) continues the sequence at the next number and the
  timestamp by the time elapsed. Learnt from LiveKit's ``RTPMunger`` /
  ``forwarder.GetTranslationParams``.
- ``KeyframeGate``: a video subscriber gets nothing until a keyframe, at its start
  and after every source switch (a decoder cannot use a delta frame before one).
- ``PacketCache`` and ``NackResponder``: the last second or so of a published
  video track, sized by its packet rate, and the answer to a subscriber's NACK:
  the packets to resend, and those to NACK upstream. (pion's ``nack`` interceptor.)
- ``PliLimiter``: at most one keyframe request upstream per interval; a request in
  between is held and retried.
- ``RembAggregator``: the estimate sent upstream is the lowest fresh one of the
  subscribers (an estimate not renewed within ``max_age_s`` no longer counts).
- ``sender_report_rtp_time``: the RTP time of a subscriber's sender report,
  following the publisher's NTP↔RTP mapping so audio and video stay in sync.

The hot path calls ``RtpTranslator.admit`` once per packet per subscriber and
``PacketCache.put`` once per video packet: a few integer operations and attribute
stores, no allocation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from media.events import ForwardDropReason


class KeyframeGate:
    """Closed until a keyframe passes (video only; audio is never gated)."""

    __slots__ = ("waiting", "_video")

    def __init__(self, video: bool) -> None:
        self.waiting = video
        self._video = video

    def close(self) -> None:
        """A new source starts: wait for its keyframe again (video)."""
        self.waiting = self._video

    def passes(self, keyframe: bool) -> bool:
        if self.waiting and not keyframe:
            return False
        self.waiting = False
        return True


class RtpTranslator(KeyframeGate):
    """One subscriber's view of a published track: which packets it gets and with what
    sequence number and timestamp.

    ``admit(ssrc, seq, ts, keyframe, now)`` returns None when the packet is forwarded,
    after which ``out_seq(seq)`` / ``out_ts(ts)`` (or ``seq_offset`` / ``ts_offset``
    directly) give its rewritten numbers; otherwise the ``ForwardDropReason``.
    Sequence numbers are tracked extended (never wrapping) so "older than the start"
    stays right across 65535 → 0.
    """

    __slots__ = ("clock_rate", "source", "seq_offset", "ts_offset", "highest", "start",
                 "last_out_seq", "last_out_ts", "last_time", "forwarded")

    def __init__(self, clock_rate: int, video: bool, seq_base: int, ts_base: int) -> None:
        super().__init__(video)  # the subscriber's keyframe gate (``waiting``, ``close``)
        self.clock_rate = clock_rate
        #: SSRC of the publisher's stream being forwarded (0: none yet).
        self.source = 0
        self.seq_offset = 0
        self.ts_offset = 0
        #: Extended (unwrapped) sequence numbers of the newest packet and the first one of
        #: the current source.
        self.highest = 0
        self.start = 0
        #: The numbers the next source continues from (before any: the random bases).
        self.last_out_seq = (seq_base - 1) & 0xFFFF
        self.last_out_ts = ts_base & 0xFFFFFFFF
        self.last_time: float | None = None
        self.forwarded = False

    def admit(self, ssrc: int, seq: int, ts: int, keyframe: bool, now: float) -> ForwardDropReason | None:
        if ssrc != self.source or self.waiting:
            return self._admit_first(ssrc, seq, ts, keyframe, now)
        highest = self.highest
        # Signed distance from the newest, -32768 … 32767: beyond half the 16-bit space
        # "behind" and "ahead" cannot be told apart.
        delta = ((seq - highest + 0x8000) & 0xFFFF) - 0x8000
        if delta > 0:
            self.highest = highest + delta
        elif highest + delta < self.start:
            return ForwardDropReason.TOO_OLD
        self.last_time = now
        return None

    def _admit_first(self, ssrc: int, seq: int, ts: int, keyframe: bool, now: float) -> ForwardDropReason | None:
        """A packet of a new source, or one while the gate waits for a keyframe."""
        if ssrc != self.source:
            if self.source:
                self.close()  # a new source: its first frame must be a keyframe
            if not self.passes(keyframe):
                return ForwardDropReason.WAITING_KEYFRAME
            self._switch(ssrc, seq, ts, now)
            return None
        if not self.passes(keyframe):
            return ForwardDropReason.WAITING_KEYFRAME
        return self.admit(ssrc, seq, ts, keyframe, now)  # the gate is open: the usual path

    def _switch(self, ssrc: int, seq: int, ts: int, now: float) -> None:
        """The first packet of a source: continue right after what was sent before."""
        if self.forwarded:
            self.last_out_seq = (self.highest + self.seq_offset) & 0xFFFF
            # The subscriber's clock keeps running: advance by the time since the last packet.
            elapsed = now - self.last_time if self.last_time is not None else 0.0
            self.last_out_ts = (self.last_out_ts + max(1, int(elapsed * self.clock_rate))) & 0xFFFFFFFF
        first_out_seq = (self.last_out_seq + 1) & 0xFFFF
        self.seq_offset = (first_out_seq - seq) & 0xFFFF
        self.ts_offset = (self.last_out_ts - ts) & 0xFFFFFFFF
        self.source = ssrc
        # Extended numbers live in the 32-bit range above 0 so "older" never goes negative.
        self.highest = self.start = 0x10000 + seq
        self.last_time = now
        self.forwarded = True

    def sent(self, out_ts: int) -> None:
        """Record the timestamp of the last packet sent (a switch continues from it)."""
        self.last_out_ts = out_ts

    def out_seq(self, seq: int) -> int:
        return (seq + self.seq_offset) & 0xFFFF

    def out_ts(self, ts: int) -> int:
        return (ts + self.ts_offset) & 0xFFFFFFFF

    def in_seq(self, out_seq: int) -> int:
        """The publisher's sequence number of one the subscriber saw (for its NACKs)."""
        return (out_seq - self.seq_offset) & 0xFFFF


class PacketCache:
    """A ring of the last packets of a video track (payload, timestamp, marker, by
    sequence number) for retransmission, sized by time: ``resize_for_rate`` keeps at
    least ``seconds`` of media at the measured packet rate, between ``min_slots`` and
    ``max_slots`` (powers of two). Parallel lists: storing a packet allocates nothing."""

    __slots__ = ("mask", "seqs", "stamps", "markers", "payloads", "last", "seconds", "min_slots", "max_slots")

    def __init__(self, seconds: float = 1.0, min_slots: int = 128, max_slots: int = 2048) -> None:
        if min_slots & (min_slots - 1) or max_slots & (max_slots - 1) or not 0 < min_slots <= max_slots:
            raise ValueError(f"cache slots must be powers of two, min <= max (got {min_slots}, {max_slots})")
        self.seconds = seconds
        self.min_slots = min_slots
        self.max_slots = max_slots
        self.mask = min_slots - 1
        self.seqs: list[int] = [-1] * min_slots
        self.stamps: list[int] = [0] * min_slots
        self.markers: list[int] = [0] * min_slots
        self.payloads: list[bytes] = [b""] * min_slots
        self.last = -1  # the slot written last (the newest packet)

    @property
    def capacity(self) -> int:
        return self.mask + 1

    def put(self, seq: int, ts: int, marker: int, payload: bytes) -> None:
        i = seq & self.mask
        self.seqs[i] = seq
        self.stamps[i] = ts
        self.markers[i] = marker
        self.payloads[i] = payload
        self.last = i

    def get(self, seq: int) -> tuple[int, int, bytes] | None:
        """(timestamp, marker, payload) of packet ``seq`` if still cached."""
        i = seq & self.mask
        if self.seqs[i] != seq:
            return None
        return self.stamps[i], self.markers[i], self.payloads[i]

    def slots_for_rate(self, packets_per_s: float) -> int:
        wanted = max(1, int(packets_per_s * self.seconds + 0.999))
        slots = 1 << (wanted - 1).bit_length()
        return min(self.max_slots, max(self.min_slots, slots))

    def resize_for_rate(self, packets_per_s: float) -> bool:
        """Grow to hold ``seconds`` of media at this rate, or shrink once it needs a
        quarter of the slots (hysteresis: a rate hovering at a boundary does not flap).
        Cached packets are kept where they still fit. Returns True if resized."""
        slots = self.slots_for_rate(packets_per_s)
        capacity = self.mask + 1
        if slots == capacity or capacity // 4 < slots < capacity:
            return False
        old = list(zip(self.seqs, self.stamps, self.markers, self.payloads))
        start = self.last + 1
        self.mask = slots - 1
        self.seqs = [-1] * slots
        self.stamps = [0] * slots
        self.markers = [0] * slots
        self.payloads = [b""] * slots
        self.last = -1
        # Re-insert oldest first (the ring from just after the newest slot), so when a
        # shrink maps two packets to one slot the newer one stays.
        for seq, ts, marker, payload in old[start:] + old[:start]:
            if seq >= 0:
                self.put(seq, ts, marker, payload)
        return True


@dataclass(frozen=True, slots=True)
class Resend:
    """One packet to send again, in the subscriber's numbering."""

    seq: int
    timestamp: int
    marker: int
    payload: bytes


class NackResponder:
    """Answers a subscriber's NACK from the track's ``PacketCache``. ``max_per_nack``
    bounds the work one RTCP packet can ask for (a NACK can name thousands)."""

    __slots__ = ("max_per_nack",)

    def __init__(self, max_per_nack: int = 256) -> None:
        self.max_per_nack = max_per_nack

    def respond(self, lost: Iterable[int], cache: PacketCache,
                translator: RtpTranslator) -> tuple[list[Resend], list[int]]:
        """For the subscriber's lost sequence numbers: the packets to resend (rewritten to
        the subscriber's numbering) and the publisher's sequence numbers to NACK upstream."""
        resend: list[Resend] = []
        upstream: list[int] = []
        seen: set[int] = set()
        for out_seq in lost:
            if len(seen) >= self.max_per_nack:
                break
            out_seq &= 0xFFFF
            if out_seq in seen:
                continue
            seen.add(out_seq)
            in_seq = translator.in_seq(out_seq)
            hit = cache.get(in_seq)
            if hit is None:
                upstream.append(in_seq)
            else:
                ts, marker, payload = hit
                resend.append(Resend(out_seq, translator.out_ts(ts), marker, payload))
        return resend, upstream


class PliLimiter:
    """At most one keyframe request per ``interval_s``; one asked for in between is
    held (``pending``) and sent by ``retry`` once the interval has passed, unless a
    keyframe came meanwhile."""

    __slots__ = ("interval_s", "last", "pending")

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last: float | None = None
        self.pending = False

    def request(self, now: float) -> bool:
        """True: send a PLI now. False: held (pending) until ``retry`` may send it."""
        if self.last is not None and now - self.last < self.interval_s:
            self.pending = True
            return False
        self.last = now
        self.pending = False
        return True

    def hold(self) -> None:
        """Wanted but cannot be sent yet (the publisher's SSRC is unknown)."""
        self.pending = True

    def retry(self, now: float) -> bool:
        return self.pending and self.request(now)

    def keyframe_received(self) -> None:
        self.pending = False


class RembAggregator:
    """The bandwidth estimate for the publisher: the lowest of its subscribers' fresh
    REMBs (one slow subscriber caps the stream; without simulcast there is no other choice)."""

    __slots__ = ("max_age_s", "estimates")

    def __init__(self, max_age_s: float = 5.0) -> None:
        self.max_age_s = max_age_s
        self.estimates: dict[int, tuple[int, float]] = {}

    def update(self, subscriber: int, bitrate_bps: int, now: float) -> None:
        self.estimates[subscriber] = (bitrate_bps, now)

    def remove(self, subscriber: int) -> None:
        self.estimates.pop(subscriber, None)

    def estimate(self, now: float) -> int | None:
        """The lowest estimate renewed within ``max_age_s``, or None (send no REMB)."""
        fresh = [bps for bps, at in self.estimates.values() if now - at <= self.max_age_s and bps > 0]
        return min(fresh) if fresh else None


def sender_report_rtp_time(ntp: int, now: float, clock_rate: int, ts_offset: int,
                           publisher_sr: tuple[int, int] | None, last_ts: int, last_sent: float) -> int:
    """The RTP timestamp a subscriber's sender report pairs with NTP time ``ntp`` (wall
    time ``now``). With the publisher's last SR (its NTP, RTP pair) the publisher's own
    mapping is followed, shifted into the subscriber's numbering, so lip sync survives the
    SFU; before one, the last sent timestamp is extrapolated from when it was sent."""
    if publisher_sr is not None:
        sr_ntp, sr_rtp = publisher_sr
        elapsed = (ntp - sr_ntp) / 4294967296.0
        return (sr_rtp + int(elapsed * clock_rate) + ts_offset) & 0xFFFFFFFF
    return (last_ts + int((now - last_sent) * clock_rate)) & 0xFFFFFFFF
