"""signalling.proxies: X-Forwarded-For / Forwarded believed from trusted proxies only."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from rooms.model import Role
from signalling.config import ConfigError, load_config
from signalling.proxies import client_ip, networks
from tests.call_helpers import authority
from tests.server import start_server

TRUSTED = networks(["10.0.0.5", "10.1.0.0/16", "fd00::/8"])


@pytest.mark.parametrize(("peer", "headers", "expected"), [
    # No trusted proxy: the peer, whatever the headers say.
    ("203.0.113.9", {"X-Forwarded-For": "1.2.3.4"}, "203.0.113.9"),
    ("203.0.113.9", {"Forwarded": "for=1.2.3.4"}, "203.0.113.9"),
    # A trusted proxy: the address it saw.
    ("10.0.0.5", {"X-Forwarded-For": "198.51.100.7"}, "198.51.100.7"),
    ("10.0.0.5", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}, "198.51.100.7"),  # the forged left part ignored
    ("10.0.0.5", {"X-Forwarded-For": "198.51.100.7, 10.1.2.3"}, "198.51.100.7"),  # two trusted hops
    ("10.0.0.5", {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'}, "2001:db8::1"),
    ("10.0.0.5", {"Forwarded": "for=192.0.2.60;proto=http, for=10.1.0.9"}, "192.0.2.60"),
    ("10.0.0.5", {"X-Forwarded-For": "198.51.100.7:5555"}, "198.51.100.7"),
    # Unreadable hops end the walk at the last address believed.
    ("10.0.0.5", {"X-Forwarded-For": "unknown"}, "10.0.0.5"),
    ("10.0.0.5", {"X-Forwarded-For": "\x00<script>"}, "10.0.0.5"),
    ("10.0.0.5", {}, "10.0.0.5"),
    ("fd00::1", {"X-Forwarded-For": "198.51.100.7"}, "198.51.100.7"),
])
def test_client_ip(peer: str, headers: dict[str, str], expected: str) -> None:
    assert client_ip(peer, headers, TRUSTED) == expected


def test_no_trusted_proxies_means_the_peer() -> None:
    assert client_ip("10.0.0.5", {"X-Forwarded-For": "198.51.100.7"}, ()) == "10.0.0.5"


def test_config_key() -> None:
    config = load_config(env={}, overrides={"server": {"trusted_proxies": ["10.0.0.5", "10.1.0.0/16"]}})
    assert config.server.trusted_proxies == ("10.0.0.5", "10.1.0.0/16")
    assert load_config(env={"OPENCONSULT_SERVER__TRUSTED_PROXIES": "10.0.0.5,::1"}).server.trusted_proxies == (
        "10.0.0.5", "::1")
    with pytest.raises(ConfigError, match='server.trusted_proxies: "nope" is not an IP address or CIDR'):
        load_config(env={}, overrides={"server": {"trusted_proxies": ["nope"]}})
    with pytest.raises(ConfigError, match="server.client_reports_per_min must be 1-10000"):
        load_config(env={}, overrides={"server": {"client_reports_per_min": 0}})


@pytest.mark.parametrize(("trusted", "expected"), [("127.0.0.1", "198.51.100.7"), ("10.9.9.9", "127.0.0.1")])
async def test_the_hub_records_the_forwarded_ip_only_from_a_trusted_proxy(
        tmp_path: Path, trusted: str, expected: str) -> None:
    server = start_server(tmp_path, f'\n[server]\ntrusted_proxies = ["{trusted}"]\n')
    try:
        tokens = authority(server.data_dir)
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws_url, protocols=("openconsult.v1",),
                                       headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}) as ws:
                await ws.send_json({"type": "join", "id": 1, "token": tokens.mint("ip-room", Role.PATIENT, "Anna")})
                joined = await ws.receive_json(timeout=10)
                assert joined["ok"], joined
            support = tokens.mint("support", Role.SUPPORT, "Sue")
            async with http.get(f"{server.url}/api/sessions/{joined['data']['session_id']}/events",
                                headers={"Authorization": f"Bearer {support}"}) as response:
                events = (await response.json())["events"]
        connect = next(e for e in events if e["kind"] == "serverDetectedConnect")
        assert connect["payload"]["ip"] == expected
    finally:
        server.stop()
