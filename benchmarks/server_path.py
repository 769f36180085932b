"""The server's whole per-packet path, in one process, without the other side's wake-ups:
an in-process ``Router`` with a real aiortc publisher and K real subscribers over loopback;
once all are connected, pre-built SRTP video packets of the publisher's are handed straight
to the publish's socket handler (the demultiplexer aioice's socket calls), each going
through the receive fast path (SRTP unprotect, parse, receiver statistics, NACK generator,
``on_rtp``) and out to every subscriber (translate, rewrite, SRTP protect, ``sendto`` on
loopback). It prints the CPU time per incoming packet and per outgoing copy.

Nothing else runs meanwhile (the loop is not entered): the subscribers' sockets fill and
the kernel drops the rest, so ``sendto`` is the sender's side of a loopback datagram only,
with no receiver to wake. That makes it steadier than ``benchmarks/forwarding.py`` on a
busy host and blind to what the event loop and the timers cost; compare trees by running
each tree's copy of this file, alternately.

    .venv/bin/python benchmarks/server_path.py [--k 1,32] [--packets 2000] [--runs 15]

It prints the fastest run and the median: on a shared host the fastest is the one least
disturbed by other work, and the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

VP8_KEYFRAME = bytes([0x10, 0x00, 0x00, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0xE0, 0x01]) + bytes(1089)
VP8_DELTA = bytes([0x00]) + bytes(1099)


async def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def measure(k: int, packets: int, runs: int) -> list[float]:
    """CPU microseconds per incoming packet, ``runs`` times, with ``k`` subscribers."""
    from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
    from aiortc.rtp import RtpPacket

    from media import aiortc_internals as internals
    from media.router import Router

    internals.configure_ice_addresses(("127.0.0.1",))
    router = Router()
    publisher = RTCPeerConnection()
    transceiver = publisher.addTransceiver("video", direction="sendonly")  # no track: it sends nothing
    capabilities = RTCRtpSender.getCapabilities("video")
    assert capabilities is not None
    transceiver.setCodecPreferences([c for c in capabilities.codecs if c.mimeType in ("video/VP8", "video/rtx")])
    await publisher.setLocalDescription(await publisher.createOffer())
    answer = await router.publish("st", publisher.localDescription.sdp)
    await publisher.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    subscribers = []
    try:
        for i in range(k):
            pc = RTCPeerConnection()
            subscribers.append(pc)
            offer = await router.subscribe(f"sub{i}", "st")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            await router.answer(f"sub{i}", pc.localDescription.sdp)
        publish = router.publishes["st"]
        await wait_for(lambda: publish.connected and all(
            f.ready for s in router.subscriptions.values() for f in s.senders), "every peer connection")
        server_dtls = internals.dtls_transports(publish.pc)[0]
        connection = internals.ice_connection(server_dtls)
        pair = connection._nominated[1]
        handler, source = pair.protocol.datagram_received, pair.remote_addr
        client_dtls = transceiver.sender.transport
        ssrc = internals.local_ssrc(transceiver.sender)
        match = re.search(r"a=rtpmap:(\d+) VP8/90000", publisher.localDescription.sdp)
        assert match is not None
        payload_type = int(match.group(1))
        seq = 1000
        results = []
        for _ in range(runs + 1):  # the first run warms up (and opens every keyframe gate)
            data = []
            for i in range(packets):
                packet = RtpPacket(payload_type=payload_type, marker=int(i % 8 == 7), sequence_number=seq & 0xFFFF,
                                   timestamp=(seq // 8) * 3000 & 0xFFFFFFFF, ssrc=ssrc,
                                   payload=VP8_KEYFRAME if seq == 1000 else VP8_DELTA)
                seq += 1
                data.append(client_dtls._tx_srtp.protect(packet.serialize()))
            sent_before = sum(f.packets for s in router.subscriptions.values() for f in s.senders)
            start = time.process_time()
            for datagram in data:
                handler(datagram, source)
            elapsed = time.process_time() - start
            sent = sum(f.packets for s in router.subscriptions.values() for f in s.senders) - sent_before
            if sent != packets * k:
                raise RuntimeError(f"forwarded {sent} copies, expected {packets * k}")
            results.append(elapsed / packets * 1e6)
            await asyncio.sleep(0.2)  # let the subscribers drain their sockets
        return results[1:]
    finally:
        for pc in subscribers:
            await pc.close()
        await publisher.close()
        await router.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="1,32", help="comma-separated subscriber counts")
    parser.add_argument("--packets", type=int, default=2000, help="incoming packets per run")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    for k in (int(v) for v in args.k.split(",")):
        runs = sorted(asyncio.run(measure(k, args.packets, args.runs)))
        best, median = runs[0], runs[len(runs) // 2]
        print(f"K={k:>3}: {best:.2f} µs per incoming packet (median {median:.2f}), {best / k:.2f} µs per copy out "
              f"(median {median / k:.2f}); {args.runs} runs of {args.packets}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
