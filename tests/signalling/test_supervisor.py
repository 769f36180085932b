"""The pure parts of ``serve --workers``: worker count, ports per worker, restart back-off, the
worker spec, config checks, and the host-wide /healthz and /metrics merges."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from signalling.cli import main
from signalling.config import Config, ConfigError, load_config
from signalling.supervisor import (
    MAX_WORKERS,
    RestartPolicy,
    Supervisor,
    WorkerSpec,
    available_cores,
    check_port_free,
    check_worker_config,
    describe_exit,
    parse_worker_count,
    worker_udp_ports,
)
from signalling.worker import host_health, merge_expositions, worker_row


def test_auto_is_the_cores_this_process_may_use() -> None:
    assert available_cores(cpu_count=8, affinity=2) == 2  # a CPU set narrower than the machine
    assert available_cores(cpu_count=4, affinity=None) == 4
    assert available_cores(cpu_count=None, affinity=None) == 1
    assert parse_worker_count("auto", 2) == 2
    assert parse_worker_count("AUTO", 1000) == MAX_WORKERS
    assert parse_worker_count("3", 2) == 3  # an explicit count may exceed the cores


@pytest.mark.parametrize("value, message", [
    ("0", "--workers must be 1-256 (or auto), got 0"),
    ("-1", "--workers must be 1-256 (or auto), got -1"),
    ("257", "--workers must be 1-256 (or auto), got 257"),
    ("two", '--workers must be "auto" or a number of workers, got "two"'),
    ("", '--workers must be "auto" or a number of workers, got ""'),
])
def test_a_bad_worker_count_is_refused_with_the_value(value: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_worker_count(value, 2)
    assert str(err.value) == message


def test_worker_i_gets_media_port_p_plus_i() -> None:
    assert worker_udp_ports(40000, 3) == (40000, 40001, 40002)
    assert worker_udp_ports(65534, 2) == (65534, 65535)
    assert worker_udp_ports(0, 3) == (0, 0, 0)  # ephemeral ports per peer connection stay so


def test_a_media_port_range_past_65535_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        worker_udp_ports(65535, 2)
    assert str(err.value).startswith("media.udp_port = 65535 with 2 workers needs ports 65535-65536, past 65535")


def test_workers_need_redis_url() -> None:
    with pytest.raises(ConfigError) as err:
        check_worker_config(Config(), 2)
    assert "redis_url is required with --workers" in str(err.value)
    config = replace(load_config(env={}, overrides={"media": {"udp_port": 42000}}), redis_url="redis://127.0.0.1:1/0")
    assert check_worker_config(config, 2) == (42000, 42001)


def test_serve_workers_without_redis_url_is_a_config_error(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("OPENCONSULT_REDIS_URL", raising=False)
    assert main(["serve", "--workers", "2", "--data-dir", str(tmp_path)]) == 2
    assert "config error: redis_url is required with --workers" in capsys.readouterr().err


def test_a_public_port_someone_listens_on_is_refused_before_any_worker_starts() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a worker of another host would
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(OSError) as err:
            check_port_free("127.0.0.1", port)
        assert str(err.value.strerror).startswith(f"cannot listen on 127.0.0.1:{port}: ")
    check_port_free("127.0.0.1", port)  # closed: free again


def test_restart_back_off_doubles_for_deaths_in_a_row_and_resets_after_a_stable_run() -> None:
    policy = RestartPolicy(min_delay_s=0.5, max_delay_s=30.0, stable_after_s=30.0)
    deaths, delays = 0, []
    for _ in range(9):  # dies at once, again and again
        deaths, delay = policy.after_exit(deaths, ran_s=0.2)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert deaths == 9
    assert policy.after_exit(9, ran_s=30.0) == (1, 0.5)  # it had run long enough: a fresh count
    assert policy.after_exit(9, ran_s=29.9) == (10, 30.0)


def test_a_workers_exit_is_told_in_words() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-200) == "killed by signal 200"


def test_the_worker_spec_round_trips_and_a_bad_one_is_refused() -> None:
    spec = WorkerSpec(index=1, udp_port=40001, control_ports=(50000, 50001), control_fd=5, supervisor_pid=42)
    assert WorkerSpec.from_arg(spec.to_arg()) == spec
    assert spec.count == 2
    for bad in ("", "[]", '{"index": 1}', spec.to_arg().replace('"index": 1', '"index": 2'),
                spec.to_arg().replace("50000", "70000")):
        with pytest.raises(ValueError, match="--worker-spec"):
            WorkerSpec.from_arg(bad)


def _answer(index: int, rooms: int = 1, connections: int = 2) -> dict[str, Any]:
    return {"status": "ok", "version": "9", "uptime_s": 3.0, "rooms": rooms, "connections": connections,
            "index": index, "pid": 100 + index, "node_id": f"node_{index}"}


def test_host_health_sums_the_workers_and_is_degraded_when_one_is_unreachable() -> None:
    answering = _answer(0)
    assert host_health(answering, [answering, _answer(1, 2, 3)]) == {
        "status": "ok", "version": "9", "uptime_s": 3.0, "rooms": 3, "connections": 5,
        "workers": [
            {"index": 0, "pid": 100, "node_id": "node_0", "status": "ok", "rooms": 1, "connections": 2},
            {"index": 1, "pid": 101, "node_id": "node_1", "status": "ok", "rooms": 2, "connections": 3},
        ]}
    degraded = host_health(answering, [answering, None])
    assert degraded["status"] == "degraded"
    assert (degraded["rooms"], degraded["connections"]) == (1, 2)
    assert degraded["workers"][1] == {"index": 1, "pid": None, "node_id": None, "status": "unreachable",
                                      "rooms": None, "connections": None}


def test_a_draining_worker_is_shown_and_makes_the_host_draining_unless_one_is_unreachable() -> None:
    answering = _answer(0)
    draining = {**_answer(1), "status": "draining"}
    body = host_health(answering, [answering, draining])
    assert body["status"] == "draining" and body["workers"][1]["status"] == "draining"
    assert body["rooms"] == 2
    assert host_health(answering, [None, draining])["status"] == "degraded"


@pytest.mark.parametrize("answer", [
    {**_answer(1), "index": 0},  # another worker answered on that port
    {**_answer(1), "pid": "101"},
    {**_answer(1), "rooms": -1},
    {**_answer(1), "connections": True},
    {k: v for k, v in _answer(1).items() if k != "node_id"},
])
def test_an_answer_that_is_not_a_workers_counts_as_unreachable(answer: dict[str, Any]) -> None:
    assert worker_row(1, answer)["status"] == "unreachable"


EXPOSITION = """\
# HELP openconsult_connections_active Signalling connections
# TYPE openconsult_connections_active gauge
openconsult_connections_active {n}
# HELP openconsult_connections_closed_total Connections that left
# TYPE openconsult_connections_closed_total counter
openconsult_connections_closed_total{{reason="clientDisconnected"}} {n}
"""


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_metrics_of_every_worker_in_one_exposition_with_a_worker_label() -> None:
    body = merge_expositions([EXPOSITION.format(n=1), EXPOSITION.format(n=2), None, "not { an exposition"])
    assert _samples(body) == {
        ("openconsult_worker_up", (("worker", "0"),)): 1.0,
        ("openconsult_worker_up", (("worker", "1"),)): 1.0,
        ("openconsult_worker_up", (("worker", "2"),)): 0.0,
        ("openconsult_worker_up", (("worker", "3"),)): 0.0,
        ("openconsult_connections_active", (("worker", "0"),)): 1.0,
        ("openconsult_connections_active", (("worker", "1"),)): 2.0,
        ("openconsult_connections_closed_total", (("reason", "clientDisconnected"), ("worker", "0"))): 1.0,
        ("openconsult_connections_closed_total", (("reason", "clientDisconnected"), ("worker", "1"))): 2.0,
    }
    text = body.decode()
    assert text.count("# TYPE openconsult_connections_closed_total counter") == 1  # one family, both workers


def _argv_by_index(scripts: dict[int, str]) -> Any:
    """Worker commands that are small Python programs (real processes, no server)."""
    def argv(spec: WorkerSpec) -> list[str]:
        return [sys.executable, "-c", scripts[spec.index]]
    return argv


def _run_until(supervisor: Supervisor, done: Any) -> int:
    """Run the supervisor in this (main) thread; a helper thread stops it once ``done()``."""
    finished = threading.Event()

    def stopper() -> None:
        deadline = time.monotonic() + 60
        while not done() and not finished.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        supervisor.stopping.set()

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    try:
        return supervisor.run()
    finally:
        finished.set()
        thread.join()


def test_a_worker_that_dies_at_once_is_restarted_with_growing_delays(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="openconsult.supervisor")
    policy = RestartPolicy(min_delay_s=0.1, max_delay_s=0.4, stable_after_s=30.0)
    supervisor = Supervisor(2, (0, 0), _argv_by_index({0: "import time; time.sleep(60)", 1: "raise SystemExit(1)"}),
                            policy=policy, poll_s=0.01)
    assert _run_until(supervisor, lambda: len(supervisor.slots[1].pids) >= 5) == 0
    stable, dying = supervisor.slots
    assert len(stable.pids) == 1  # the other worker is left alone
    assert len(set(dying.pids)) == len(dying.pids) >= 5
    restarts = [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]
    assert [m.split("restarting it in ")[1] for m in restarts[:4]] == [
        "0.1 s (death 1 in a row)", "0.2 s (death 2 in a row)", "0.4 s (death 3 in a row)", "0.4 s (death 4 in a row)"]
    assert all(m.startswith("worker 1 (pid ") and " exited with code 1 after " in m for m in restarts)
    assert "all workers stopped" in caplog.text
    assert stable.proc is not None and stable.proc.returncode == -signal.SIGTERM  # stopped, not left running


def test_a_worker_that_cannot_start_stops_the_others_and_the_supervisor_exits_2() -> None:
    supervisor = Supervisor(2, (0, 0), _argv_by_index({0: "import time; time.sleep(60)", 1: "raise SystemExit(2)"}),
                            poll_s=0.01)
    assert _run_until(supervisor, lambda: False) == 2  # returns by itself, long before the stopper
    assert supervisor.slots[0].proc is not None and supervisor.slots[0].proc.returncode == -signal.SIGTERM
    assert len(supervisor.slots[1].pids) == 1  # not restarted


def test_each_worker_is_handed_its_own_private_socket_and_every_port() -> None:
    script = ("import json, socket, sys; spec = json.loads(sys.argv[sys.argv.index('--worker-spec') + 1]); "
              "s = socket.socket(fileno=spec['control_fd']); "
              "assert s.getsockname()[1] == spec['control_ports'][spec['index']], (s.getsockname(), spec); "
              "raise SystemExit(0)")
    seen: list[WorkerSpec] = []

    def argv(spec: WorkerSpec) -> list[str]:
        seen.append(spec)
        return [sys.executable, "-c", script, "--worker-spec", spec.to_arg()]

    supervisor = Supervisor(3, (40000, 40001, 40002), argv, poll_s=0.01)
    # Exit 0 after checking: each is restarted (0.5 s), so wait for every first run to end.
    assert _run_until(supervisor, lambda: all(s.deaths >= 1 for s in supervisor.slots)) == 0
    first = seen[:3]
    assert [s.index for s in first] == [0, 1, 2]
    assert [s.udp_port for s in first] == [40000, 40001, 40002]
    assert len(set(first[0].control_ports)) == 3 and all(s.control_ports == first[0].control_ports for s in first)
    assert all(s.supervisor_pid == os.getpid() for s in first)
