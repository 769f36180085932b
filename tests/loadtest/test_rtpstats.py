"""The synthetic subscriber's pure parts, time passed in: sequence accounting with
wraparound, NACK scheduling, RFC 3550 jitter, VP8 payload descriptors, frame
assembly in decode order and the W3C freeze rule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from loadtest.rtpstats import (
    NACK_GIVE_UP_S,
    NACK_RETRIES,
    NACK_RETRY_S,
    Arrival,
    FreezeDetector,
    ReceiveCounter,
    Vp8Frames,
    parse_vp8_descriptor,
)

# --- freezes ------------------------------------------------------------------


def frames_at(detector: FreezeDetector, times: list[float]) -> list[bool]:
    return [detector.frame(t) for t in times]


def test_steady_frames_never_freeze() -> None:
    detector = FreezeDetector()
    assert not any(frames_at(detector, [i / 30 for i in range(300)]))
    assert (detector.frames, detector.freezes, detector.freeze_duration_s) == (300, 0, 0.0)


def test_a_gap_of_mean_plus_150_ms_at_30_fps_is_a_freeze_and_just_under_is_not() -> None:
    # At 30 fps the mean is 33 ms: max(3 x 33, 33 + 150) = 183 ms.
    detector = FreezeDetector()
    times = [i / 30 for i in range(31)]
    frames_at(detector, times)
    assert not detector.frame(times[-1] + 0.180)
    detector = FreezeDetector()
    frames_at(detector, times)
    assert detector.frame(times[-1] + 0.190)
    assert detector.freezes == 1 and abs(detector.freeze_duration_s - 0.190) < 1e-9


def test_at_low_frame_rates_the_three_times_mean_bound_applies() -> None:
    # At 5 fps the mean is 200 ms: max(600, 350) = 600 ms.
    times = [i / 5 for i in range(31)]
    detector = FreezeDetector()
    frames_at(detector, times)
    assert not detector.frame(times[-1] + 0.55)
    detector = FreezeDetector()
    frames_at(detector, times)
    assert detector.frame(times[-1] + 0.65)


def test_the_mean_is_over_the_last_30_frames_only() -> None:
    # 30 frames at 5 fps, then 30 at 30 fps: the mean is back to 33 ms, so 200 ms freezes.
    detector = FreezeDetector()
    times = [i / 5 for i in range(31)]
    times += [times[-1] + (i + 1) / 30 for i in range(30)]
    assert not any(frames_at(detector, times))
    assert detector.frame(times[-1] + 0.2)


def test_the_first_frames_cannot_freeze() -> None:
    detector = FreezeDetector()
    assert frames_at(detector, [0.0, 5.0]) == [False, False]


# --- sequence numbers, loss, NACK, jitter ---------------------------------------


def test_expected_and_received_across_the_sequence_number_wrap() -> None:
    counter = ReceiveCounter(90000)
    seqs = [(65530 + i) & 0xFFFF for i in range(12)]  # 65530 .. 65535, 0 .. 5
    lost = {65533, 1}
    for i, seq in enumerate(seqs):
        if seq not in lost:
            assert counter.add(seq, i * 3000, 100, i / 30)[0] is Arrival.NEW
    assert counter.expected == 12 and counter.packets == 10 and counter.bytes == 1000
    assert counter.extend(5) == 65536 + 5


def test_gaps_are_nacked_at_once_then_retried_then_given_up() -> None:
    counter = ReceiveCounter(90000)
    counter.add(100, 0, 10, 0.0)
    counter.add(103, 0, 10, 0.001)  # 101 and 102 missing
    assert counter.nacks_due(0.001) == [101, 102]
    assert counter.nacks_due(0.001 + NACK_RETRY_S / 2) == []
    assert counter.nacks_due(0.001 + NACK_RETRY_S) == [101, 102]
    arrival, ext = counter.add(101, 0, 10, 0.06)
    assert (arrival, ext) == (Arrival.RECOVERED, 101)
    assert counter.add(101, 0, 10, 0.061)[0] is Arrival.DUPLICATE
    sent = [counter.nacks_due(0.06 + i * NACK_RETRY_S) for i in range(NACK_RETRIES)]
    assert sent.count([102]) == NACK_RETRIES - 2  # two NACKs went out before: 10 in all
    assert counter.missing == 1 and counter.nacks_due(0.06 + NACK_RETRIES * NACK_RETRY_S) == []
    assert counter.nacks_due(0.002 + NACK_GIVE_UP_S) == [] and counter.missing == 0
    assert (counter.expected, counter.packets, counter.recovered, counter.duplicates) == (4, 2, 1, 1)


def test_a_gap_filled_before_any_nack_is_late_not_recovered() -> None:
    counter = ReceiveCounter(48000)
    counter.add(7, 0, 10, 0.0)
    counter.add(9, 0, 10, 0.0)
    assert counter.add(8, 0, 10, 0.0)[0] is Arrival.LATE
    assert (counter.packets, counter.recovered, counter.missing) == (3, 0, 0)


def test_a_huge_jump_is_counted_as_loss_but_not_nacked_packet_by_packet() -> None:
    counter = ReceiveCounter(90000)
    counter.add(0, 0, 10, 0.0)
    counter.add(30000, 0, 10, 0.0)
    assert counter.expected == 30001 and counter.missing == 0 and counter.nacks_due(0.0) == []


def test_jitter_is_zero_for_perfect_pacing_and_follows_rfc_3550_otherwise() -> None:
    counter = ReceiveCounter(90000)
    for i in range(50):
        counter.add(i, i * 3000, 10, i / 30)
    assert counter.jitter_ms < 1e-6
    counter = ReceiveCounter(90000)
    # Every other packet 10 ms late: |D| = 10 ms each time, J -> 10 ms.
    for i in range(400):
        counter.add(i, i * 3000, 10, i / 30 + (0.010 if i % 2 else 0.0))
    assert abs(counter.jitter_ms - 10.0) < 0.1


# --- VP8 ------------------------------------------------------------------------


def vp8(start: bool, picture_id: int | None, keyframe: bool = False, body: bytes = b"xx") -> bytes:
    b0 = (0x80 if picture_id is not None else 0) | (0x10 if start else 0)
    out = bytes([b0])
    if picture_id is not None:
        out += bytes([0x80, 0x80 | (picture_id >> 8), picture_id & 0xFF])
    if start:
        out += bytes([0x00 if keyframe else 0x01])
    return out + body


def test_descriptors_give_frame_start_keyframe_and_picture_id() -> None:
    d = parse_vp8_descriptor(vp8(True, 0x1234, keyframe=True))
    assert d is not None and (d.frame_start, d.keyframe, d.picture_id, d.picture_id_bits) == (True, True, 0x1234, 15)
    d = parse_vp8_descriptor(vp8(True, 0x1234, keyframe=False))
    assert d is not None and not d.keyframe
    d = parse_vp8_descriptor(vp8(False, 7))
    assert d is not None and (d.frame_start, d.keyframe) == (False, False)
    d = parse_vp8_descriptor(bytes([0x90, 0x80, 0x05, 0x00]))  # 7-bit picture id
    assert d is not None and (d.picture_id, d.picture_id_bits, d.keyframe) == (5, 7, True)
    d = parse_vp8_descriptor(bytes([0x11, 0x00]))  # S=1 but partition 1: not a frame start
    assert d is not None and not d.frame_start
    for truncated in (b"", b"\x80", b"\x80\x80", b"\x80\x80\x80", b"\x10", b"\x90\x80\x05"):
        assert parse_vp8_descriptor(truncated) is None, truncated


@given(st.binary(max_size=8))
def test_any_payload_parses_or_is_refused_without_raising(payload: bytes) -> None:
    parse_vp8_descriptor(payload)
    frames = Vp8Frames()
    frames.add(1, 0, True, payload, 0.0)


def send_frame(frames: Vp8Frames, seq: int, pid: int, key: bool, packets: int, now: float,
               skip: set[int] = frozenset()) -> tuple[int, bool]:  # type: ignore[assignment]
    pli = False
    for i in range(packets):
        if seq + i not in skip:
            pli = frames.add(seq + i, pid * 3000, i == packets - 1, vp8(i == 0, pid, key), now) or pli
    return seq + packets, pli


def test_frames_complete_render_in_order_and_wait_for_a_keyframe_after_a_lost_one() -> None:
    frames = Vp8Frames()
    seq = 10
    seq, _ = send_frame(frames, seq, 0, True, 3, 0.0)
    seq, _ = send_frame(frames, seq, 1, False, 3, 1 / 30)
    assert (frames.frames, frames.keyframes, frames.first_frame_at) == (2, 1, 0.0)
    # Frame 2 loses a packet for good: frames 3 and 4 complete but cannot render.
    seq, _ = send_frame(frames, seq, 2, False, 3, 2 / 30, skip={seq + 1})
    seq, _ = send_frame(frames, seq, 3, False, 3, 3 / 30)
    seq, pli = send_frame(frames, seq, 4, False, 3, 4 / 30)
    assert frames.frames == 2 and not pli
    # Half a second later rendering is still stuck: a PLI, once per interval.
    seq, pli = send_frame(frames, seq, 5, False, 3, 4 / 30 + Vp8Frames.GIVE_UP_S)
    assert pli and frames.plis == 1
    seq, pli = send_frame(frames, seq, 6, False, 3, 4 / 30 + Vp8Frames.GIVE_UP_S + 0.01)
    assert not pli and frames.frames == 2
    seq, _ = send_frame(frames, seq, 7, True, 3, 1.0)
    seq, _ = send_frame(frames, seq, 8, False, 3, 1.0 + 1 / 30)
    assert (frames.frames, frames.keyframes) == (4, 2)
    assert frames.freeze.freezes == 1  # 33 ms frames, then nothing for ~900 ms


def test_a_retransmission_completes_its_frame_and_unblocks_the_next_ones() -> None:
    frames = Vp8Frames()
    send_frame(frames, 0, 0, True, 2, 0.0)
    send_frame(frames, 2, 1, False, 2, 0.03, skip={2})
    send_frame(frames, 4, 2, False, 2, 0.06)
    assert frames.frames == 1
    frames.add(2, 1 * 3000, False, vp8(True, 1), 0.07)  # the missing first packet of frame 1
    assert frames.frames == 3
