"""Datagram demux benchmark: what the RFC 7983 demultiplexer costs per incoming media datagram.

Two real aioice connections on 127.0.0.1 are connected; the receiving side's socket
handler is then called directly with a 1 KB RTP-like datagram from the selected pair's
remote address, first as aioice ships it (try to parse STUN, fail, hand it on), then with
``media.aiortc_internals.demux_datagrams`` in front (one first-byte compare, then hand it
on). Both hand the datagram to the same queue aiortc reads, drained between runs.

    .venv/bin/python benchmarks/datagram_demux.py [--count 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import timeit
from collections.abc import Callable
from typing import Any

import aioice

from media import aiortc_internals
from media.events import DatagramDropReason


async def measure(count: int) -> tuple[float, float]:
    """Nanoseconds per datagram: aioice's own handler, then with the demux in front."""
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))
    a, b = aioice.Connection(ice_controlling=True), aioice.Connection(ice_controlling=False)
    try:
        for connection in (a, b):
            await connection.gather_candidates()
        for local, remote in ((a, b), (b, a)):
            for candidate in remote.local_candidates:
                await local.add_remote_candidate(candidate)
            await local.add_remote_candidate(None)
            local.remote_username, local.remote_password = remote.local_username, remote.local_password
        await asyncio.gather(a.connect(), b.connect())
        pair = b._nominated[1]
        protocol, addr = pair.protocol, pair.remote_addr
        datagram = b"\x80\x60" + os.urandom(1000)

        def per_datagram(handler: Callable[[bytes, tuple[Any, ...]], None]) -> float:
            def run() -> None:
                for _ in range(count):
                    handler(datagram, addr)
                while not b._queue.empty():
                    b._queue.get_nowait()

            return min(timeit.repeat(run, number=1, repeat=5)) / count * 1e9

        plain = per_datagram(protocol.datagram_received)
        aiortc_internals.demux_datagrams(b, dict.fromkeys(DatagramDropReason, 0))
        demuxed = per_datagram(protocol.datagram_received)
        return plain, demuxed
    finally:
        await asyncio.gather(a.close(), b.close())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="datagrams per timed run (best of 5)")
    args = parser.parse_args(argv)
    plain, demuxed = asyncio.run(measure(args.count))
    print(f"aioice's handler: {plain:.0f} ns per RTP datagram; with the RFC 7983 demux: {demuxed:.0f} ns "
          f"({demuxed / plain:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
