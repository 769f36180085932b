"""A real ``openconsult serve`` subprocess for tests: free loopback port, its own
data dir and config file, ready when ``GET /healthz`` answers 200."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.helpers import free_port, wait_until_sync

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = '[media]\nice_addresses = ["127.0.0.1"]\n'


@dataclass
class ServerProcess:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    data_dir: Path
    config_path: Path
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    def log_text(self) -> str:
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig`` (SIGTERM: graceful; SIGKILL: crash), wait, kill if needed. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if not self._log_file.closed:
            self._log_file.close()
        return self.proc.returncode


def _healthy(server: ServerProcess) -> bool:
    if server.proc.poll() is not None:
        raise AssertionError(f"server exited with {server.proc.returncode}; log:\n{server.log_text()[-4000:]}")
    try:
        with urllib.request.urlopen(server.url + "/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_server(workdir: Path, extra_config: str = "", module: str = "signalling.cli",
                 env: dict[str, str] | None = None, data_dir: Path | None = None,
                 timeout: float = 60.0, port: int | None = None, args: tuple[str, ...] = ()) -> ServerProcess:
    """Start ``python -m <module> serve`` and wait for /healthz. ``extra_config`` is
    appended to a config whose only table is ``[media]`` (ICE on 127.0.0.1). ``port``
    (default: a free one) lets a restart come back where clients reconnect to; the
    previous process on it must have exited (``stop()`` waits for that). ``args``: more
    ``serve`` options (e.g. ``--drain``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or workdir / "data"
    config_path = workdir / "openconsult.toml"
    config_path.write_text(BASE_CONFIG + extra_config)
    log_path = workdir / f"server-{os.getpid()}-{len(list(workdir.glob('server-*.log')))}.log"
    log_file = log_path.open("wb")
    port = port or free_port()
    command = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir), "--config", str(config_path), *args]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(f"http://127.0.0.1:{port}", port, proc, data_dir, config_path, log_path, log_file)
    try:
        wait_until_sync(lambda: _healthy(server), timeout=timeout, interval=0.2, message="/healthz")
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server
