"""What a synthetic subscriber learns from the RTP it receives, without decoding:
pure objects that take a packet's fields and ``now`` (seconds, ``time.monotonic()``)
and return what happened or what to send. The aiortc glue is in ``loadtest.synthetic``.

- ``ReceiveCounter``: extended sequence numbers (wraparound), packets expected
  (highest - first + 1) and received on their first transmission, packets that
  arrived only after a NACK (``recovered``), duplicates, RFC 3550 interarrival
  jitter, and which missing packets to NACK now (browser-like: at once when a gap
  shows, again every ``NACK_RETRY_S`` up to ``NACK_RETRIES`` times, given up after
  ``NACK_GIVE_UP_S``).
- ``parse_vp8_descriptor``: the RFC 7741 payload descriptor (start of partition 0,
  picture id) and the keyframe bit of the VP8 payload header (RFC 6386 §9.1).
- ``Vp8Frames``: complete frames from packets (all sequence numbers from the
  start-of-frame packet to the marker packet), rendered in picture-id order like a
  decoder would: a delta frame after a frame that never completed waits for the
  next keyframe (and asks for one: PLI).
- ``FreezeDetector``: the W3C webrtc-stats freeze rule on rendered frames.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

NACK_RETRY_S: Final = 0.05
NACK_RETRIES: Final = 10
NACK_GIVE_UP_S: Final = 1.0
MAX_TRACKED_GAP: Final = 1000  # a bigger jump (a new sender, a restart) is counted, not NACKed
FREEZE_WINDOW: Final = 30
FREEZE_MIN_INCREASE_S: Final = 0.150


class Arrival(StrEnum):
    """How a packet relates to what came before it."""

    NEW = "new"              # beyond the highest sequence number so far
    LATE = "late"            # filled a gap before it was NACKed (reordering)
    RECOVERED = "recovered"  # filled a gap after a NACK: a retransmission
    DUPLICATE = "duplicate"  # already had it


class ReceiveCounter:
    """Per-SSRC receive accounting for one track (RFC 3550 §6.4.1 and A.8)."""

    def __init__(self, clock_rate: int) -> None:
        self.clock_rate = clock_rate
        self.first: int | None = None   # extended sequence numbers
        self.highest = 0
        self.packets = 0                # first transmissions (NEW + LATE)
        self.recovered = 0
        self.duplicates = 0
        self.bytes = 0                  # RTP payload bytes of every non-duplicate packet
        self._jitter = 0.0              # in RTP timestamp units, x16 not kept: float
        self._transit: float | None = None
        # extended seq -> [missing since, NACKs sent, last NACK at]
        self._missing: dict[int, list[float]] = {}
        self._nacked: set[int] = set()

    @property
    def expected(self) -> int:
        return 0 if self.first is None else self.highest - self.first + 1

    @property
    def jitter_ms(self) -> float:
        return self._jitter / self.clock_rate * 1000.0

    @property
    def missing(self) -> int:
        """Gaps still open (not yet recovered nor given up)."""
        return len(self._missing)

    def extend(self, seq: int) -> int:
        """The extended sequence number of a 16-bit ``seq``, nearest the highest so far."""
        if self.first is None:
            return seq
        delta = (seq - self.highest) & 0xFFFF
        return self.highest + delta if delta < 0x8000 else self.highest - (0x10000 - delta)

    def add(self, seq: int, timestamp: int, size: int, now: float) -> tuple[Arrival, int]:
        """Account one packet; returns how it arrived and its extended sequence number."""
        ext = self.extend(seq)
        if self.first is None:
            self.first = self.highest = ext
            arrival = Arrival.NEW
        elif ext > self.highest:
            if ext - self.highest - 1 <= MAX_TRACKED_GAP:
                for lost in range(self.highest + 1, ext):
                    self._missing[lost] = [now, 0.0, 0.0]
            self.highest = ext
            arrival = Arrival.NEW
        elif ext < self.first:
            # Older than the first packet seen: it widens the range (expected grows too).
            if self.first - ext - 1 <= MAX_TRACKED_GAP:
                for lost in range(ext + 1, self.first):
                    self._missing[lost] = [now, 0.0, 0.0]
            self.first = ext
            arrival = Arrival.LATE
        elif ext in self._missing:
            del self._missing[ext]
            arrival = Arrival.RECOVERED if ext in self._nacked else Arrival.LATE
            self._nacked.discard(ext)
        else:
            self.duplicates += 1
            return Arrival.DUPLICATE, ext
        if arrival is Arrival.RECOVERED:
            self.recovered += 1
        else:
            self.packets += 1
        self.bytes += size
        if arrival is Arrival.NEW:
            # RFC 3550 A.8, on packets in sending order only (a retransmission's
            # transit says nothing about the path's jitter).
            transit = now * self.clock_rate - timestamp
            if self._transit is not None:
                d = abs(transit - self._transit)
                self._jitter += (d - self._jitter) / 16.0
            self._transit = transit
        return arrival, ext

    def nacks_due(self, now: float) -> list[int]:
        """16-bit sequence numbers to NACK now (empty most of the time)."""
        if not self._missing:
            return []
        due: list[int] = []
        for ext, entry in list(self._missing.items()):
            since, sent, last = entry
            if now - since > NACK_GIVE_UP_S or sent >= NACK_RETRIES:
                if now - since > NACK_GIVE_UP_S:
                    del self._missing[ext]
                    self._nacked.discard(ext)
                continue
            if sent == 0 or now - last >= NACK_RETRY_S - 1e-9:
                entry[1] = sent + 1
                entry[2] = now
                self._nacked.add(ext)
                due.append(ext & 0xFFFF)
        return due


@dataclass(frozen=True)
class Vp8Descriptor:
    """What a VP8 RTP payload says about its frame (RFC 7741 §4.2)."""

    frame_start: bool            # S=1 and partition index 0: the frame's first packet
    keyframe: bool               # only meaningful when frame_start
    picture_id: int | None       # 7 or 15 bits, None when absent
    picture_id_bits: int


def parse_vp8_descriptor(payload: bytes) -> Vp8Descriptor | None:
    """Parse the payload descriptor; None when it is truncated (a hostile or broken packet)."""
    n = len(payload)
    if n < 1:
        return None
    b0 = payload[0]
    start = bool(b0 & 0x10) and (b0 & 0x07) == 0
    i = 1
    picture_id: int | None = None
    bits = 0
    if b0 & 0x80:  # X: extension byte
        if n < 2:
            return None
        x = payload[1]
        i = 2
        if x & 0x80:  # I: picture id
            if n < i + 1:
                return None
            if payload[i] & 0x80:  # M: 15-bit
                if n < i + 2:
                    return None
                picture_id = ((payload[i] & 0x7F) << 8) | payload[i + 1]
                bits = 15
                i += 2
            else:
                picture_id = payload[i] & 0x7F
                bits = 7
                i += 1
        if x & 0x40:  # L: TL0PICIDX
            i += 1
        if x & 0x30:  # T or K: TID/Y/KEYIDX
            i += 1
    if start:
        if n <= i:
            return None
        keyframe = not payload[i] & 0x01
    else:
        keyframe = False
    return Vp8Descriptor(start, keyframe, picture_id, bits)


class FreezeDetector:
    """W3C webrtc-stats ``freezeCount``: a gap between two rendered frames of at least
    max(3 x mean, mean + 150 ms), the mean over the last 30 frame durations."""

    def __init__(self) -> None:
        self._durations: deque[float] = deque(maxlen=FREEZE_WINDOW)
        self._sum = 0.0
        self._last: float | None = None
        self.frames = 0
        self.freezes = 0
        self.freeze_duration_s = 0.0

    def frame(self, now: float) -> bool:
        """A frame was rendered at ``now``; True if the gap before it was a freeze."""
        self.frames += 1
        frozen = False
        if self._last is not None:
            gap = now - self._last
            if self._durations:
                mean = self._sum / len(self._durations)
                if gap >= max(3 * mean, mean + FREEZE_MIN_INCREASE_S):
                    frozen = True
                    self.freezes += 1
                    self.freeze_duration_s += gap
            if len(self._durations) == FREEZE_WINDOW:
                self._sum -= self._durations[0]
            self._durations.append(gap)
            self._sum += gap
        self._last = now
        return frozen


class Vp8Frames:
    """Complete and render VP8 frames from packets (no decoding). ``add`` returns True
    when the caller should send a PLI (rendering is stuck until a keyframe)."""

    #: A frame still incomplete this long after a newer one completed is given up.
    GIVE_UP_S: Final = 0.5
    PLI_INTERVAL_S: Final = 0.5
    MAX_PENDING: Final = 64

    def __init__(self) -> None:
        self.freeze = FreezeDetector()
        self.first_frame_at: float | None = None
        self.keyframes = 0
        self.plis = 0
        # timestamp -> [first ext seq or -1, marker ext seq or -1, packets, keyframe, picture id or -1]
        self._pending: dict[int, list[int]] = {}
        self._complete: dict[int, tuple[bool, float]] = {}  # picture id -> (keyframe, completed at)
        self._next_pid: int | None = None  # the picture id the decoder needs next
        self._pid_mask = 0x7FFF
        self._waiting_since: float | None = None
        self._last_pli = -1e9

    @property
    def frames(self) -> int:
        return self.freeze.frames

    def add(self, ext_seq: int, timestamp: int, marker: bool, payload: bytes, now: float) -> bool:
        desc = parse_vp8_descriptor(payload)
        if desc is None:
            return False
        entry = self._pending.get(timestamp)
        if entry is None:
            if len(self._pending) >= self.MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            entry = self._pending[timestamp] = [-1, -1, 0, 0, -1]
        entry[2] += 1
        if desc.frame_start:
            entry[0] = ext_seq
            entry[3] = int(desc.keyframe)
        if marker:
            entry[1] = ext_seq
        if desc.picture_id is not None:
            entry[4] = desc.picture_id
            self._pid_mask = (1 << desc.picture_id_bits) - 1
        if entry[0] >= 0 and entry[1] >= entry[0] and entry[2] >= entry[1] - entry[0] + 1:
            del self._pending[timestamp]
            self._completed(bool(entry[3]), entry[4], now)
        return self._pli_due(now)

    def _completed(self, keyframe: bool, picture_id: int, now: float) -> None:
        if picture_id < 0:  # no picture id: render what completes, from the first keyframe on
            if keyframe or self._next_pid is not None:
                self._next_pid = 0
                self._render(keyframe, now)
            return
        mask = self._pid_mask
        if self._next_pid is None:
            if not keyframe:
                return  # undecodable until a keyframe
            self._next_pid = picture_id
        else:
            ahead = (picture_id - self._next_pid) & mask
            if ahead > mask // 2:
                return  # older than what the decoder needs: a late copy
            if keyframe and ahead:
                # A keyframe resets the decoder: the frames before it no longer matter.
                self._complete = {p: v for p, v in self._complete.items()
                                  if (p - picture_id) & mask <= mask // 2}
                self._next_pid = picture_id
        self._complete[picture_id] = (keyframe, now)
        while self._next_pid is not None and self._next_pid in self._complete:
            key, _ = self._complete.pop(self._next_pid)
            self._render(key, now)
            self._next_pid = (self._next_pid + 1) & self._pid_mask
        if len(self._complete) > self.MAX_PENDING:
            self._complete.clear()
            self._next_pid = None

    def _render(self, keyframe: bool, now: float) -> None:
        if self.first_frame_at is None:
            self.first_frame_at = now
        self.keyframes += keyframe
        self.freeze.frame(now)
        self._waiting_since = None

    def _pli_due(self, now: float) -> bool:
        stuck = self._next_pid is None or bool(self._complete)
        if not stuck:
            self._waiting_since = None
            return False
        if self._waiting_since is None:
            self._waiting_since = now
        if self._next_pid is not None and now - self._waiting_since >= self.GIVE_UP_S:
            # The frame the decoder needs never completed: wait for a keyframe instead.
            self._next_pid = None
            self._complete.clear()
        if self._next_pid is None and now - self._last_pli >= self.PLI_INTERVAL_S \
                and now - self._waiting_since >= self.GIVE_UP_S:
            self._last_pli = now
            self.plis += 1
            return True
        return False
