"""media.udp_rcvbuf_bytes reaches the media sockets of a real `openconsult serve`: its
publish's UDP sockets are read back with getsockopt (the descriptors taken from the
server process with pidfd_getfd), and the start-up log says the size granted, or, when
the kernel caps it below the config, the sysctl that raises the cap."""

from __future__ import annotations

import ctypes
import os
import socket
import uuid
from pathlib import Path

import pytest

from media import aiortc_internals
from rooms.model import Role
from signalling.config import MAX_RCVBUF
from tests.call_helpers import Participant, authority
from tests.server import start_server

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (added in 5.6)
#: Below any kernel's default cap (net.core.rmem_default is 208-212 KiB) and unlike aioice's own
#: 256 KiB request, so only our setting can produce it.
REQUESTED = 96 * 1024


def rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


def udp_receive_buffers(pid: int) -> list[int]:
    """SO_RCVBUF of every UDP socket of process ``pid`` (as getsockopt reports it)."""
    inodes = set()
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            inodes.add(line.split()[9])
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    sizes = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if not (target.startswith("socket:[") and target[8:-1] in inodes):
                continue
            local = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            assert local >= 0, f"pidfd_getfd: {os.strerror(ctypes.get_errno())}"
            with socket.socket(fileno=local) as sock:
                sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    finally:
        os.close(pidfd)
    return sizes


@pytest.fixture(autouse=True)
def loopback_ice() -> None:
    aiortc_internals.configure_ice_addresses(("127.0.0.1",))


def test_the_kernel_grants_what_it_allows() -> None:
    assert aiortc_internals.effective_receive_buffer(REQUESTED) == REQUESTED
    assert aiortc_internals.effective_receive_buffer(rmem_max() * 2) == rmem_max()


async def test_media_sockets_get_the_configured_receive_buffer(tmp_path: Path) -> None:
    server = start_server(tmp_path, f"udp_rcvbuf_bytes = {REQUESTED}\n")
    alice = Participant(server.ws_url, "Alice")
    try:
        await alice.join(authority(server.data_dir), f"room-{uuid.uuid4().hex[:8]}", Role.CLINICIAN)
        await alice.publish()
        sizes = udp_receive_buffers(server.proc.pid)
        # Linux reports twice what it grants (its bookkeeping share).
        assert sizes and set(sizes) == {2 * REQUESTED}, sizes
        assert f"media sockets receive buffer: {REQUESTED} bytes" in server.log_text()
    finally:
        await alice.close()
        server.stop()


def test_a_request_over_the_kernel_cap_is_reported_with_the_fix(tmp_path: Path) -> None:
    if rmem_max() * 2 > MAX_RCVBUF:
        pytest.skip(f"net.core.rmem_max is {rmem_max()}: no valid media.udp_rcvbuf_bytes exceeds it")
    requested = rmem_max() * 2
    server = start_server(tmp_path, f"udp_rcvbuf_bytes = {requested}\n")
    try:
        log = server.log_text()
        assert f"media sockets receive buffer: {rmem_max()} bytes, not the {requested}" in log, server.log_tail()
        assert f"sysctl -w net.core.rmem_max={requested}" in log
    finally:
        server.stop()
