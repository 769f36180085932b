"""Roll-ups of a session's quality timeline and of its browsers' freeze counters: what the
summary, the diagnosis and the charts read instead of every raw sample.

A call-hour of four participants holds ~58,000 server quality samples and ~23,000 browser
getStats() samples. Reading and judging each of them for every inspector request took a
second; the findings need far less:

- **buckets**: per track (a publisher's stream upstream, a subscription downstream), per kind
  and per window of :data:`SPANS_MS` (10 s and 60 s), the count, the sums / minima / maxima of
  bitrate, loss, jitter, RTT and frame rate, the packets, the first sample with media and the
  worst connection-quality score: what the charts draw. Every field merges exactly (sums, min,
  max, first and last by seq), so buckets written in several batches equal one.
- **track totals**: the same counts over the call, the audio MOS summed in hundredths (exact
  integer sums), a histogram of video levels, the last upstream loss and jitter; and the worst
  connection-quality score per participant and second (quality over time).
- **tallies**: per track and type of bad sample (a video bitrate under the floor after the
  ramp-up; loss, jitter or RTT over its threshold, a subscriber's loss and jitter net of what
  the publisher's uplink already lost just before), how many, the first and the last, and
  their figures binned as the finding prints them: a bounded histogram, so the finding's lower
  median is exact however many there are.
- **marks**: the samples a finding names one by one (the first few bad ones of each track and
  type, the first samples of each subscription), in compact columns, each with its index in
  its track and, downstream, the upstream figures of the same stream just before it.
- **freeze tracks**: per received video track, the W3C freeze counters folded as
  :func:`metrics.scores.freezes_from_client_stats` folds them, with the first samples as
  evidence.

:class:`Roller` folds samples into these in time order; the event log's writer thread runs one
over every batch it commits (never the media path), and :func:`from_entries` runs one over a
list of entries, so a finding computed from the stored roll-ups equals the one computed from
the raw samples. Pure: no clock, no I/O; the writer passes loaders for state it evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from metrics import scores
from metrics.events import EventKind

#: Width of the finest bucket: the finest resolution of the charts.
BUCKET_MS: Final = 10_000
#: The widths buckets are kept at: the charts read the finest whose points fit.
SPANS_MS: Final = (BUCKET_MS, 60_000)
#: Resolution of a participant's connection quality over time: per second with samples.
QUALITY_MS: Final = 1_000

# Thresholds of the diagnosis (docs/inspector.md): the tallies count the samples over one.
LOW_VIDEO_KBPS: Final = 150.0
LOSS_PCT: Final = 5.0
JITTER_MS: Final = 30.0
RTT_MS: Final = 300.0
#: The first samples of a track, taken while it ramps up, are not judged for bitrate.
RAMP_UP_SAMPLES: Final = 2
#: The first samples of each downstream track are kept as evidence of one-way media.
FIRST_SAMPLES_KEPT: Final = 5
#: Browser samples kept as evidence of a frozen track.
FREEZE_EVIDENCE: Final = 10
#: Bad samples of each type kept one by one per track (a finding names its first 10).
BAD_EVIDENCE: Final = 10
#: Most tracks whose running state the writer keeps in memory (the rest is reloaded).
STATE_CACHE_MAX: Final = 20_000


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _height(width: object, height: object) -> int | None:
    if isinstance(width, int) and isinstance(height, int):
        return min(width, height)
    return None


def quality_level(score: float) -> str:
    """The level :func:`metrics.scores.connection_quality` gives a score."""
    if score <= 0.0:
        return str(scores.QualityLevel.LOST)
    if score >= scores.EXCELLENT_FROM:
        return str(scores.QualityLevel.EXCELLENT)
    if score >= scores.GOOD_FROM:
        return str(scores.QualityLevel.GOOD)
    return str(scores.QualityLevel.POOR)


TrackKey = tuple[str, str, str]  # (track, direction, kind): track is the stream id upstream, the peer id down


@dataclass(slots=True)
class Bucket:
    """One track's samples in one :data:`BUCKET_MS` window."""

    track: str
    direction: str
    kind: str
    span_ms: int  # the window's width: one of SPANS_MS
    bucket_ms: int
    connection_id: str = ""
    peer_id: str = ""
    stream_id: str = ""
    n: int = 0
    n_media: int = 0  # samples with packets
    first_ms: int = 0
    first_seq: int = 0
    last_ms: int = 0
    last_seq: int = 0
    first_media_ms: int | None = None
    packets: float = 0.0
    packets_lost: float = 0.0
    bitrate_sum: float = 0.0
    bitrate_min: float | None = None
    bitrate_max: float | None = None
    loss_sum: float = 0.0
    loss_max: float | None = None
    jitter_sum: float = 0.0
    jitter_n: int = 0
    jitter_max: float | None = None
    rtt_sum: float = 0.0
    rtt_n: int = 0
    rtt_max: float | None = None
    fps_sum: float = 0.0
    fps_n: int = 0
    width: int | None = None
    height: int | None = None
    q_min: float | None = None  # worst connection-quality score


def _lo(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _hi(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass(slots=True)
class Mark:
    """One sample a finding may name by itself."""

    seq: int
    time_ms: int
    connection_id: str
    track: str
    peer_id: str
    stream_id: str
    direction: str
    kind: str
    idx: int  # its index in its track (0 = first)
    packets: float
    bitrate_kbps: float
    loss_pct: float
    jitter_ms: float
    rtt_ms: float
    up_loss: float  # downstream: the upstream figures of the stream just before (0 when none)
    up_jitter: float


@dataclass(slots=True)
class FreezeTrack:
    """One received video track's freeze counters folded over its browser samples."""

    connection_id: str
    stream_id: str
    first_ms: int
    first_seq: int
    last_ms: int = 0
    count: int = 0
    frozen_s: float = 0.0
    last_count: int = 0
    last_s: float = 0.0
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def add(self, seq: int, t: int, payload: Mapping[str, Any]) -> None:
        """Fold one sample exactly as :func:`metrics.scores.freezes_from_client_stats` does."""
        self.last_ms = t
        c, s = payload.get("freezeCount"), payload.get("totalFreezesDuration")
        if len(self.evidence) < FREEZE_EVIDENCE:
            self.evidence.append({"seq": seq, "time_ms": t, "freezeCount": c, "totalFreezesDuration": s})
        if not isinstance(c, int) or isinstance(c, bool):
            return
        value = float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else self.last_s
        if c < self.last_count:
            self.last_count, self.last_s = 0, 0.0
        self.count += c - self.last_count
        self.frozen_s += max(0.0, value - self.last_s)
        self.last_count, self.last_s = c, value


#: What makes a sample bad, per finding (metrics.diagnosis): how its figure is binned is how
#: the finding prints it, so the lower median of the bins is the one of the samples as printed.
LOW_BITRATE: Final = "low_bitrate"
HIGH_LOSS: Final = "loss"
HIGH_JITTER: Final = "jitter"
HIGH_RTT: Final = "rtt"
BAD_FIGURE: Final = {LOW_BITRATE: ("bitrate_kbps", 0), HIGH_LOSS: ("loss_pct", 1), HIGH_JITTER: ("jitter_ms", 0),
                     HIGH_RTT: ("rtt_ms", 0)}


def bad_types(m: Mark) -> list[str]:
    """The findings ``m`` counts for: a video bitrate under the floor after the ramp-up (down the
    subscriber leg only with packets); loss or jitter its own leg added (a subscriber's minus
    the upstream's just before) or an RTT over the threshold, with packets."""
    found = []
    if (m.kind == "video" and m.idx >= RAMP_UP_SAMPLES and m.bitrate_kbps < LOW_VIDEO_KBPS
            and (m.direction == "in" or m.packets > 0)):
        found.append(LOW_BITRATE)
    if m.packets > 0:
        if m.loss_pct - m.up_loss > LOSS_PCT:
            found.append(HIGH_LOSS)
        if m.jitter_ms - m.up_jitter > JITTER_MS:
            found.append(HIGH_JITTER)
        if m.rtt_ms > RTT_MS:
            found.append(HIGH_RTT)
    return found


@dataclass(slots=True)
class Tally:
    """One track's bad samples of one type: how many, the first and the last, and their
    figures binned as the finding prints them (a bounded histogram, not every sample)."""

    count: int = 0
    first_ms: int = 0
    first_seq: int = 0
    last_ms: int = 0
    last_seq: int = 0
    bins: dict[float, int] = field(default_factory=dict)

    def add(self, m: Mark, bad_type: str) -> None:
        name, digits = BAD_FIGURE[bad_type]
        if not self.count:
            self.first_ms, self.first_seq = m.time_ms, m.seq
        self.count += 1
        self.last_ms, self.last_seq = m.time_ms, m.seq
        value = float(round(getattr(m, name), digits))
        self.bins[value] = self.bins.get(value, 0) + 1


def median_low(tallies: Iterable[Tally]) -> float:
    """The lower median of the binned figures of ``tallies`` (at least one sample)."""
    bins: dict[float, int] = {}
    for t in tallies:
        for value, count in t.bins.items():
            bins[value] = bins.get(value, 0) + count
    index = (sum(bins.values()) - 1) // 2
    for value in sorted(bins):
        if index < bins[value]:
            return value
        index -= bins[value]
    raise ValueError("no samples")


class Roller:
    """Folds one log's quality samples and client stats into buckets, marks and freeze tracks.

    Feed entries with :meth:`add` in the order they were written (time order), then
    :meth:`drain` what changed. State that carries from one entry to the next (a track's sample
    count, a stream's last upstream figures, a freeze track) is cached, at most
    :data:`STATE_CACHE_MAX` of each; on a miss the loaders (the stored roll-ups) answer.
    """

    def __init__(self, *, count: Callable[[str, TrackKey], int] | None = None,
                 upstream: Callable[[str, str, str], tuple[float, float] | None] | None = None,
                 freeze: Callable[[str, str, str], FreezeTrack | None] | None = None,
                 tally: Callable[[str, str, str, str, str], Tally | None] | None = None) -> None:
        self._load_count = count
        self._load_upstream = upstream
        self._load_freeze = freeze
        self._load_tally = tally
        self._tallies: OrderedDict[tuple[str, str, str, str, str], Tally | None] = OrderedDict()
        self._counts: OrderedDict[tuple[str, TrackKey], int] = OrderedDict()
        self._upstream: OrderedDict[tuple[str, str, str], tuple[float, float] | None] = OrderedDict()
        self._freezes: OrderedDict[tuple[str, str, str], FreezeTrack | None] = OrderedDict()
        self.buckets: dict[tuple[str, int, str, str, str, int], Bucket] = {}
        self.tracks: dict[tuple[str, str, str, str], Track] = {}
        self.quality: dict[tuple[str, str, int], float] = {}
        self.marks: list[tuple[str, Mark]] = []
        self.freezes: dict[tuple[str, str, str], FreezeTrack] = {}
        self.tallies: dict[tuple[str, str, str, str, str], Tally] = {}

    def forget(self) -> None:
        """Drop every cached state and what was not drained (a batch that was not committed)."""
        self._counts.clear()
        self._upstream.clear()
        self._freezes.clear()
        self._tallies.clear()
        self.drain()

    def drain(self) -> Drained:
        """What was folded since the last drain, keyed by session: partial buckets, track totals
        and quality (to be merged with the stored ones), new marks and changed freeze tracks
        (whole)."""
        drained = Drained([(key[0], b) for key, b in self.buckets.items()],
                          [(key[0], t) for key, t in self.tracks.items()],
                          [(sid, cid, bucket, q) for (sid, cid, bucket), q in self.quality.items()],
                          self.marks, [(key[0], f) for key, f in self.freezes.items()],
                          [(key[0], key[1:], t) for key, t in self.tallies.items()])
        self.buckets, self.tracks, self.quality, self.marks, self.freezes, self.tallies = {}, {}, {}, [], {}, {}
        return drained

    @staticmethod
    def _cached(cache: OrderedDict[Any, Any], key: Any, load: Callable[[], Any]) -> Any:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = load()
        cache[key] = value
        if len(cache) > STATE_CACHE_MAX:
            cache.popitem(last=False)
        return value

    def add(self, session_id: str, seq: int, time_ms: int, connection_id: str, kind: str,
            payload: Mapping[str, Any]) -> None:
        """Fold one entry; entries of other kinds are ignored."""
        if kind == EventKind.QUALITY_SAMPLE:
            self._sample(session_id, seq, time_ms, connection_id, payload)
        elif (kind == EventKind.CLIENT_STATS and payload.get("direction") == "recv"
              and payload.get("kind") == "video"):
            stream_id = str(payload.get("stream_id"))
            key = (session_id, connection_id, stream_id)
            loader = self._load_freeze
            track: FreezeTrack | None = self._cached(
                self._freezes, key, lambda: loader(session_id, connection_id, stream_id) if loader else None)
            if track is None:
                track = FreezeTrack(connection_id, stream_id, time_ms, seq)
                self._freezes[key] = track
            track.add(seq, time_ms, payload)
            self.freezes[key] = track

    def _sample(self, session_id: str, seq: int, t: int, connection_id: str, s: Mapping[str, Any]) -> None:
        direction, kind = str(s.get("direction")), str(s.get("kind"))
        stream_id, peer_id = str(s.get("stream_id")), str(s.get("peer_id"))
        track = stream_id if direction == "in" else peer_id
        tkey: TrackKey = (track, direction, kind)
        count_loader = self._load_count
        idx: int = self._cached(self._counts, (session_id, tkey),
                                lambda: count_loader(session_id, tkey) if count_loader else 0)
        self._counts[(session_id, tkey)] = idx + 1
        packets = _num(s.get("packets")) or 0.0
        bitrate, loss = _num(s.get("bitrate_kbps")), _num(s.get("loss_pct")) or 0.0
        jitter, rtt, fps = _num(s.get("jitter_ms")), _num(s.get("rtt_ms")), _num(s.get("frame_rate"))
        ukey = (session_id, stream_id, kind)
        if direction == "in":
            up: tuple[float, float] | None = (loss, jitter or 0.0)
            self._upstream[ukey] = up
            self._upstream.move_to_end(ukey)
            if len(self._upstream) > STATE_CACHE_MAX:
                self._upstream.popitem(last=False)
        else:
            up_loader = self._load_upstream
            up = self._cached(self._upstream, ukey,
                              lambda: up_loader(session_id, stream_id, kind) if up_loader else None)
        level = (int(scores.video_level(s.get("width"), s.get("height"), fps, bitrate))
                 if kind == "video" else None)
        mos = (round(scores.audio_mos(loss, rtt, jitter, bitrate) * 100)
               if kind == "audio" and packets > 0 else None)
        expected = (scores.expected_video_kbps(_height(s.get("width"), s.get("height"))) * 0.5
                    if kind == "video" else None)
        score, _ = scores.connection_quality(loss, rtt, jitter, bitrate, expected,
                                             s.get("packets") if isinstance(s.get("packets"), int) else None)
        for span in SPANS_MS:
            bucket_ms = t - t % span
            b = self.buckets.get((session_id, span, *tkey, bucket_ms))
            if b is None:
                b = Bucket(track, direction, kind, span, bucket_ms, connection_id, peer_id, stream_id, first_ms=t,
                           first_seq=seq)
                self.buckets[(session_id, span, *tkey, bucket_ms)] = b
            b.n += 1
            b.last_ms, b.last_seq = t, seq
            if packets > 0:
                b.n_media += 1
                if b.first_media_ms is None:
                    b.first_media_ms = t
            b.packets += packets
            b.packets_lost += _num(s.get("packets_lost")) or 0.0
            b.bitrate_sum += bitrate or 0.0
            b.bitrate_min, b.bitrate_max = _lo(b.bitrate_min, bitrate or 0.0), _hi(b.bitrate_max, bitrate or 0.0)
            b.loss_sum += loss
            b.loss_max = _hi(b.loss_max, loss)
            if jitter is not None:
                b.jitter_sum += jitter
                b.jitter_n += 1
                b.jitter_max = _hi(b.jitter_max, jitter)
            if rtt is not None:
                b.rtt_sum += rtt
                b.rtt_n += 1
                b.rtt_max = _hi(b.rtt_max, rtt)
            if fps is not None:
                b.fps_sum += fps
                b.fps_n += 1
            width, height = _int(s.get("width")), _int(s.get("height"))
            if width is not None:
                b.width = width
            if height is not None:
                b.height = height
            b.q_min = _lo(b.q_min, score)
        # The track's totals: the scores, computed per sample as the summary always did.
        tr = self.tracks.get((session_id, *tkey))
        if tr is None:
            tr = Track(track, direction, kind, connection_id, stream_id, 0, 0, t, seq, None, 0, 0, [0, 0, 0, 0, 0], t)
            self.tracks[(session_id, *tkey)] = tr
        tr.n += 1
        tr.last_ms, tr.last_loss, tr.last_jitter = t, loss, jitter or 0.0
        if packets > 0:
            tr.n_media += 1
            if tr.first_media_ms is None:
                tr.first_media_ms = t
        if mos is not None:
            tr.mos_c += mos
            tr.mos_n += 1
        if level is not None:
            tr.levels[level] += 1
        # The participant's connection quality: the worst score of what it sent and received.
        qkey = (session_id, connection_id, t - t % QUALITY_MS)
        self.quality[qkey] = min(score, self.quality.get(qkey, score))
        # Bad samples are counted per type; the first few of each are kept as marks (evidence).
        up_loss, up_jitter = up if (up is not None and direction == "out") else (0.0, 0.0)
        mark = Mark(seq, t, connection_id, track, peer_id, stream_id, direction, kind, idx, packets, bitrate or 0.0,
                    loss, jitter or 0.0, rtt or 0.0, up_loss, up_jitter)
        keep = direction == "out" and idx < FIRST_SAMPLES_KEPT
        if direction in ("in", "out"):
            for bad_type in bad_types(mark):
                key = (session_id, *tkey, bad_type)
                loader = self._load_tally
                tally: Tally | None = self._cached(
                    self._tallies, key, lambda: loader(session_id, *tkey, bad_type) if loader else None)
                if tally is None:
                    tally = Tally()
                    self._tallies[key] = tally
                keep = keep or tally.count < BAD_EVIDENCE
                tally.add(mark, bad_type)
                self.tallies[key] = tally
        if keep:
            self.marks.append((session_id, mark))


# --- what the summary and the diagnosis read --------------------------------------------------

@dataclass(slots=True)
class Track:
    """One track's totals over the whole session (or, in the writer, over one batch)."""

    track: str
    direction: str
    kind: str
    connection_id: str
    stream_id: str
    n: int
    n_media: int
    first_ms: int
    first_seq: int
    first_media_ms: int | None
    mos_c: int  # audio MOS of the samples with packets, in hundredths (exact sums)
    mos_n: int
    levels: list[int]  # video samples per VideoLevel
    last_ms: int
    last_loss: float = 0.0  # the last sample's figures (upstream of the subscribers)
    last_jitter: float = 0.0


@dataclass(slots=True)
class Drained:
    """What a :class:`Roller` folded since its last drain, each with its session id."""

    buckets: list[tuple[str, Bucket]]
    tracks: list[tuple[str, Track]]
    quality: list[tuple[str, str, int, float]]  # (session, connection, bucket_ms, worst score)
    marks: list[tuple[str, Mark]]
    freezes: list[tuple[str, FreezeTrack]]
    tallies: list[tuple[str, tuple[str, str, str, str], Tally]]  # (session, (track, direction, kind, type), tally)


@dataclass
class SessionRollup:
    """A session's roll-ups, read back from the event log or folded from its entries."""

    tracks: dict[TrackKey, Track]
    #: (connection id, bucket_ms, worst score of what it sent and received), by bucket.
    quality: list[tuple[str, int, float]]
    marks: list[Mark]  # oldest first
    freezes: list[FreezeTrack]  # by their first sample
    #: Bad samples per (track, direction, kind, type).
    tallies: dict[tuple[str, str, str, str], Tally] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._marks_by_track: dict[TrackKey, list[Mark]] = {}
        for m in self.marks:
            self._marks_by_track.setdefault((m.track, m.direction, m.kind), []).append(m)

    def track_marks(self, track: str, direction: str, kind: str) -> list[Mark]:
        return self._marks_by_track.get((track, direction, kind), [])


def from_entries(entries: Iterable[Mapping[str, Any]]) -> SessionRollup:
    """Fold a session's entries (oldest first) the way the event log's writer does."""
    roller = Roller()
    for e in entries:
        payload = e.get("payload")
        if not isinstance(payload, Mapping):
            continue
        t = e.get("time_ms")
        roller.add("", int(e.get("seq") or 0), t if isinstance(t, int) else 0, _str(e.get("connection_id")),
                   str(e.get("kind")), payload)
    drained = roller.drain()
    return SessionRollup({(t.track, t.direction, t.kind): t for _, t in drained.tracks},
                         sorted(((cid, bucket, q) for _, cid, bucket, q in drained.quality), key=lambda x: x[1]),
                         [m for _, m in drained.marks], [f for _, f in drained.freezes],
                         {key: t for _, key, t in drained.tallies})


def mean_mos(tracks: Iterable[Track]) -> float | None:
    c = n = 0
    for t in tracks:
        c, n = c + t.mos_c, n + t.mos_n
    return round(c / 100 / n, 2) if n else None


def median_level(tracks: Iterable[Track]) -> int | None:
    """The low median of the video levels of ``tracks``' samples."""
    counts = [0, 0, 0, 0, 0]
    for t in tracks:
        counts = [x + y for x, y in zip(counts, t.levels, strict=True)]
    total = sum(counts)
    if not total:
        return None
    index = (total - 1) // 2
    for level, count in enumerate(counts):
        if index < count:
            return level
        index -= count
    return None  # not reached
