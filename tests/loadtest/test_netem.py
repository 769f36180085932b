"""The network profile's pure part: which datagrams a profile drops and when it
delivers the rest (time and randomness passed in)."""

from __future__ import annotations

import random

import pytest

from loadtest.netem import QUEUE_S, BurstLoss, Impairment, NetworkProfile


def run(profile: NetworkProfile, count: int, interval: float, size: int = 1000,
        seed: int = 1) -> list[tuple[float, float | None]]:
    impairment = Impairment(profile, random.Random(seed))
    return [(i * interval, impairment.schedule(i * interval, size)) for i in range(count)]


def test_random_loss_drops_about_that_share_and_delivers_the_rest_at_once() -> None:
    result = run(NetworkProfile(loss_pct=10), 20000, 0.001)
    dropped = sum(due is None for _, due in result)
    assert 0.09 < dropped / len(result) < 0.11
    assert all(due == now for now, due in result if due is not None)


def test_no_profile_no_change() -> None:
    assert all(due == now for now, due in run(NetworkProfile(), 1000, 0.001))


def test_burst_loss_drops_everything_inside_each_burst_and_nothing_outside() -> None:
    result = run(NetworkProfile(burst=BurstLoss(every_s=1.0, length_ms=100)), 3000, 0.001)
    for now, due in result:
        assert (due is None) == (now % 1.0 < 0.1 - 1e-9), now


def test_delay_and_jitter_stay_within_bounds_and_never_reorder() -> None:
    result = run(NetworkProfile(delay_ms=50, jitter_ms=20), 2000, 0.002)
    dues = [due for _, due in result]
    assert all(due is not None for due in dues)
    delays = [due - now for now, due in result if due is not None]
    assert min(delays) >= 0.03 - 1e-9 and max(delays) <= 0.07 + 0.002
    assert max(delays) - min(delays) > 0.03  # the jitter is there
    assert dues == sorted(dues)  # type: ignore[type-var]


def test_a_bandwidth_cap_paces_to_the_rate_and_drops_beyond_the_queue() -> None:
    # 1000-byte datagrams offered at 800 kbps to a 400 kbps link: half go, spaced 20 ms.
    result = run(NetworkProfile(bandwidth_kbps=400), 1000, 0.01)
    delivered = [due for _, due in result if due is not None]
    assert 0.45 < len(delivered) / len(result) < 0.55
    gaps = [b - a for a, b in zip(delivered, delivered[1:])]
    assert min(gaps) >= 0.02 - 1e-9
    assert max(due - now for now, due in result if due is not None) <= QUEUE_S + 0.02 + 1e-9
    # Under the cap nothing waits.
    assert all(due == now + 0.02 for now, due in run(NetworkProfile(bandwidth_kbps=400), 100, 0.05))


def test_direction_decides_where_the_profile_applies() -> None:
    assert NetworkProfile(direction="up").applies("up") and not NetworkProfile(direction="up").applies("down")
    assert NetworkProfile(direction="down").applies("down") and not NetworkProfile(direction="down").applies("up")
    assert NetworkProfile().applies("up") and NetworkProfile().applies("down")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"loss_pct": 101}, "loss_pct"), ({"loss_pct": -1}, "loss_pct"), ({"delay_ms": -5}, "delay_ms"),
    ({"bandwidth_kbps": 0}, "bandwidth_kbps"), ({"direction": "sideways"}, "direction"),
])
def test_a_bad_profile_is_refused_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        NetworkProfile(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length_ms"):
        BurstLoss(every_s=1.0, length_ms=2000)
