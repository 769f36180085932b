"""The forwarding benchmark's parts work: pre-encoded media loads as expected and a
1-publisher/1-subscriber run through a real server counts packets. No timing or
speed assertions: figures come from running benchmarks/forwarding.py."""

from __future__ import annotations

from pathlib import Path


from benchmarks.forwarding import Reference, Result, janus_table, run_forwarding
from loadtest.media import encode_media, load_media, save_media, vp8_is_keyframe


def test_pre_encoded_media_starts_with_a_keyframe_near_the_target_bitrate(tmp_path: Path) -> None:
    media = encode_media(seconds=2.0, bitrate=1_000_000, keyframe_interval=30)
    assert len(media.video) == 60 and len(media.audio) >= 90  # 30 fps; 20 ms Opus frames
    assert media.video[0].keyframe and vp8_is_keyframe(media.video[0].data)
    assert [i for i, f in enumerate(media.video) if f.keyframe] == [0, 30]
    assert 300_000 < media.video_bitrate < 3_000_000, media.video_bitrate
    save_media(media, tmp_path / "media.bin")
    assert load_media(tmp_path / "media.bin") == media


async def test_one_publisher_one_subscriber_run_counts_packets(tmp_path: Path) -> None:
    result = await run_forwarding(k=1, seconds=3.0, workdir=tmp_path, media_seconds=2.0, warmup_s=0.5)
    print(result)
    assert result.packets > 0
    assert result.server_cpu_s >= 0 and result.reference.srtp_sendto_per_cpu_s > 0


def _result(server: str, k: int, per_cpu_s: float) -> Result:
    reference = Reference(srtp_sendto_per_cpu_s=100_000.0, sendto_per_cpu_s=200_000.0)
    return Result(k=k, client_processes=2, window_s=10.0, packets=1000, packets_per_s=100.0, server_cpu_s=0.1,
                  server_cpu_pct=1.0, packets_per_server_cpu_s=per_cpu_s, clients_cpu_pct=1.0, host_busy_pct=50.0,
                  reference=reference, ratio=per_cpu_s / 100_000, keyframe_requests=1, server=server)


def test_janus_table_divides_openconsult_by_each_janus_setup_per_k() -> None:
    table = janus_table([_result("openconsult", 1, 6000.0), _result("janus default", 1, 12000.0),
                         _result("janus event_loops=2", 1, 4000.0),
                         _result("openconsult", 32, 60000.0), _result("janus default", 32, 40000.0),
                         _result("janus event_loops=2", 32, 80000.0)])
    rows = [line.split() for line in table.splitlines()[2:]]
    assert rows == [["1", "6000", "12000", "0.50", "4000", "1.50"], ["32", "60000", "40000", "1.50", "80000", "0.75"]]
    assert "janus default" in table.splitlines()[1] and "janus event_loops=2" in table.splitlines()[1]
