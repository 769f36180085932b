"""A real ``redis-server`` for tests: started on a free port in a temp dir, stopped afterwards.

Use :func:`redis_server` (a context manager yielding a :class:`RedisServer`) from any test folder,
or the session fixture :func:`redis_srv` (``from tests.redis_server import redis_srv`` in a
conftest.py makes it available there), or :func:`require_redis_server` to get the binary.
If ``redis-server`` is missing, tests skip with a clear reason — except with ``CI=true``, where
they fail: in CI a Redis test that cannot run must not pass silently.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.helpers import free_port


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def require_redis_server() -> str:
    """The path of ``redis-server``; fails in CI, skips elsewhere, when it is not installed."""
    path = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if path is None:
        message = "redis-server is not installed (apt install redis-server, or set REDIS_SERVER)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return path


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(timeout: float = 10.0) -> Iterator[RedisServer]:
    """Start ``redis-server`` (no persistence, loopback only), wait for PING, stop it on exit."""
    binary = require_redis_server()
    with tempfile.TemporaryDirectory(prefix="oc-redis-") as tmp:
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--save", "", "--appendonly", "no",
             "--bind", "127.0.0.1", "--dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + timeout
            while not _ping("127.0.0.1", port):
                if process.poll() is not None:
                    err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                    raise RuntimeError(f"redis-server exited with {process.returncode}: {err}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING on port {port}")
                time.sleep(0.02)
            yield RedisServer("127.0.0.1", port, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr:
                process.stderr.close()


@pytest.fixture(scope="session")
def redis_srv() -> Iterator[RedisServer]:
    """A real redis-server shared by the test session; tests isolate themselves by key namespace."""
    with redis_server() as server:
        yield server
