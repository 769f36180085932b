"""Scores: the E-model MOS for Opus, video levels, W3C freezes, time to first media and
LiveKit-style connection quality, each against figures worked out by hand."""

from __future__ import annotations

from typing import Any

import pytest

from metrics import scores
from metrics.scores import QualityLevel, VideoLevel


def test_r_to_mos_follows_g107_annex_b() -> None:
    assert scores.r_to_mos(0) == 1.0
    assert scores.r_to_mos(100) == 4.5
    # 1 + 0.035 * 93.2 + 7e-6 * 93.2 * 33.2 * 6.8
    assert scores.r_to_mos(93.2) == pytest.approx(4.409, abs=1e-3)
    assert scores.r_to_mos(50) == pytest.approx(1 + 1.75 + 7e-6 * 50 * -10 * 50, abs=1e-9)


def test_delay_impairment_bends_at_177_ms() -> None:
    assert scores.delay_impairment(100) == pytest.approx(2.4)
    assert scores.delay_impairment(277.3) == pytest.approx(0.024 * 277.3 + 11.0)


def test_opus_ie_from_bitrate() -> None:
    assert scores.opus_ie(None) == scores.OPUS_IE_DEFAULT
    assert scores.opus_ie(40) == pytest.approx(55 - 4.6 * 10.5966, abs=1e-3)  # ln(40000)
    assert scores.opus_ie(1000) == 0.0
    assert scores.opus_ie(7) == pytest.approx(55 - 4.6 * 8.8537, abs=1e-3)  # ln(7000)
    assert scores.opus_ie(1) == scores.OPUS_IE_DEFAULT  # silence (DTX): not a codec quality
    assert scores.opus_ie(100_000) == 0.0


def test_audio_mos_clean_line_is_excellent_and_loss_degrades_it() -> None:
    clean = scores.audio_mos(0.0, 20.0, 2.0)
    # one way 10 + 4 + 26.5 = 40.5 ms: Id 0.972; Ie 6; R = 86.228
    assert clean == round(scores.r_to_mos(93.2 - 0.972 - 6.0), 2)
    assert clean > 4.2
    lossy = scores.audio_mos(10.0, 20.0, 2.0)
    # Ie_eff = 6 + 89 * 10 / 30
    assert lossy == round(scores.r_to_mos(93.2 - 0.972 - (6 + 89 * 10 / 30)), 2)
    assert lossy < 3.1
    assert scores.audio_mos(0.0, 800.0, 50.0) < clean
    assert scores.audio_mos(100.0, None, None) == 1.0


@pytest.mark.parametrize(("w", "h", "fps", "kbps", "level"), [
    (1280, 720, 30, 1500, VideoLevel.HIGH),
    (720, 1280, 30, 1500, VideoLevel.HIGH),  # portrait phone
    (640, 360, 30, 600, VideoLevel.MEDIUM),
    (320, 240, 30, 300, VideoLevel.LOW),
    (1280, 720, 8, 1500, VideoLevel.VERY_LOW),
    (1280, 720, 30, 100, VideoLevel.VERY_LOW),  # 100 of 1500 kbps
    (1280, 720, 30, 700, VideoLevel.MEDIUM),
    (1280, 720, 30, None, VideoLevel.HIGH),
    (None, None, 30, 1000, VideoLevel.NONE),
    (1280, 720, 0, 1000, VideoLevel.NONE),
])
def test_video_level(w: int | None, h: int | None, fps: float, kbps: float | None, level: VideoLevel) -> None:
    assert scores.video_level(w, h, fps, kbps) is level


def test_freezes_by_the_w3c_rule() -> None:
    # 30 fps (33.3 ms frames): a freeze is a gap of max(100, 183.3) ms or more.
    times = [i * 1000 / 30 for i in range(40)]
    assert scores.freezes(times) == []
    last = times[-1]
    frozen = [*times, last + 183.0, last + 183.0 + 33.3, last + 183.0 + 33.3 + 190.0]
    found = scores.freezes(frozen)
    assert len(found) == 1  # 183 < 183.3 is no freeze
    assert found[0].start_ms == last + 183.0 + 33.3 and found[0].duration_ms == pytest.approx(190.0)
    # 5 fps (200 ms frames): the rule is 3 x mean = 600 ms.
    slow = [i * 200.0 for i in range(10)]
    assert scores.freezes([*slow, slow[-1] + 599]) == []
    assert len(scores.freezes([*slow, slow[-1] + 600])) == 1


def test_freezes_from_client_stats_counts_increments_and_restarts() -> None:
    samples: list[dict[str, Any]] = [{"freezeCount": 0, "totalFreezesDuration": 0.0}, {"freezeCount": 2, "totalFreezesDuration": 1.5},
               {"freezeCount": "x"}, {"freezeCount": 3, "totalFreezesDuration": 2.0},
               {"freezeCount": 1, "totalFreezesDuration": 0.4}]  # a new track after a reconnect
    assert scores.freezes_from_client_stats(samples) == (4, 2.4)
    assert scores.freezes_from_client_stats([]) == (0, 0.0)


def test_time_to_first_media() -> None:
    assert scores.time_to_first_media(1_000, 1_850) == 850
    assert scores.time_to_first_media(1_000, None) is None
    assert scores.time_to_first_media(1_000, 900) is None


def test_connection_quality_levels() -> None:
    assert scores.connection_quality(0.0, 20.0, 2.0)[1] is QualityLevel.EXCELLENT
    assert scores.connection_quality(10.0, 20.0, 2.0)[1] is QualityLevel.POOR
    assert scores.connection_quality(0.0, 20.0, 2.0, 0.0, 500.0, packets=0) == (0.0, QualityLevel.LOST)
    # Half the expected bitrate costs half a point: excellent becomes good.
    full = scores.connection_quality(0.0, 20.0, 2.0, 500.0, 500.0)
    half = scores.connection_quality(0.0, 20.0, 2.0, 250.0, 500.0)
    assert half[0] == pytest.approx(full[0] - 0.5, abs=0.01)
    assert half[1] is QualityLevel.GOOD
