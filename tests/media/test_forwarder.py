"""The forwarder's pure parts (media/forwarder.py): packets and ``now`` in, decisions out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.events import ForwardDropReason
from media.forwarder import (
    KeyframeGate,
    NackResponder,
    PacketCache,
    PliLimiter,
    RembAggregator,
    Resend,
    RtpTranslator,
    sender_report_rtp_time,
)

SSRC = 0x1234
OTHER_SSRC = 0x5678


def forward(t: RtpTranslator, seq: int, ts: int, keyframe: bool = False, now: float = 0.0,
            ssrc: int = SSRC) -> tuple[int, int] | ForwardDropReason:
    """Run one packet through ``t`` the way the router does: admit, then rewrite."""
    verdict = t.admit(ssrc, seq, ts, keyframe, now)
    if verdict is not None:
        return verdict
    out_ts = t.out_ts(ts)
    t.sent(out_ts)
    return t.out_seq(seq), out_ts


# --- sequence numbers and timestamps ------------------------------------------------------


def test_first_packet_maps_to_the_random_bases() -> None:
    t = RtpTranslator(90000, video=False, seq_base=1000, ts_base=5000)
    assert forward(t, 40000, 123456) == (1000, 5000)
    assert forward(t, 40001, 123456 + 3000) == (1001, 8000)


def test_sequence_wraps_from_65535_to_0_on_both_sides() -> None:
    # The publisher wraps: 65534, 65535, 0, 1 stay consecutive downstream.
    t = RtpTranslator(48000, video=False, seq_base=10, ts_base=0)
    assert [forward(t, s, 0)[0] for s in (65534, 65535, 0, 1)] == [10, 11, 12, 13]  # type: ignore[index]
    # The subscriber's numbering wraps: base 65534 → 65534, 65535, 0, 1.
    t = RtpTranslator(48000, video=False, seq_base=65534, ts_base=0)
    assert [forward(t, s, 0)[0] for s in (100, 101, 102, 103)] == [65534, 65535, 0, 1]  # type: ignore[index]


def test_timestamp_wraps_at_32_bits() -> None:
    t = RtpTranslator(90000, video=False, seq_base=0, ts_base=0xFFFFFF00)
    assert forward(t, 1, 0) == (0, 0xFFFFFF00)
    assert forward(t, 2, 0x100) == (1, 0)  # 0xFFFFFF00 + 0x100 wraps to 0
    # The publisher's timestamp wraps too: the subscriber's advances by the same 3000.
    t = RtpTranslator(90000, video=False, seq_base=0, ts_base=7)
    forward(t, 1, 0xFFFFFFFF - 999)
    assert forward(t, 2, 2000) == (1, 7 + 3000)


def test_gaps_pass_through_as_gaps() -> None:
    # A lost packet upstream is a gap downstream, so the subscriber's NACK names it.
    t = RtpTranslator(90000, video=False, seq_base=500, ts_base=0)
    assert forward(t, 10, 0) == (500, 0)
    assert forward(t, 13, 0) == (503, 0)
    assert forward(t, 11, 0) == (501, 0)  # late but after the start: forwarded in place


def test_packets_older_than_the_start_are_dropped_across_the_wrap() -> None:
    t = RtpTranslator(90000, video=False, seq_base=0, ts_base=0)
    assert forward(t, 2, 0) == (0, 0)
    assert forward(t, 65535, 0) is ForwardDropReason.TOO_OLD  # before 2, across the wrap
    assert forward(t, 1, 0) is ForwardDropReason.TOO_OLD
    assert forward(t, 3, 0) == (1, 0)


def test_long_runs_keep_counting_through_several_wraps() -> None:
    t = RtpTranslator(90000, video=False, seq_base=7, ts_base=0)
    outs = [forward(t, (60000 + i) & 0xFFFF, i * 3000) for i in range(3 * 65536)]
    assert all(out == ((7 + i) & 0xFFFF, (i * 3000) & 0xFFFFFFFF) for i, out in enumerate(outs))


def test_source_switch_continues_the_sequence_and_advances_the_timestamp_by_elapsed_time() -> None:
    t = RtpTranslator(90000, video=False, seq_base=100, ts_base=1000)
    assert forward(t, 5000, 0, now=10.0) == (100, 1000)
    assert forward(t, 5001, 3000, now=10.1) == (101, 4000)
    # A new SSRC with unrelated numbers, 0.5 s after the last packet.
    assert forward(t, 60000, 999_999, now=10.6, ssrc=OTHER_SSRC) == (102, 4000 + 45000)
    assert forward(t, 60001, 999_999 + 3000, now=10.7, ssrc=OTHER_SSRC) == (103, 4000 + 48000)


def test_source_switch_right_after_a_packet_still_advances_the_timestamp() -> None:
    t = RtpTranslator(48000, video=False, seq_base=0, ts_base=0)
    forward(t, 1, 960, now=1.0)
    assert forward(t, 9, 0, now=1.0, ssrc=OTHER_SSRC) == (1, 1)


@given(seq_base=st.integers(0, 0xFFFF), ts_base=st.integers(0, 0xFFFFFFFF), first=st.integers(0, 0xFFFF),
       first_ts=st.integers(0, 0xFFFFFFFF), steps=st.lists(st.integers(1, 50), min_size=1, max_size=60))
def test_in_order_packets_keep_their_spacing(seq_base: int, ts_base: int, first: int, first_ts: int,
                                             steps: list[int]) -> None:
    t = RtpTranslator(90000, video=False, seq_base=seq_base, ts_base=ts_base)
    seq, ts = first, first_ts
    assert forward(t, seq, ts) == (seq_base, ts_base)
    for step in steps:
        seq, ts = (seq + step) & 0xFFFF, (ts + step * 1000) & 0xFFFFFFFF
        out = forward(t, seq, ts)
        assert not isinstance(out, ForwardDropReason)
        assert out == ((seq - first + seq_base) & 0xFFFF, (ts - first_ts + ts_base) & 0xFFFFFFFF)
        assert t.in_seq(out[0]) == seq


# --- keyframe gate ------------------------------------------------------------------------


def test_video_waits_for_a_keyframe_at_the_start_and_after_a_switch() -> None:
    t = RtpTranslator(90000, video=True, seq_base=0, ts_base=0)
    assert forward(t, 1, 0) is ForwardDropReason.WAITING_KEYFRAME
    assert forward(t, 2, 0, keyframe=True) == (0, 0)
    assert forward(t, 3, 0) == (1, 0)  # delta frames after the keyframe pass
    assert forward(t, 50, 0, ssrc=OTHER_SSRC) is ForwardDropReason.WAITING_KEYFRAME
    assert forward(t, 4, 0) is ForwardDropReason.WAITING_KEYFRAME  # the old source is closed too
    assert forward(t, 51, 0, keyframe=True, ssrc=OTHER_SSRC) == (2, 1)
    assert forward(t, 52, 0, ssrc=OTHER_SSRC) == (3, 1)


def test_audio_is_never_gated() -> None:
    gate = KeyframeGate(video=False)
    assert gate.passes(False) and not gate.waiting
    gate.close()
    assert gate.passes(False)


def test_gate_closes_and_reopens() -> None:
    gate = KeyframeGate(video=True)
    assert [gate.passes(False), gate.passes(True), gate.passes(False)] == [False, True, True]
    gate.close()
    assert [gate.passes(False), gate.passes(True)] == [False, True]


# --- packet cache and NACK responder ------------------------------------------------------


def test_cache_is_sized_by_time_within_bounds() -> None:
    cache = PacketCache(seconds=1.0, min_slots=64, max_slots=2048)
    assert cache.slots_for_rate(0) == 64
    assert cache.slots_for_rate(100) == 128  # ≥ 1 s at 100 packets/s
    assert cache.slots_for_rate(129) == 256
    assert cache.slots_for_rate(1_000_000) == 2048
    with pytest.raises(ValueError, match="powers of two"):
        PacketCache(min_slots=100)


def test_cache_grows_keeping_packets_and_shrinks_only_with_hysteresis() -> None:
    cache = PacketCache(seconds=1.0, min_slots=64, max_slots=1024)
    for seq in range(65500, 65536):
        cache.put(seq, seq * 10, 0, b"p%d" % seq)
    for seq in range(0, 28):
        cache.put(seq, seq * 10, seq & 1, b"p%d" % seq)
    assert cache.resize_for_rate(500) and cache.capacity == 512
    assert cache.get(65500) == (655000, 0, b"p65500")
    assert cache.get(27) == (270, 1, b"p27")
    assert not cache.resize_for_rate(300)  # 512 → 512: nothing
    assert not cache.resize_for_rate(200)  # wants 256: not yet a quarter
    assert cache.resize_for_rate(100) and cache.capacity == 128
    # The newest packets survive a shrink; a slot shared with an older one keeps the newer.
    assert cache.get(27) == (270, 1, b"p27")
    assert cache.get(65500) == (655000, 0, b"p65500")


def test_shrink_keeps_the_newer_of_two_packets_sharing_a_slot() -> None:
    cache = PacketCache(seconds=1.0, min_slots=4, max_slots=16)
    cache.resize_for_rate(16)
    for seq in range(16):
        cache.put(seq, seq, 0, b"")
    assert cache.resize_for_rate(1) and cache.capacity == 4
    assert [cache.get(s) is not None for s in range(16)] == [False] * 12 + [True] * 4


def test_nack_resends_cached_packets_renumbered_and_forwards_misses_upstream() -> None:
    t = RtpTranslator(90000, video=True, seq_base=65534, ts_base=100)
    cache = PacketCache(min_slots=64, max_slots=64)
    for i, seq in enumerate((65535, 0, 1, 2)):
        cache.put(seq, 9000 + i * 3000, i == 3, b"x%d" % i)
        forward(t, seq, 9000 + i * 3000, keyframe=True)
    # The subscriber saw 65534, 65535, 0, 1; it lost 65535 and 1 and asks for one never sent.
    resend, upstream = NackResponder().respond([65535, 1, 1, 40], cache, t)
    assert resend == [Resend(65535, 3100, 0, b"x1"), Resend(1, 9100, 1, b"x3")]
    assert upstream == [(40 - 65534 + 65535) & 0xFFFF]


def test_nack_work_is_bounded_per_packet() -> None:
    t = RtpTranslator(90000, video=False, seq_base=0, ts_base=0)
    forward(t, 0, 0)
    resend, upstream = NackResponder(max_per_nack=8).respond(range(1000), PacketCache(), t)
    assert resend == [] and len(upstream) == 8


# --- PLI limiter -------------------------------------------------------------------------


def test_pli_limiter_sends_one_per_interval_and_retries_a_held_one() -> None:
    pli = PliLimiter(interval_s=0.5)
    steps = [(pli.request, 10.0), (pli.request, 10.2), (pli.retry, 10.4), (pli.retry, 10.5), (pli.retry, 11.5)]
    held = [(step(now), pli.pending) for step, now in steps]
    # Sent; held; still held; sent once the interval passed; nothing held, nothing sent.
    assert held == [(True, False), (False, True), (False, True), (True, False), (False, False)]


def test_pli_limiter_drops_a_held_request_once_a_keyframe_came() -> None:
    pli = PliLimiter(interval_s=0.5)
    pli.request(0.0)
    pli.request(0.1)
    pli.keyframe_received()
    assert not pli.retry(5.0)
    pli.hold()
    assert pli.retry(5.0)


# --- REMB aggregation --------------------------------------------------------------------


def test_remb_is_the_lowest_fresh_estimate() -> None:
    remb = RembAggregator(max_age_s=5.0)
    assert remb.estimate(0.0) is None
    remb.update(1, 2_000_000, now=0.0)
    remb.update(2, 500_000, now=1.0)
    assert remb.estimate(2.0) == 500_000
    remb.update(1, 800_000, now=5.5)
    assert remb.estimate(6.5) == 800_000  # subscriber 2's estimate is 5.5 s old
    remb.remove(1)
    assert remb.estimate(6.5) is None
    remb.update(3, 0, now=7.0)  # a zero estimate is no estimate
    assert remb.estimate(7.0) is None


# --- sender reports ----------------------------------------------------------------------


def test_sender_report_follows_the_publishers_mapping_shifted_to_the_subscriber() -> None:
    ntp_half_second = 1 << 31
    sr = (10 << 32, 0xFFFFFF00)  # the publisher's SR: NTP 10 s ↔ RTP 0xFFFFFF00
    rtp = sender_report_rtp_time((10 << 32) + ntp_half_second, now=0.0, clock_rate=90000, ts_offset=0x200,
                                 publisher_sr=sr, last_ts=0, last_sent=0.0)
    assert rtp == (0xFFFFFF00 + 45000 + 0x200) & 0xFFFFFFFF


def test_sender_report_before_the_publishers_first_sr_extrapolates_the_last_packet() -> None:
    assert sender_report_rtp_time(0, now=101.0, clock_rate=48000, ts_offset=5, publisher_sr=None,
                                  last_ts=0xFFFFFFFF, last_sent=100.0) == 48000 - 1
