"""``openconsult serve --workers N|auto``: one supervisor process and N worker processes on one
host, each worker a node of the same Redis cluster.

The supervisor decides nothing about calls. It checks the config for worker mode, opens one
private loopback listening socket per worker index (kept for its whole life, so a restarted
worker gets the same sibling-facing port), starts the workers, restarts one that dies with the
same index (same media port, same private port) after a back-off, and on SIGTERM/SIGINT stops
them all (each closes its WebSockets with 1001) and exits 0. Each worker binds the public port
itself with SO_REUSEPORT, so the kernel spreads new connections over the live workers.

The decisions are pure functions here (worker count, ports per worker, restart back-off, how a
worker's exit is told); :class:`Supervisor` is the thin process loop around them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from signalling.config import Config, ConfigError

logger = logging.getLogger("openconsult.supervisor")

#: More workers than this on one host is a typo (the SFU is one event loop per core).
MAX_WORKERS: Final = 256
#: A worker that exits with this code cannot start as configured (the CLI's config/usage
#: error: a taken port, a bad key file): restarting would fail the same way, so the supervisor
#: stops the others and exits with it.
EXIT_CANNOT_START: Final = 2
#: Seconds the workers get to close their calls on SIGTERM before they are killed.
STOP_TIMEOUT_S: Final = 20.0


def available_cores(cpu_count: int | None, affinity: int | None) -> int:
    """The cores this process may run on: the affinity mask's size when known, else the CPU count."""
    return max(1, affinity or cpu_count or 1)


def parse_worker_count(value: str, cores: int) -> int:
    """``--workers`` value: ``auto`` (one per core this process may use) or 1..MAX_WORKERS."""
    if value.strip().lower() == "auto":
        return min(cores, MAX_WORKERS)
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f'--workers must be "auto" or a number of workers, got "{value}"') from None
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"--workers must be 1-{MAX_WORKERS} (or auto), got {count}")
    return count


def worker_udp_ports(udp_port: int, count: int) -> tuple[int, ...]:
    """Each worker's ``media.udp_port``: worker i gets ``udp_port + i``; 0 (one ephemeral port
    per peer connection) stays 0 for every worker. The whole range must be valid (the error
    names the key)."""
    if udp_port == 0:
        return (0,) * count
    last = udp_port + count - 1
    if last > 65535:
        raise ConfigError(f"media.udp_port = {udp_port} with {count} workers needs ports {udp_port}-{last}, "
                          "past 65535 (worker i uses media.udp_port + i): pick a lower port")
    return tuple(udp_port + i for i in range(count))


def check_worker_config(config: Config, count: int) -> tuple[int, ...]:
    """What worker mode needs from the config; returns each worker's media UDP port."""
    if not config.redis_url:
        raise ConfigError("redis_url is required with --workers (the workers are nodes of one cluster; "
                          "set redis_url in the config or OPENCONSULT_REDIS_URL)")
    return worker_udp_ports(config.media.udp_port, count)


def check_port_free(host: str, port: int) -> None:
    """Fail when something already listens on the public port. Workers bind it with
    SO_REUSEPORT, which would let them join another process of this user on it (a second
    supervisor) without an error; a bind without it is refused whenever anyone listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT left over is no listener
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}. Pick another port with --port") \
                from None


@dataclass(frozen=True)
class RestartPolicy:
    """Back-off for restarting a dead worker: the first restart after ``min_delay_s``, doubling
    with each death in a row up to ``max_delay_s``; a worker that ran ``stable_after_s`` or
    longer before dying starts the count afresh."""

    min_delay_s: float = 0.5
    max_delay_s: float = 30.0
    stable_after_s: float = 30.0

    def after_exit(self, deaths_in_a_row: int, ran_s: float) -> tuple[int, float]:
        """(deaths in a row including this one, seconds to wait before the restart)."""
        deaths = 1 if ran_s >= self.stable_after_s else deaths_in_a_row + 1
        return deaths, min(self.max_delay_s, self.min_delay_s * 2.0 ** (deaths - 1))


def describe_exit(returncode: int) -> str:
    """A worker's exit in words, for the log: ``killed by SIGKILL`` or ``exited with code 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told by its supervisor (one hidden ``--worker-spec`` JSON argument)."""

    index: int
    #: The media UDP port this worker binds (0: ephemeral ports per peer connection).
    udp_port: int
    #: Every worker's private loopback port, by index (this worker's included).
    control_ports: tuple[int, ...]
    #: The inherited file descriptor of this worker's private listening socket.
    control_fd: int
    #: The supervisor's pid: when the parent is no longer it, the worker exits.
    supervisor_pid: int

    @property
    def count(self) -> int:
        return len(self.control_ports)

    def to_arg(self) -> str:
        return json.dumps({"index": self.index, "udp_port": self.udp_port, "control_ports": list(self.control_ports),
                           "control_fd": self.control_fd, "supervisor_pid": self.supervisor_pid})

    @classmethod
    def from_arg(cls, text: str) -> WorkerSpec:
        """Parse and check ``--worker-spec`` (it comes from the supervisor, still checked)."""
        try:
            data = json.loads(text)
            spec = cls(index=int(data["index"]), udp_port=int(data["udp_port"]),
                       control_ports=tuple(int(p) for p in data["control_ports"]), control_fd=int(data["control_fd"]),
                       supervisor_pid=int(data["supervisor_pid"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--worker-spec is not a worker spec: {exc}") from None
        if not 0 <= spec.index < spec.count <= MAX_WORKERS or not all(0 < p < 65536 for p in spec.control_ports):
            raise ValueError(f"--worker-spec is inconsistent: {text}")
        return spec


@dataclass
class _Slot:
    """One worker index: its current process and its restart state."""

    index: int
    udp_port: int
    control: socket.socket
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    deaths: int = 0
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Starts, watches and stops the workers (``worker_argv(spec)`` is one worker's command)."""

    def __init__(self, count: int, udp_ports: Sequence[int], worker_argv: Any,
                 policy: RestartPolicy = RestartPolicy(), poll_s: float = 0.2) -> None:
        self.policy = policy
        self.poll_s = poll_s
        self.worker_argv = worker_argv
        self.stopping = threading.Event()
        self.slots: list[_Slot] = []
        for index in range(count):
            control = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            control.bind(("127.0.0.1", 0))
            control.listen(64)
            control.set_inheritable(True)
            self.slots.append(_Slot(index, udp_ports[index], control))
        self.control_ports = tuple(int(s.control.getsockname()[1]) for s in self.slots)

    def _spec(self, slot: _Slot) -> WorkerSpec:
        return WorkerSpec(slot.index, slot.udp_port, self.control_ports, slot.control.fileno(), os.getpid())

    def _start(self, slot: _Slot) -> None:
        argv = self.worker_argv(self._spec(slot))
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which stops the
        # workers in order.
        slot.proc = subprocess.Popen(argv, pass_fds=(slot.control.fileno(),), process_group=0)
        slot.started_at, slot.restart_at = time.monotonic(), None
        slot.pids.append(slot.proc.pid)
        logger.info("worker %d started (pid %d, media.udp_port %s, private port %d)", slot.index, slot.proc.pid,
                    slot.udp_port or "ephemeral", self.control_ports[slot.index])

    def _on_signal(self, signum: int, _frame: object) -> None:
        logger.info("%s: stopping the workers", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (returns 0) or a worker that cannot start (returns 2)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        code = 0
        try:
            for slot in self.slots:
                self._start(slot)
            while not self.stopping.is_set():
                fatal = self._watch(time.monotonic())
                if fatal is not None:
                    code = fatal
                    break
                self.stopping.wait(self.poll_s)
        finally:
            self._stop_all()
            for slot in self.slots:
                slot.control.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _watch(self, now: float) -> int | None:
        """Reap dead workers, schedule and run restarts; an exit code when the host must stop."""
        for slot in self.slots:
            if slot.proc is not None and (returncode := slot.proc.poll()) is not None:
                ran = now - slot.started_at
                if returncode == EXIT_CANNOT_START:
                    logger.error("worker %d (pid %d) %s: it cannot start as configured (see its message above); "
                                 "stopping", slot.index, slot.proc.pid, describe_exit(returncode))
                    slot.proc = None
                    return EXIT_CANNOT_START
                slot.deaths, delay = self.policy.after_exit(slot.deaths, ran)
                logger.warning("worker %d (pid %d) %s after %.1f s; restarting it in %.1f s (death %d in a row)",
                               slot.index, slot.proc.pid, describe_exit(returncode), ran, delay, slot.deaths)
                slot.proc, slot.restart_at = None, now + delay
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)
        return None

    def _stop_all(self) -> None:
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not stop within %.0f s; killing it", proc.pid, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
        logger.info("all workers stopped")


def supervise(count: int, config: Config, worker_argv: Any) -> int:
    """The ``--workers`` entry point (after the config has been loaded and checked)."""
    udp_ports = check_worker_config(config, count)
    return Supervisor(count, udp_ports, worker_argv).run()


def worker_command(serve_args: Sequence[str]) -> Any:
    """One worker's argv: this interpreter running ``openconsult serve`` with the supervisor's
    own options (``--workers`` left out) and the worker's spec."""

    def argv(spec: WorkerSpec) -> list[str]:
        return [sys.executable, "-m", "signalling.cli", "serve", *serve_args, "--worker-spec", spec.to_arg()]

    return argv
