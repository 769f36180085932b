"""The shared media port (media/udpmux.py) with real aioice agents over loopback: several
ICE agents on one UDP socket, each gets only its own datagrams; strangers are dropped and
counted by reason; an authenticated check from a new address moves the route, a forged one
does not; closing an agent removes every route it held, however many come and go."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator

import aioice
import pytest
from aioice import stun

from media import aiortc_internals
from media.events import DatagramDropReason
from media.udpmux import MAX_ADDRESSES, UdpMux
from tests.helpers import wait_until


@pytest.fixture
async def mux() -> AsyncIterator[UdpMux]:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))
    mux = UdpMux.bind(["127.0.0.1"], 0, dict.fromkeys(DatagramDropReason, 0))
    await mux.start()
    yield mux
    mux.close()


async def connect(server: aioice.Connection, client: aioice.Connection) -> None:
    for conn in (server, client):
        await conn.gather_candidates()
    for local, remote in ((server, client), (client, server)):
        for candidate in remote.local_candidates:
            await local.add_remote_candidate(candidate)
        await local.add_remote_candidate(None)
        local.remote_username, local.remote_password = remote.local_username, remote.local_password
    await asyncio.gather(server.connect(), client.connect())


def binding_request(username: str | None, key: bytes | None) -> bytes:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    if username is not None:
        request.attributes["USERNAME"] = username
    request.attributes["PRIORITY"] = 1853817087
    request.attributes["ICE-CONTROLLING"] = 1
    if key is not None:
        request.add_message_integrity(key)
    request.add_fingerprint()
    return bytes(request)


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def test_agents_share_one_socket_and_get_only_their_own_datagrams(mux: UdpMux) -> None:
    servers = [aioice.Connection(ice_controlling=False) for _ in range(2)]
    clients = [aioice.Connection(ice_controlling=True) for _ in range(2)]
    stranger = udp_socket()
    try:
        for server in servers:
            aiortc_internals.use_udp_mux(server, mux)
        for server, client in zip(servers, clients):
            await connect(server, client)
        [shared] = mux.sockets
        ports = {c.port for s in servers for c in s.local_candidates}
        assert ports == {shared.port}
        assert servers[0].local_username != servers[1].local_username
        assert len(servers[0].local_username) == 16

        for i, (server, client) in enumerate(zip(servers, clients)):
            await client.send(b"\x80\x60 to server %d" % i)
            await server.send(b"\x80\x60 to client %d" % i)
        for i, (server, client) in enumerate(zip(servers, clients)):
            assert await asyncio.wait_for(server.recv(), 10) == b"\x80\x60 to server %d" % i
            assert await asyncio.wait_for(client.recv(), 10) == b"\x80\x60 to client %d" % i
        assert all(s._queue.empty() for s in servers)

        # Strangers: media from an unknown address, STUN naming no agent or none at all.
        drops = mux.drops
        before = dict(drops)
        for datagram in (b"\x80\x60 rtp", b"\x16\xfe\xfd dtls", b"\xff junk",
                         binding_request("nosuchufrag:x", b"k" * 22), binding_request(None, None),
                         struct.pack("!HHI", 0x0101, 0, 0x2112A442) + os.urandom(12),  # a response nobody asked for
                         b"\x00\x01\x00\x08 short", b""):
            stranger.sendto(datagram, ("127.0.0.1", shared.port))
        expected = {DatagramDropReason.UNKNOWN_ADDRESS: 4, DatagramDropReason.UNKNOWN_USERNAME: 2,
                    DatagramDropReason.MALFORMED_STUN: 1, DatagramDropReason.EMPTY: 1}
        await wait_until(lambda: all(drops[r] - before[r] == n for r, n in expected.items()), timeout=10,
                         message=f"drops {expected}")
        assert all(s._queue.empty() for s in servers)
        # Nothing is answered to a stranger.
        with pytest.raises(BlockingIOError):
            stranger.recv(1500)

        # Closing an agent removes its username and address routes, and only its own.
        ufrags, addresses = mux.route_counts()
        assert (ufrags, addresses) == (2, 2)
        await servers[0].close()
        assert mux.route_counts() == (1, 1)
        await servers[1].close()
        assert mux.route_counts() == (0, 0)
    finally:
        stranger.close()
        await asyncio.gather(*(c.close() for c in (*servers, *clients)))


async def test_an_authenticated_check_from_a_new_address_moves_the_route(mux: UdpMux) -> None:
    server, client = aioice.Connection(ice_controlling=False), aioice.Connection(ice_controlling=True)
    rebound, forger = udp_socket(), udp_socket()
    loop = asyncio.get_running_loop()
    try:
        aiortc_internals.use_udp_mux(server, mux)
        await connect(server, client)
        [shared] = mux.sockets
        target = ("127.0.0.1", shared.port)
        username = f"{server.local_username}:{client.local_username}"

        # The client's NAT rebinds: its media now comes from another port. Dropped until...
        rebound.sendto(b"\x80\x60 early", target)
        await wait_until(lambda: mux.drops[DatagramDropReason.UNKNOWN_ADDRESS] == 1, timeout=10)
        # ... a consent check with the right username and integrity comes from there.
        rebound.sendto(binding_request(username, server.local_password.encode()), target)
        reply = stun.parse_message(await asyncio.wait_for(loop.sock_recv(rebound, 1500), 10))
        assert reply.message_class == stun.Class.RESPONSE
        assert shared.by_address[rebound.getsockname()] is shared.by_ufrag[server.local_username]
        rebound.sendto(b"\x80\x60 after rebinding", target)
        assert await asyncio.wait_for(server.recv(), 10) == b"\x80\x60 after rebinding"

        # A forger knows the username but not the password: answered 401, no route.
        forger.sendto(binding_request(username, b"not the password"), target)
        reply = stun.parse_message(await asyncio.wait_for(loop.sock_recv(forger, 1500), 10))
        assert reply.message_class == stun.Class.ERROR and reply.attributes["ERROR-CODE"][0] == 401
        assert forger.getsockname() not in shared.by_address
        forger.sendto(b"\x80\x60 forged", target)
        await wait_until(lambda: mux.drops[DatagramDropReason.UNKNOWN_ADDRESS] == 2, timeout=10)
        assert server._queue.empty()
    finally:
        rebound.close()
        forger.close()
        await asyncio.gather(server.close(), client.close())
    assert mux.route_counts() == (0, 0)


async def test_thousands_of_agents_come_and_go_without_a_leak(mux: UdpMux) -> None:
    [shared] = mux.sockets
    for _ in range(4):
        agents = [aioice.Connection(ice_controlling=True) for _ in range(250)]
        for agent in agents:
            aiortc_internals.use_udp_mux(agent, mux)
        await asyncio.gather(*(a.gather_candidates() for a in agents))
        for n, agent in enumerate(agents):
            # Each sends (a check) to two addresses of its own: both routed to it.
            for port in (2 * n + 1000, 2 * n + 1001):
                agent._protocols[0].transport.sendto(b"\x00\x01\x00\x00", ("127.0.0.1", port))
        assert mux.route_counts() == (250, 500)
        assert len({a.local_username for a in agents}) == 250
        await asyncio.gather(*(a.close() for a in agents))
        assert mux.route_counts() == (0, 0)
        assert not shared.by_ufrag and not shared.by_address


async def test_an_agent_holds_a_bounded_number_of_addresses(mux: UdpMux) -> None:
    [shared] = mux.sockets
    agent = aioice.Connection(ice_controlling=True)
    aiortc_internals.use_udp_mux(agent, mux)
    await agent.gather_candidates()
    transport = agent._protocols[0].transport
    try:
        for port in range(1000, 1000 + MAX_ADDRESSES + 10):
            transport.sendto(b"\x00\x01\x00\x00", ("127.0.0.1", port))
        assert len(shared.by_address) == MAX_ADDRESSES
        # An authenticated check from a new address still gets through: the oldest address goes.
        newcomer = udp_socket()
        try:
            newcomer.sendto(binding_request(f"{agent.local_username}:x", agent.local_password.encode()),
                            ("127.0.0.1", shared.port))
            await wait_until(lambda: newcomer.getsockname() in shared.by_address, timeout=10)
        finally:
            newcomer.close()
        assert len(shared.by_address) == MAX_ADDRESSES and ("127.0.0.1", 1000) not in shared.by_address
    finally:
        await agent.close()
    assert mux.route_counts() == (0, 0)
