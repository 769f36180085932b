"""Shared media port benchmark: what routing on one UDP port (``media.udp_port``) costs per
media datagram, in and out.

A real aioice agent on the mux (``aiortc_internals.use_udp_mux``) is connected to a client
agent over 127.0.0.1, with the RFC 7983 demultiplexer in front as the router puts it, among
``--routes`` other agents that each hold an address. In: a 1 KB RTP-like datagram from the
selected pair's address is handed to the agent's own handler directly (what a socket per
peer connection does), then to the shared socket's handler (one lookup by address, then
the same handler). Out: the agent's transport ``sendto`` against the shared socket's own,
both to a discarding socket on loopback (the syscall is in both).

    .venv/bin/python benchmarks/udp_mux.py [--count 200000] [--routes 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import timeit
from collections.abc import Callable
from typing import Any

import aioice

from media import aiortc_internals
from media.events import DatagramDropReason
from media.udpmux import UdpMux


async def measure(count: int, routes: int) -> tuple[float, float, float, float]:
    """Nanoseconds per datagram: in direct, in through the mux, out direct, out through the mux."""
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))
    mux = UdpMux.bind(["127.0.0.1"], 0, dict.fromkeys(DatagramDropReason, 0))
    await mux.start()
    [shared] = mux.sockets
    others = [aioice.Connection(ice_controlling=True) for _ in range(routes)]
    a, b = aioice.Connection(ice_controlling=True), aioice.Connection(ice_controlling=False)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    try:
        for n, other in enumerate(others):
            aiortc_internals.use_udp_mux(other, mux)
            await other.gather_candidates()
            other._protocols[0].transport.sendto(b"\x00\x01\x00\x00", (f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", 9))
        aiortc_internals.use_udp_mux(b, mux)
        for connection in (a, b):
            await connection.gather_candidates()
        for local, remote in ((a, b), (b, a)):
            for candidate in remote.local_candidates:
                await local.add_remote_candidate(candidate)
            await local.add_remote_candidate(None)
            local.remote_username, local.remote_password = remote.local_username, remote.local_password
        await asyncio.gather(a.connect(), b.connect())
        aiortc_internals.demux_datagrams(b, mux.drops)
        pair = b._nominated[1]
        protocol, addr = pair.protocol, pair.remote_addr
        datagram = b"\x80\x60" + os.urandom(1000)

        def per_datagram(handler: Callable[[bytes, tuple[Any, ...]], None], target: tuple[Any, ...]) -> float:
            def run() -> None:
                for _ in range(count):
                    handler(datagram, target)
                while not b._queue.empty():
                    b._queue.get_nowait()

            return min(timeit.repeat(run, number=1, repeat=5)) / count * 1e9

        direct_in = per_datagram(protocol.datagram_received, addr)
        mux_in = per_datagram(shared.datagram_received, addr)
        assert b._queue.empty() and not any(mux.drops.values()), mux.drops
        out = sink.getsockname()
        protocol.transport.sendto(b"\x00\x01\x00\x00", out)  # the agent holds the sink's address
        direct_out = per_datagram(shared.transport.sendto, out)
        mux_out = per_datagram(protocol.transport.sendto, out)
        return direct_in, mux_in, direct_out, mux_out
    finally:
        sink.close()
        await asyncio.gather(*(c.close() for c in (a, b, *others)))
        mux.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="datagrams per timed run (best of 5)")
    parser.add_argument("--routes", type=int, default=2000, help="other agents on the shared socket")
    args = parser.parse_args(argv)
    direct_in, mux_in, direct_out, mux_out = asyncio.run(measure(args.count, args.routes))
    print(f"in:  agent's handler {direct_in:.0f} ns per RTP datagram; through the shared socket "
          f"({args.routes} other routes) {mux_in:.0f} ns (+{mux_in - direct_in:.0f} ns)")
    print(f"out: socket sendto {direct_out:.0f} ns; through the agent's mux transport {mux_out:.0f} ns "
          f"(+{mux_out - direct_out:.0f} ns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
