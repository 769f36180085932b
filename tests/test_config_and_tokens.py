"""Config loading (file, environment, validation naming the key), the token CLI,
and JWT verification with HS256 and RS256."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from media.router import announce_ip
from rooms.model import Role
from signalling.auth import TokenAuthority, load_or_create_secret
from signalling.config import Config, ConfigError, load_config
from signalling.errors import RoomMismatch, TokenExpired, TokenNotYetValid, Unauthorized

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_file_env_and_overrides_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 9000\nhost = "0.0.0.0"\n[media]\nice_addresses = ["10.0.0.5"]\n')
    config = load_config(path, env={"OPENCONSULT_SERVER__PORT": "9100"}, overrides={"server": {"host": "::1"}})
    assert (config.server.port, config.server.host, config.media.ice_addresses) == (9100, "::1", ("10.0.0.5",))
    assert load_config(None, env={}) == Config()


SAMPLE = ROOT / "deploy" / "openconsult.sample.toml"
COMMENTED_KEY = re.compile(r"^#\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")
TABLE = re.compile(r"^\[([A-Za-z_][A-Za-z0-9_]*)\]")


def test_the_sample_config_shows_the_defaults() -> None:
    assert load_config(SAMPLE, env={}) == Config()


def test_the_sample_config_still_loads_with_every_commented_out_key_uncommented(tmp_path: Path) -> None:
    lines: list[str] = []
    uncommented: list[tuple[str, str]] = []  # (table or "", key)
    table = ""
    for line in SAMPLE.read_text().splitlines():
        if header := TABLE.match(line):
            table = header.group(1)
        if commented := COMMENTED_KEY.match(line):
            line = line.lstrip("#").lstrip()
            uncommented.append((table, commented.group(1)))
        lines.append(line)
    assert uncommented, "the sample has no commented-out keys to check"
    config = load_config(write(tmp_path, "\n".join(lines) + "\n"), env={})
    for table, key in uncommented:
        # Each example lands where the loader reads it, with a value other than the default.
        value, default = (getattr(getattr(x, table), key) if table else getattr(x, key) for x in (config, Config()))
        assert value != default, f"{table or '(top level)'}.{key} in the sample does not change anything"
    assert config.redis_url.startswith("redis://")


@pytest.mark.parametrize("text, env, message", [
    ("[server]\nprot = 1\n", {}, 'unknown config key "server.prot"'),
    ("[server]\nport = \"eighty\"\n", {}, "server.port must be an integer"),
    ("[server]\nport = 70000\n", {}, "server.port must be 1-65535"),
    ("[media]\nice_addresses = [\"not-an-ip\"]\n", {}, '"not-an-ip" is not an IP address'),
    ("[auth]\nalgorithm = \"HS512\"\n", {}, "auth.algorithm must be"),
    ("[auth]\nalgorithm = \"RS256\"\n", {}, "auth.public_key_file is required"),
    ("[auth]\nsecret = \"short\"\n", {}, "at least 32 characters"),
    ("", {"OPENCONSULT_DEMO__ENABLED": "maybe"}, "demo.enabled must be true or false"),
    ("", {"OPENCONSULT_NOPE": "1"}, 'unknown config key "nope"'),
    ("redis_url = \"http://x\"\n", {}, "redis_url must start with"),
    ("[server\n", {}, "is not valid TOML"),
    ("[media]\nturn_urls = [\"http://x\"]\n", {}, 'media.turn_urls: "http://x" must start with turn:'),
    ("[media]\nturn_urls = [\"turn:x:3478\"]\n", {}, "media.turn_secret (at least 16 characters) is required"),
    ("[media]\nturn_credential_ttl_s = 5\n", {}, "media.turn_credential_ttl_s must be 60-604800"),
    ("[media]\nconnect_timeout_s = 0\n", {}, "media.connect_timeout_s must be > 0 and <= 600, got 0.0"),
    ("", {"OPENCONSULT_MEDIA__MAX_PEER_CONNECTIONS": "0"}, "media.max_peer_connections must be 1-100000, got 0"),
    ("", {"OPENCONSULT_MEDIA__UDP_PORT": "70000"}, "media.udp_port must be 0 (one port per peer connection) or "
     "1-65535, got 70000"),
    ("[server]\njoin_timeout_s = 0.5\n", {}, "server.join_timeout_s must be 1-600 seconds, got 0.5"),
    ("[media]\nudp_rcvbuf_bytes = 1000\n", {}, "media.udp_rcvbuf_bytes must be 65536-268435456 (64 KiB-256 MiB), got 1000"),
    ("", {"OPENCONSULT_MEDIA__UDP_RCVBUF_BYTES": "4 MiB"}, "media.udp_rcvbuf_bytes must be an integer"),
    ("", {"OPENCONSULT_SERVER__MAX_CONNECTIONS": "0"}, "server.max_connections must be 1-1000000, got 0"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env=env)
    assert message in str(error.value)


def test_serve_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "signalling.cli", "serve", "--config",
                             str(write(tmp_path, "[server]\nport = 0\n"))], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "config error: server.port must be 1-65535" in result.stderr


def test_serve_says_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "signalling.cli", "serve", "--port", str(port), "--data-dir",
                                 str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_token_cli_signs_with_the_generated_secret(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "signalling.cli", "token", "--room", "clinic-1", "--role",
                             "patient", "--name", "Anna", "--not-before", "2030-01-01T09:00:00Z", "--expires",
                             "2030-01-01T10:00:00Z", "--data-dir", str(data)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    secret = load_or_create_secret(data, create=False)
    assert (data / "jwt-secret").stat().st_mode & 0o777 == 0o600
    authority = TokenAuthority("HS256", secret, secret, leeway_s=30)
    claims = authority.verify(result.stdout.strip(), now=1893488400 + 60)  # 2030-01-01T09:01Z
    assert (claims.room, claims.role, claims.name) == ("clinic-1", Role.PATIENT, "Anna")
    with pytest.raises(TokenNotYetValid):
        authority.verify(result.stdout.strip())


def test_token_cli_staff_departments(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "signalling.cli", "token", "--room", "staff", "--role",
                             "clinician", "--name", "Dr Berg", "--department", "cardiology", "--department",
                             "gp", "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    secret = load_or_create_secret(data, create=False)
    claims = TokenAuthority("HS256", secret, secret, leeway_s=30).verify(result.stdout.strip())
    assert claims.departments == ("cardiology", "gp")


def test_token_window_leeway_and_room() -> None:
    authority = TokenAuthority("HS256", "s" * 40, "s" * 40, leeway_s=30)
    now = int(time.time())
    token = authority.mint("r1", Role.CLINICIAN, "Dr Berg", not_before=now, expires=now + 60)
    assert authority.verify(token, now=now - 29).name == "Dr Berg"  # inside the leeway
    with pytest.raises(TokenNotYetValid, match="too early"):
        authority.verify(token, now=now - 31)
    assert authority.verify(token, now=now + 89).room == "r1"
    with pytest.raises(TokenExpired, match="too late"):
        authority.verify(token, now=now + 91)
    with pytest.raises(RoomMismatch, match='token is for room "r1", not "r2"'):
        authority.verify(token, room="r2")
    other = TokenAuthority("HS256", "t" * 40, "t" * 40, leeway_s=30)
    with pytest.raises(Unauthorized, match="signature is invalid"):
        other.verify(token)


def test_rs256_tokens(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "key.pem"
    public = tmp_path / "key.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    config = load_config(write(tmp_path, f'[auth]\nalgorithm = "RS256"\npublic_key_file = "{public}"\n'
                                         f'private_key_file = "{private}"\n'), env={})
    authority = TokenAuthority.from_config(config)
    assert authority.verify(authority.mint("r1", Role.SUPPORT, "S")).role == Role.SUPPORT
    # An HS256 token signed with anything is refused by an RS256 server.
    hs = TokenAuthority("HS256", "s" * 40, "s" * 40, 30).mint("r1", Role.PATIENT, "X")
    with pytest.raises(Unauthorized, match='algorithm "HS256" is not the configured RS256'):
        authority.verify(hs)


def test_announced_ip_rewrites_host_candidates_only() -> None:
    sdp = ("a=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host\r\n"
           "a=candidate:2 1 udp 1694498815 203.0.113.9 40000 typ srflx raddr 10.0.0.5 rport 40000\r\n")
    out = announce_ip(sdp, "198.51.100.7")
    assert "198.51.100.7 40000 typ host" in out and "203.0.113.9 40000 typ srflx" in out
    assert "10.0.0.5 40000 typ host" not in out
