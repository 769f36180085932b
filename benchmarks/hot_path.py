"""The forwarding hot path alone: ``PublishedTrack.on_rtp`` → ``ForwardingSender.forward``
for K subscribers whose send is a no-op, in this process (no sockets, no SRTP, no
aiortc receive path). What it shows is the Python cost per forwarded copy, the part
``media/router.py`` and ``media/forwarder.py`` own; ``benchmarks/forwarding.py`` has the
whole server's figure. Compare trees by running each one's copy of this file.

    .venv/bin/python benchmarks/hot_path.py [--k 1,32] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

VP8_KEYFRAME = bytes([0x10, 0x00, 0x00, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0xE0, 0x01]) + bytes(1089)
VP8_DELTA = bytes([0x00]) + bytes(1099)


def per_copy_us(k: int, copies: int = 40_000) -> float:
    """CPU microseconds per forwarded copy of a 1,100-byte video packet to ``k`` subscribers."""
    from aiortc import RTCRtpSender
    from aiortc.rtp import RtpPacket

    from media.router import URI_ABS_SEND_TIME, URI_MID, ForwardingSender, PublishedTrack, Router

    router = Router()
    publish: Any = type("Publish", (), {"stream_id": "st", "peer_id": "st"})()
    subscription: Any = type("Subscription", (), {"peer_id": "sub", "router": router})()
    sender: Any = type("Sender", (), {"_ssrc": 1234, "transport": None})()
    vp8 = next(c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/VP8")
    track = PublishedTrack(router, publish, "video", None, 1, vp8)  # type: ignore[arg-type]
    forwarders = []
    for _ in range(k):
        fwd = ForwardingSender(subscription, track, sender)
        fwd.send_rtp = lambda data: True
        fwd.configure(96, {URI_MID: 1, URI_ABS_SEND_TIME: 3}, "a")
        fwd.ready = True
        forwarders.append(fwd)
    track.subscribers = tuple(forwarders)
    n = max(1, copies // k)
    packets = [RtpPacket(payload_type=96, marker=int(i % 8 == 7), sequence_number=(60_000 + i) & 0xFFFF,
                         timestamp=(i // 8) * 3000, ssrc=999, payload=VP8_KEYFRAME if i == 0 else VP8_DELTA)
               for i in range(n)]
    start = time.process_time()
    for packet in packets:
        track.on_rtp(packet, 0)
    elapsed = time.process_time() - start
    assert all(f.packets == n for f in forwarders), "not every packet was forwarded"
    return elapsed / (n * k) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="1,32", help="comma-separated subscriber counts")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for k in (int(v) for v in args.k.split(",")):
        runs = [per_copy_us(k) for _ in range(args.runs)]
        print(f"K={k:>3}: {min(runs):.3f}-{max(runs):.3f} µs per forwarded copy ({args.runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
