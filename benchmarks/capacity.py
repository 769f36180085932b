"""Capacity benchmark: how many concurrent 1:1 audio+video consultations one server process
carries, measured with the load tester (``openconsult loadtest``'s runner and report).

Each consultation is two participants, each publishing 640x480 VP8 at ~1 Mbit/s plus Opus
and receiving the other (a call script built here and validated like any other). The
benchmark starts a real ``openconsult serve`` (temp data dir, free port, ICE on 127.0.0.1)
unless ``--url`` is given, then runs steps of ``--step-s`` seconds with 1, 2, 4, 6, ... calls
(``--steps``), each a fresh load-test run against the same server, its participants joining
over ``--ramp-s`` seconds (0: all at once; the step's maximum time to first frame is then
how long the node took to set up all of its calls). A step passes when the
loss on received tracks is at most ``--max-loss`` % and the server's CPU over the step's
steady part (after the ramp and a settling time) stays under ``--max-cpu`` % of one core.
The first failing step ends the ramp; the maximum is the last passing step, printed with the
server's CPU per call, the loss, p95 join latency and p95 time to first frame at that load.

The generator's own CPU per process is printed per step: when it is near 100 % the generator,
not the server, is the limit; add ``--processes`` (the clients then take more cores than the
server; on a 2-core machine the two compete, so the figure is a lower bound).

With ``--workers N`` the benchmark starts a redis-server of its own (tests/redis_server.py)
and the server as ``openconsult serve --workers N``: server CPU is then the sum over the workers
(100 % per core) and a step passes while it stays under ``--max-cpu`` % of N cores. Compare
``--workers 1`` with ``--workers 2`` in one session; on a machine with fewer cores than workers
plus generator processes they all compete, so the ratio is a lower bound.

    .venv/bin/python benchmarks/capacity.py [--steps 1,2,4,6,8,10,12] [--step-s 25] [--processes 1]
    .venv/bin/python benchmarks/capacity.py --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

SETTLE_S = 4.0  # after the ramp, before the steady window starts


def call_script(calls: int, step_s: float, ramp_s: float) -> Any:
    """The call script of one step: ``calls`` rooms of clinician + patient, both ways A+V."""
    from loadtest.script import parse_script

    text = f"""\
name: capacity-{calls}
duration_s: {step_s}
ramp_s: {ramp_s}
defaults:
  publish: {{audio: true, video: true, codec: vp8, width: 640, height: 480, fps: 30, bitrate_kbps: 1000}}
  subscribe: all
groups:
  - name: call
    rooms: {calls}
    participants:
      - role: clinician
      - role: patient
"""
    return parse_script(text, f"capacity-{calls}")


def steady_cpu(report: dict[str, Any], ramp_s: float, step_s: float) -> float | None:
    """The server's mean CPU % over the step once every call is up."""
    values = [s["server_cpu_pct"] for s in report["timeline"]
              if "server_cpu_pct" in s and ramp_s + SETTLE_S <= s["t"] <= step_s - 1]
    return round(sum(values) / len(values), 1) if values else None


async def run_step(calls: int, target: Any, args: argparse.Namespace) -> dict[str, Any]:
    from loadtest.report import build_report
    from loadtest.runner import run

    ramp_s = min(10.0, 0.5 * calls) if args.ramp_s is None else args.ramp_s
    script = call_script(calls, args.step_s, ramp_s)
    result = await run(script, target, processes=args.processes, cache_dir=args.cache_dir)
    report = build_report(result)
    if args.out:
        from loadtest.report import write_json

        write_json(report, Path(args.out) / f"report-{calls}.json")
    cpu = steady_cpu(report, ramp_s, args.step_s)
    row = {
        "calls": calls, "server_cpu_pct": cpu,
        "server_cpu_pct_per_call": round(cpu / calls, 2) if cpu is not None else None,
        "loss_pct": report["tracks"]["loss_pct"], "packets": report["tracks"]["packets"],
        "joins_failed": report["joins"]["failed"],
        "p95_join_ms": report["join_ms"]["p95"], "max_join_ms": report["join_ms"]["max"], "p95_first_frame_ms": report["first_frame_ms"]["p95"],
        "max_first_frame_ms": report["first_frame_ms"]["max"],
        "freezes_per_min": report["tracks"]["freezes_per_min"],
        "server_rss_mb": report["server"]["rss_mb"]["max"],
        "generator_cpu_pct": [w["cpu_pct"] for w in report["generator"]["workers"]],
        # On a shared machine a starved server shows low CPU and high latency: the host's load says so.
        "host_load_1min": round(os.getloadavg()[0], 2),
    }
    loss = row["loss_pct"] if row["loss_pct"] is not None else 100.0
    cores = args.workers or 1  # --workers N: the server may use N cores
    row["passed"] = (loss <= args.max_loss and cpu is not None and cpu < args.max_cpu * cores
                     and row["joins_failed"] == 0)
    return row


async def main_async(args: argparse.Namespace) -> int:
    from loadtest.runner import Target, read_secret

    steps = [int(s) for s in args.steps.split(",")]
    server = None
    with tempfile.TemporaryDirectory(prefix="openconsult-capacity-") as tmp, contextlib.ExitStack() as stack:
        if args.url:
            target = Target(args.url.rstrip("/"), read_secret(args.secret, args.data_dir))
        else:
            server = await asyncio.to_thread(_start, Path(tmp) / "server", args.workers, stack)
            target = Target(server.url, read_secret(None, str(server.data_dir)))
        if args.fresh_cache:
            args.cache_dir = str(Path(tmp) / "media")
        rows: list[dict[str, Any]] = []
        try:
            print(f"{'calls':>5} {'srv CPU %':>9} {'CPU/call':>8} {'loss %':>7} {'p95 join':>8} "
                  f"{'max join':>8} {'p95 1st frame':>13} {'max 1st frame':>13} {'freezes/min':>11} {'RSS MB':>7} {'host load':>9}  generator CPU %",
                  flush=True)
            for calls in steps:
                row = await run_step(calls, target, args)
                rows.append(row)
                print(f"{row['calls']:>5} {_f(row['server_cpu_pct']):>9} {_f(row['server_cpu_pct_per_call']):>8} "
                      f"{_f(row['loss_pct']):>7} {_f(row['p95_join_ms']):>8} {_f(row['max_join_ms']):>8} {_f(row['p95_first_frame_ms']):>13} {_f(row['max_first_frame_ms']):>13} "
                      f"{_f(row['freezes_per_min']):>11} {_f(row['server_rss_mb']):>7} {_f(row['host_load_1min']):>9}  "
                      f"{' '.join(_f(c) for c in row['generator_cpu_pct'])}"
                      f"{'' if row['passed'] else '  <- over the limit'}", flush=True)
                if not row["passed"]:
                    break
        finally:
            if server is not None:
                server.stop()
    passed = [r for r in rows if r["passed"]]
    if not passed:
        print("no step passed: even the smallest load is over the limits")
        return 1
    best = passed[-1]
    stopped = "" if len(passed) == len(rows) else f" (at {rows[-1]['calls']} calls: loss {_f(rows[-1]['loss_pct'])} %, " \
        f"server CPU {_f(rows[-1]['server_cpu_pct'])} %)"
    shape = "one server process" if not args.workers else f"serve --workers {args.workers}"
    print(f"\nhost: {os.cpu_count()} cores, 1-minute load {os.getloadavg()[0]:.2f} at the end")
    print(f"maximum: {best['calls']} concurrent 1:1 audio+video consultations on {shape}{stopped}; "
          f"server CPU {_f(best['server_cpu_pct_per_call'])} % of a core per call, loss {_f(best['loss_pct'])} %, "
          f"p95 join {_f(best['p95_join_ms'])} ms, p95 time to first frame {_f(best['p95_first_frame_ms'])} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": rows, "maximum": best}, indent=1) + "\n")
    return 0


def _start(workdir: Path, workers: int | None, stack: contextlib.ExitStack) -> Any:
    """The server under test: one process, or ``--workers N`` with a redis-server of its own
    (stopped by ``stack``), ready when /healthz says every worker is ok."""
    from tests.helpers import wait_until_sync
    from tests.server import start_server

    if not workers:
        return start_server(workdir)
    from tests.call_helpers import get_json
    from tests.redis_server import redis_server

    redis = stack.enter_context(redis_server())
    server = start_server(workdir, env={"OPENCONSULT_REDIS_URL": redis.url}, args=("--workers", str(workers)))
    wait_until_sync(lambda: get_json(f"{server.url}/healthz", "")["status"] == "ok", timeout=60, interval=0.2,
                    message="every worker ok")
    return server


def _f(value: Any) -> str:
    return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="1,2,4,6,8,10,12,14,16", help="concurrent calls per step")
    parser.add_argument("--step-s", type=float, default=25.0, help="seconds per step (default 25)")
    parser.add_argument("--ramp-s", type=float,
                        help="seconds over which a step's participants join (default: half a second per call, "
                             "at most 10; 0: all at once, for the time to set up N calls)")
    parser.add_argument("--max-loss", type=float, default=0.5, help="loss %% that ends the ramp (default 0.5)")
    parser.add_argument("--max-cpu", type=float, default=90.0,
                        help="server CPU %% of one core that counts as saturated (default 90)")
    parser.add_argument("--processes", type=int, default=1, help="generator processes (default 1)")
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--workers", type=int, help="start the server as serve --workers N (with a redis-server)")
    parser.add_argument("--secret", help="with --url: the server's jwt-secret file or value")
    parser.add_argument("--data-dir", help="with --url: the server's data dir")
    parser.add_argument("--cache-dir", help="pre-encoded media cache (default: the load tester's)")
    parser.add_argument("--fresh-cache", action="store_true", help="encode the media into a temp dir")
    parser.add_argument("--json", help="also write the steps and the maximum to this file")
    parser.add_argument("--out", help="write each step's load-test report here (report-<calls>.json)")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
