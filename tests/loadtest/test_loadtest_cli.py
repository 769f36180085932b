"""``openconsult loadtest`` end to end: the CLI as a subprocess against a real ``openconsult
serve`` subprocess. A short workflow script (2 consultations, 4 participants, 10 s) runs book ->
enter -> admit -> call -> end -> complete with chat; thresholds set the exit code; a malformed
script, an unreachable server and Ctrl-C each end the way docs/loadtest.md says."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.runner import scrape_metrics
from tests.helpers import free_port, wait_until_sync
from tests.server import REPO_ROOT, ServerProcess, start_server

SHORT = """\
name: short
duration_s: 10
defaults:
  publish: {width: 320, height: 240, fps: 15, bitrate_kbps: 300}
  subscribe: all
groups:
  - name: c
    rooms: 2
    start: {uniform: [0, 1]}
    workflow:
      department: gp
      waiting_room: wr-short
      steps:
        - {do: book}
        - {do: enter}
        - {do: admit, after_s: 0.5}
        - {do: end, after_s: 6}
        - {do: complete}
    participants:
      - role: patient
        chat: {count: 3, interval_s: 1, size: 30}
      - role: clinician
        chat: {count: 2, interval_s: 1.5, size: 50}
thresholds:
  max_loss_pct: 2
  min_chat_delivered_pct: 100
  min_workflow_completed_pct: 100
"""


@pytest.fixture(scope="module")
def media_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pre-encoded media cache for the module's runs (encoding is the slow part)."""
    return tmp_path_factory.mktemp("media-cache")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path / "server")
    yield srv
    srv.stop()


def loadtest(*args: str) -> list[str]:
    return [sys.executable, "-m", "signalling.cli", "loadtest", *args]


def run_cli(server: ServerProcess, script: Path, out: Path, cache: Path, *extra: str,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(loadtest(str(script), "--url", server.url, "--data-dir", str(server.data_dir),
                                   "--out", str(out), "--cache-dir", str(cache), *extra),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def metrics(server: ServerProcess) -> dict[str, float]:
    import asyncio

    import aiohttp

    async def scrape() -> dict[str, float]:
        async with aiohttp.ClientSession() as http:
            return await scrape_metrics(http, server.url)

    return asyncio.run(scrape())


@pytest.mark.slow
def test_short_workflow_script_against_a_live_server(server: ServerProcess, tmp_path: Path,
                                                     media_cache: Path) -> None:
    script = tmp_path / "short.yaml"
    script.write_text(SHORT)
    before = metrics(server)
    # Two generator processes: one room each, chat and stats gathered across them.
    done = run_cli(server, script, tmp_path / "out", media_cache, "--processes", "2")
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    report: dict[str, Any] = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["partial"] and report["errors"] == []
    assert report["joins"] == {"ok": 4, "failed": 0, "failed_by_code": {}}

    # Media: every participant received audio and video from the other; counts agree within 2 %.
    recv = [t for t in report["tracks"]["list"] if t["direction"] == "recv"]
    assert sorted((t["role"], t["kind"]) for t in recv) == sorted(
        [("clinician", "audio"), ("clinician", "video"), ("patient", "audio"), ("patient", "video")] * 2)
    assert all(t["packets"] > 0 for t in recv)
    expected, received = report["tracks"]["packets_expected"], report["tracks"]["packets"]
    assert expected > 0 and abs(expected - received) <= 0.02 * expected, (expected, received)
    assert report["first_frame_ms"]["count"] == 4

    # Chat: 2 rooms x (3 + 2) messages, each to the one other participant, all delivered.
    chat = report["chat"]
    assert (chat["sent"], chat["expected_deliveries"], chat["delivered"]) == (10, 10, 10)
    assert chat["latency_ms"]["count"] == 10 and chat["latency_ms"]["p95"] is not None

    # Workflow: every consultation went through every step, with each step's latency.
    workflow = report["workflow"]
    assert (workflow["consultations"], workflow["completed"], workflow["failed_by_step"]) == (2, 2, {})
    for r in workflow["list"]:
        assert r["completed"] == ["book", "enter", "admit", "end", "complete"]
    for step in ("book_ms", "enter_ms", "admit_ms", "enter_to_admitted_ms", "call_setup_ms", "end_ms",
                 "complete_ms"):
        assert workflow["steps"][step]["count"] == 2, step
    # The scripted half-second between entering and the admit is in the patient's wait.
    assert workflow["steps"]["enter_to_admitted_ms"]["p50"] >= 500

    # The server's counters moved by what the script implies: 4 media connections and 2 staff
    # desks left cleanly, 4 streams ended with them.
    after = metrics(server)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved('openconsult_connections_closed_total{reason="clientDisconnected"}') == 6
    assert moved('openconsult_streams_destroyed_total{reason="clientDisconnected"}') == 4
    assert report["server"]["counters_delta"]['openconsult_connections_closed_total{reason="clientDisconnected"}'] == 6
    # Forwarded packets: the server folds them in every media.sample_interval_s (2 s) and a
    # subscription's last partial interval is not folded when it closes, so at most ~2 s per
    # track may be missing; never more than the clients received.
    forwarded = sum(after.get(f'openconsult_rtp_packets_forwarded_total{{kind="{k}"}}', 0.0)
                    - before.get(f'openconsult_rtp_packets_forwarded_total{{kind="{k}"}}', 0.0)
                    for k in ("audio", "video"))
    per_second = received / sum(r["steps"]["call_s"] for r in workflow["list"]) / 2
    assert received - 2.5 * per_second * 2 <= forwarded <= received * 1.02, (forwarded, received)
    # The server's CPU and RSS over time, and how busy the generator was.
    assert report["server"]["rss_mb"]["count"] >= 5 and report["server"]["rss_mb"]["max"] > 10
    assert report["server"]["cpu_pct"]["count"] >= 5
    assert [w["index"] for w in report["generator"]["workers"]] == [0, 1]
    assert all(w["cpu_s"] > 0 and not w["failed"] for w in report["generator"]["workers"])
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000
    assert "chat delivered" in done.stdout and "consultations completed" in done.stdout

    # compare puts two runs side by side.
    shown = subprocess.run(loadtest("compare", str(tmp_path / "out" / "report.json"),
                                    str(tmp_path / "out" / "report.json")),
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.count("10 / 10") == 2, shown.stdout + shown.stderr


@pytest.mark.slow
def test_threshold_violation_sets_exit_code_and_is_named(server: ServerProcess, tmp_path: Path,
                                                         media_cache: Path) -> None:
    script = tmp_path / "strict.yaml"
    script.write_text("name: strict\nduration_s: 1\ngroups:\n  - participants:\n      - role: patient\n"
                      "        publish: false\nthresholds:\n  p95_join_ms: 0\n  max_failed_joins: 0\n")
    done = run_cli(server, script, tmp_path / "out", media_cache, "--no-png")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED threshold p95_join_ms: limit 0" in done.stdout
    assert "FAILED threshold max_failed_joins" not in done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(t["name"], t["ok"]) for t in report["thresholds"]] == [("p95_join_ms", False), ("max_failed_joins", True)]


def test_malformed_script_names_file_line_and_field(tmp_path: Path) -> None:
    script = tmp_path / "bad.yaml"
    script.write_text("name: bad\nduration_s: 10\ngroups:\n  - participants:\n      - role: patient\n"
                      "        publish: {fps: fast}\n")
    done = subprocess.run(loadtest(str(script), "--url", "http://127.0.0.1:9"), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{script}:6: groups[0].participants[0].publish.fps: 'fast' is not of type 'integer'" in done.stderr


def test_unreachable_server_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    secret = tmp_path / "jwt-secret"
    secret.write_text("s" * 48)
    script = Path(REPO_ROOT / "loadtest" / "scripts" / "one-to-one.yaml")
    # Nothing listens on one port; the other accepts connections but never answers.
    refused = f"http://127.0.0.1:{free_port()}"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mute = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for url in (refused, mute):
            started = time.monotonic()
            done = subprocess.run(loadtest(str(script), "--url", url, "--secret", str(secret),
                                           "--out", str(tmp_path / "out")),
                                  cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
            took = time.monotonic() - started
            assert done.returncode == 2, done.stdout + done.stderr
            assert f"cannot reach the server at {url}" in done.stderr
            assert took < 5, f"{url}: failed after {took:.1f} s"


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_writes_the_partial_report(server: ServerProcess, tmp_path: Path,
                                                            media_cache: Path) -> None:
    script = tmp_path / "long.yaml"
    script.write_text("name: long\nduration_s: 300\ndefaults:\n  publish: {width: 320, height: 240, fps: 15, "
                      "bitrate_kbps: 300}\ngroups:\n  - participants:\n      - role: clinician\n"
                      "      - role: patient\n")
    out = tmp_path / "out"
    before = metrics(server)
    proc = subprocess.Popen(loadtest(str(script), "--url", server.url, "--data-dir", str(server.data_dir),
                                     "--out", str(out), "--cache-dir", str(media_cache), "--no-png"),
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def both_receiving() -> bool:
            request = urllib.request.Request(server.url + "/metrics")
            with urllib.request.urlopen(request, timeout=5) as response:
                text = response.read().decode()
            return "openconsult_subscriptions_active 2.0" in text

        wait_until_sync(both_receiving, timeout=90, interval=0.2, message="two subscriptions forwarding")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    assert "interrupted: the report is partial" in output
    report = json.loads((out / "report.json").read_text())
    assert report["partial"] and report["stop_reason"] == "interrupted"
    assert report["elapsed_s"] < 300 and report["joins"]["ok"] == 2
    assert all(t["packets"] > 0 for t in report["tracks"]["list"] if t["direction"] == "recv")
    # Stopped cleanly: both participants said leave.
    after = metrics(server)
    key = 'openconsult_connections_closed_total{reason="clientDisconnected"}'
    assert after[key] - before.get(key, 0.0) == 2


PLAIN = """\
name: plain
duration_s: 9
defaults:
  publish: {width: 320, height: 240, fps: 15, bitrate_kbps: 300}
groups:
  - name: r
    participants:
      - role: clinician
        name: doc
      - role: patient
        name: anna
        join: 0.5
        actions:
          - {at_s: 1.5, do: mute, kind: video}
          - {at_s: 2, do: leave}
          - {at_s: 3, do: rejoin}
      - role: patient
        name: ben
        join: {uniform: [0, 1]}
        publish: false
        subscribe: {role: clinician}
"""


@pytest.mark.slow
def test_plain_room_actions_and_subscribe_rules(server: ServerProcess, tmp_path: Path, media_cache: Path) -> None:
    script = tmp_path / "plain.yaml"
    script.write_text(PLAIN)
    before = metrics(server)
    done = run_cli(server, script, tmp_path / "out", media_cache, "--no-png")
    assert done.returncode == 0, done.stdout + done.stderr + server.log_tail()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # anna joined twice (rejoin), the others once.
    assert report["joins"] == {"ok": 4, "failed": 0, "failed_by_code": {}}
    recv = [t for t in report["tracks"]["list"] if t["direction"] == "recv"]

    def streams(participant: str, source: str) -> set[str]:
        return {t["stream_id"] for t in recv if t["participant"].startswith(f"r-0-{participant}-")
                and t["peer_name"].startswith(f"r-0-{source}-")}

    # The clinician received anna's first publish and, after her rejoin, her second one.
    assert len(streams("doc", "anna")) == 2
    assert len(streams("anna", "doc")) == 1
    # ben subscribes to clinicians only and publishes nothing.
    assert len(streams("ben", "doc")) == 1 and streams("ben", "anna") == set()
    assert not [t for t in report["tracks"]["list"] if t["participant"].startswith("r-0-ben-")
                and t["direction"] == "send"]
    after = metrics(server)
    key = 'openconsult_connections_closed_total{reason="clientDisconnected"}'
    assert after[key] - before.get(key, 0.0) == 4  # anna's leave, then everyone at the end
