"""Unauthenticated sockets cannot pile up: a socket that has not joined within
``server.join_timeout_s`` is closed with 4001, and a node holds at most
``server.max_connections`` sockets (more are refused with 503 ``over_capacity`` before the
upgrade, and admitted again once one closes)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from loadtest.client import SignallingClient
from rooms.model import Role
from tests.call_helpers import authority
from tests.helpers import wait_until
from tests.server import ServerProcess, start_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path, extra_config="[server]\njoin_timeout_s = 1.0\nmax_connections = 3\n")
    yield proc
    proc.stop()


async def test_a_socket_that_never_joins_is_closed(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    idle, member = SignallingClient(server.ws_url), SignallingClient(server.ws_url)
    try:
        await idle.connect()
        await member.connect()
        await member.join(tokens.mint(f"r-{uuid.uuid4().hex[:8]}", Role.PATIENT, "Anna"))
        assert idle.ws is not None and member.ws is not None
        await wait_until(lambda: idle.ws is not None and idle.ws.closed, timeout=15,
                         message="the unjoined socket closed")
        assert idle.ws.close_code == 4001
        assert not member.ws.closed
        assert "time" in await member.request("ping")  # the joined one lives on past the deadline
    finally:
        await idle.close()
        await member.close()


async def test_connections_beyond_the_node_cap_are_refused_before_the_upgrade(server: ServerProcess) -> None:
    tokens = authority(server.data_dir)
    r = f"r-{uuid.uuid4().hex[:8]}"
    clients = [SignallingClient(server.ws_url) for _ in range(3)]
    try:
        for n, client in enumerate(clients):
            await client.connect()
            await client.join(tokens.mint(r, Role.PATIENT, f"P{n}"))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(server.ws_url, protocols=("openconsult.v1",))
            assert refused.value.status == 503
            async with session.get(server.ws_url, headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                           "Sec-WebSocket-Version": "13",
                                                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r503:
                body = await r503.json()
            assert r503.status == 503 and body["error"]["code"] == "over_capacity"
            assert "server.max_connections" in body["error"]["message"]
            await clients[0].close()

            async def admitted() -> bool:
                try:
                    ws = await session.ws_connect(server.ws_url, protocols=("openconsult.v1",))
                except aiohttp.WSServerHandshakeError:
                    return False
                await ws.close()
                return True

            await wait_until(admitted, timeout=15, message="a socket admitted once one closed")
    finally:
        for client in clients:
            await client.close()
