"""Quality scores: pure functions over figures the server and the browser measured.

Nothing here reads a clock or a log; callers pass the figures in (docs/inspector.md gives
every formula and where it comes from):

- :func:`audio_mos`: a MOS from the ITU-T G.107 E-model, with the equipment impairment and
  packet-loss robustness of Opus as WebRTC sends it;
- :func:`video_level`: a quality level 0-4 from resolution, frame rate and bitrate;
- :func:`freezes`: freezes by the W3C rule (webrtc-stats ``freezeCount``) over frame arrival
  times, and :func:`freezes_from_client_stats` from the browser's own counters;
- :func:`time_to_first_media`: from a subscribe attempt to the first media forwarded;
- :func:`connection_quality`: one participant's connection at one moment, the way LiveKit
  scores it (loss, delay and jitter, bitrate against what is expected).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Final

# --- Audio: E-model (ITU-T G.107) -----------------------------------------------------------

#: Basic signal-to-noise ratio R0 - Is of G.107 with every default parameter (Table 1).
R_DEFAULT: Final = 93.2
#: Opus packet-loss robustness with in-band FEC, as WebRTC negotiates it (useinbandfec=1).
OPUS_BPL: Final = 20.0
#: Opus frame (20 ms) plus encoder look-ahead (6.5 ms): the codec's share of mouth-to-ear delay.
OPUS_CODEC_DELAY_MS: Final = 26.5
#: Equipment impairment of Opus when the bitrate is not known (~40 kbps speech).
OPUS_IE_DEFAULT: Final = 6.0


#: Below this, Opus is not coding speech but silence (DTX, comfort noise): the measured bitrate
#: says nothing about the codec's quality, so the default Ie is used.
OPUS_SPEECH_MIN_KBPS: Final = 6.0


def opus_ie(bitrate_kbps: float | None) -> float:
    """Equipment impairment Ie of Opus at ``bitrate_kbps``: ``55 - 4.6 ln(bps)``, kept in
    0-30 (0 above ~160 kbps); under 6 kbps (silence) :data:`OPUS_IE_DEFAULT`."""
    if bitrate_kbps is None or bitrate_kbps < OPUS_SPEECH_MIN_KBPS:
        return OPUS_IE_DEFAULT
    return min(30.0, max(0.0, 55.0 - 4.6 * math.log(bitrate_kbps * 1000)))


def delay_impairment(one_way_ms: float) -> float:
    """Id of G.107 in the simplified form of Cole and Rosenbluth (2001)."""
    d = max(0.0, one_way_ms)
    return 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)


def r_to_mos(r: float) -> float:
    """G.107 Annex B: the R factor as a MOS (1.0-4.5)."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return 1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r)


def audio_mos(loss_pct: float, rtt_ms: float | None, jitter_ms: float | None,
              bitrate_kbps: float | None = None) -> float:
    """The MOS (1.0-4.5, two decimals) of an Opus audio stream with ``loss_pct`` % packets
    lost, ``rtt_ms`` round trip and ``jitter_ms`` interarrival jitter.

    ``R = 93.2 - Id - Ie_eff`` with the one-way delay ``RTT/2 + 2 x jitter + 26.5 ms`` (half
    the round trip, a jitter buffer of twice the jitter, Opus framing and look-ahead) and
    ``Ie_eff = Ie + (95 - Ie) * Ppl / (Ppl + Bpl)`` (random loss, BurstR = 1)."""
    ppl = min(100.0, max(0.0, loss_pct))
    if ppl >= 100.0:
        return 1.0  # nothing arrived: no speech at all
    one_way = (rtt_ms or 0.0) / 2 + 2 * (jitter_ms or 0.0) + OPUS_CODEC_DELAY_MS
    ie = opus_ie(bitrate_kbps)
    ie_eff = ie + (95.0 - ie) * ppl / (ppl + OPUS_BPL)
    return round(r_to_mos(R_DEFAULT - delay_impairment(one_way) - ie_eff), 2)


# --- Video: quality level -------------------------------------------------------------------

class VideoLevel(IntEnum):
    """What a viewer sees, from unusable to high definition."""

    NONE = 0  # no frames
    VERY_LOW = 1  # under 240p, under 10 fps, or far under the bitrate the size needs
    LOW = 2  # 240p-359p
    MEDIUM = 3  # 360p-719p
    HIGH = 4  # 720p and up, 24 fps and up, enough bitrate


#: Bitrate (kbps) a VP8 stream of about this many lines needs for a sharp 30 fps picture
#: (the WebRTC encoder's own default start bitrates per resolution).
EXPECTED_VIDEO_KBPS: Final = ((1080, 2500.0), (720, 1500.0), (540, 1000.0), (360, 600.0), (240, 300.0),
                              (180, 200.0), (0, 150.0))


def expected_video_kbps(height: int | None) -> float:
    lines = height or 0
    for at_least, kbps in EXPECTED_VIDEO_KBPS:
        if lines >= at_least:
            return kbps
    return EXPECTED_VIDEO_KBPS[-1][1]


def video_level(width: int | None, height: int | None, frame_rate: float | None,
                bitrate_kbps: float | None) -> VideoLevel:
    """The level of a video stream: the worst of what its size, frame rate and bitrate allow."""
    if not frame_rate or not height or not width:
        return VideoLevel.NONE
    lines = min(width, height)  # a portrait phone's 720x1280 is 720p
    by_size = (VideoLevel.HIGH if lines >= 720 else VideoLevel.MEDIUM if lines >= 360
               else VideoLevel.LOW if lines >= 240 else VideoLevel.VERY_LOW)
    by_rate = (VideoLevel.HIGH if frame_rate >= 24 else VideoLevel.MEDIUM if frame_rate >= 15
               else VideoLevel.LOW if frame_rate >= 10 else VideoLevel.VERY_LOW)
    level = min(by_size, by_rate)
    if bitrate_kbps is not None:
        ratio = bitrate_kbps / expected_video_kbps(lines)
        by_bitrate = (VideoLevel.HIGH if ratio >= 0.7 else VideoLevel.MEDIUM if ratio >= 0.4
                      else VideoLevel.LOW if ratio >= 0.2 else VideoLevel.VERY_LOW)
        level = min(level, by_bitrate)
    return VideoLevel(level)


# --- Freezes (W3C webrtc-stats freezeCount) --------------------------------------------------

#: How many recent frame durations the mean is taken over (as Chrome's implementation does).
FREEZE_WINDOW: Final = 30
FREEZE_EXTRA_MS: Final = 150.0


@dataclass(frozen=True, slots=True)
class Freeze:
    start_ms: float
    duration_ms: float


def freezes(frame_times_ms: Sequence[float]) -> list[Freeze]:
    """Freezes in a stream of rendered-frame times: a gap of at least
    ``max(3 x mean frame duration, mean + 150 ms)``, the mean taken over the previous
    :data:`FREEZE_WINDOW` frame durations (W3C webrtc-stats, ``freezeCount``)."""
    found: list[Freeze] = []
    durations: list[float] = []
    for previous, current in zip(frame_times_ms, frame_times_ms[1:], strict=False):
        gap = current - previous
        if durations:
            mean = sum(durations) / len(durations)
            if gap >= max(3 * mean, mean + FREEZE_EXTRA_MS):
                found.append(Freeze(previous, gap))
        durations.append(gap)
        if len(durations) > FREEZE_WINDOW:
            durations.pop(0)
    return found


def freezes_from_client_stats(samples: Iterable[Mapping[str, Any]]) -> tuple[int, float]:
    """(freeze count, frozen seconds) of one received track from its browser samples
    (cumulative ``freezeCount`` and ``totalFreezesDuration``; a counter that goes back, as
    after a reconnect, starts a new run)."""
    count = 0
    frozen_s = 0.0
    last_count, last_s = 0, 0.0
    for sample in samples:
        c, s = sample.get("freezeCount"), sample.get("totalFreezesDuration")
        if not isinstance(c, int) or isinstance(c, bool):
            continue
        s = float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else last_s
        if c < last_count:
            last_count, last_s = 0, 0.0
        count += c - last_count
        frozen_s += max(0.0, s - last_s)
        last_count, last_s = c, s
    return count, round(frozen_s, 3)


# --- Time to first media --------------------------------------------------------------------

def time_to_first_media(subscribe_ms: int, first_media_ms: int | None) -> int | None:
    """Milliseconds from the subscribe attempt to the first sample with forwarded packets."""
    if first_media_ms is None or first_media_ms < subscribe_ms:
        return None
    return first_media_ms - subscribe_ms


# --- Connection quality (LiveKit-style) -----------------------------------------------------

class QualityLevel(StrEnum):
    EXCELLENT = "excellent"
    GOOD = "good"
    POOR = "poor"
    LOST = "lost"


#: Score (a MOS-like 1-5 figure) from which a connection is excellent or good; LiveKit's cut-offs.
EXCELLENT_FROM: Final = 4.1
GOOD_FROM: Final = 3.6


def connection_quality(loss_pct: float, rtt_ms: float | None, jitter_ms: float | None,
                       bitrate_kbps: float | None = None, expected_kbps: float | None = None,
                       packets: int | None = None) -> tuple[float, QualityLevel]:
    """(score, level) of one connection at one moment.

    As LiveKit does: the E-model turns loss, delay and jitter into a MOS-like score (1-4.5);
    a stream that sends less than expected loses up to one point in proportion to the
    shortfall; no packets at all while some were expected is ``lost``."""
    if packets == 0 and (expected_kbps or 0) > 0:
        return 0.0, QualityLevel.LOST
    score = audio_mos(loss_pct, rtt_ms, jitter_ms, None)
    if bitrate_kbps is not None and expected_kbps:
        shortfall = max(0.0, 1.0 - bitrate_kbps / expected_kbps)
        score = max(1.0, score - shortfall)
    score = round(score, 2)
    level = (QualityLevel.EXCELLENT if score >= EXCELLENT_FROM else QualityLevel.GOOD if score >= GOOD_FROM
             else QualityLevel.POOR)
    return score, level
