"""The forwarding benchmark's parts work: pre-encoded media loads as expected and a
1-publisher/1-subscriber run through a real server counts packets. No timing or
speed assertions: figures come from running benchmarks/forwarding.py."""

from __future__ import annotations

from pathlib import Path

from benchmarks.forwarding import run_forwarding
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
