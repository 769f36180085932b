"""A real coturn ``turnserver`` for tests: loopback only, a free port, TURN REST
API credentials (shared secret), loopback peers allowed. Missing coturn fails
under CI=true and skips elsewhere."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_until_sync

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"


@dataclass
class TurnServer:
    port: int
    secret: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    relay_ports: range

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"


def require_turnserver() -> None:
    if os.path.isfile(TURNSERVER) and os.access(TURNSERVER, os.X_OK):
        return
    message = "the TURN test needs coturn's turnserver (Debian package coturn; deploy/test.sh installs it)"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _listening(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"turnserver exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def turn_server(workdir: Path, secret: str = "turn-test-secret-0123456789",
                allow_loopback_peers: bool = True) -> Iterator[TurnServer]:
    """``allow_loopback_peers=False``: coturn's default, it refuses to relay to 127.0.0.0/8, so
    a relay-only client cannot reach a server on loopback (no candidate pair works)."""
    require_turnserver()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    relay_min = 20000 + (port % 400) * 100  # a private slice of relay ports per run
    log_path = workdir / "turnserver.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([
        TURNSERVER, "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
        f"--min-port={relay_min}", f"--max-port={relay_min + 99}", "--use-auth-secret",
        f"--static-auth-secret={secret}", "--realm=openconsult.test", *(["--allow-loopback-peers"] if allow_loopback_peers else []), "--no-cli",
        "--no-tls", "--no-dtls", "--no-multicast-peers", f"--userdb={workdir / 'turndb'}",
        f"--pidfile={workdir / 'turnserver.pid'}", "--log-file=stdout", "--simple-log",
    ], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_sync(lambda: _listening(port, proc, log_path), timeout=30, message="turnserver to listen")
        yield TurnServer(port, secret, proc, log_path, range(relay_min, relay_min + 100))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
