"""A real PostgreSQL for tests: initdb in a temp dir, started on a free port, stopped afterwards.

The Debian ``postgresql`` package provides the binaries (``/usr/lib/postgresql/<version>/bin``,
or set ``PG_BIN``); deploy/test.sh installs it. PostgreSQL refuses to run as root, so when the
tests run as root the server runs as the ``postgres`` user (``runuser``). It listens on
127.0.0.1 only, with trust authentication, and never touches a PostgreSQL already running on
the machine. A missing PostgreSQL fails the test (it never skips): the event-log contract must
be checked on both backends.

Use the session fixture :func:`pg_srv` (``from tests.postgres_server import pg_srv``), and
:meth:`PostgresServer.new_database` for a fresh, empty database per test.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest

from tests.helpers import free_port

SUPERUSER = "postgres"


def require_pg_bin() -> str:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``; fails the test if missing."""
    candidates = [os.environ["PG_BIN"]] if os.environ.get("PG_BIN") else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for path in candidates:
        if os.path.exists(os.path.join(path, "initdb")):
            return path
    pytest.fail("PostgreSQL is not installed (apt install postgresql, or set PG_BIN)", pytrace=False)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    data_dir: str
    bin_dir: str
    options: str  # the server's command-line options (port, socket dir, loopback only)
    log_file: str

    def ctl(self, action: str, *args: str, timeout: float = 60.0) -> None:
        """``pg_ctl start|stop|restart`` on this server (start keeps the port and options)."""
        extra = ["-o", self.options, "-l", self.log_file] if action in ("start", "restart") else []
        subprocess.run(_as_postgres([os.path.join(self.bin_dir, "pg_ctl"), "-D", self.data_dir, *extra, "-w", "-t",
                                     str(int(timeout)), *args, action]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=os.path.dirname(self.data_dir))

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return self.url(name)


def _as_postgres(args: list[str]) -> list[str]:
    """``args`` run as the postgres user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() == 0:
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", "postgres", "--", *args]
    return args


@contextmanager
def postgres_server(timeout: float = 60.0) -> Iterator[PostgresServer]:
    """initdb, start on a free loopback port, wait until it accepts connections, stop on exit."""
    bin_dir = require_pg_bin()
    with tempfile.TemporaryDirectory(prefix="oc-pg-") as tmp:
        data = os.path.join(tmp, "data")
        os.mkdir(data)
        if os.geteuid() == 0:
            shutil.chown(tmp, "postgres")
            shutil.chown(data, "postgres")
        subprocess.run(_as_postgres([os.path.join(bin_dir, "initdb"), "-D", data, "-U", SUPERUSER,
                                     "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp)
        port = free_port()
        options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        server = PostgresServer("127.0.0.1", port, data, bin_dir, options, os.path.join(tmp, "server.log"))
        server.ctl("start", timeout=timeout)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    psycopg.connect(server.url(), connect_timeout=2).close()
                    break
                except psycopg.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield server
        finally:
            subprocess.run(_as_postgres([os.path.join(bin_dir, "pg_ctl"), "-D", data, "-m", "immediate", "-w",
                                         "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)


@pytest.fixture(scope="session")
def pg_srv() -> Iterator[PostgresServer]:
    """A real PostgreSQL shared by the test session; tests isolate themselves by database."""
    with postgres_server() as server:
        yield server
