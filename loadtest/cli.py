"""``openconsult loadtest``: run a call script against a server and report, or compare two
reports. ``signalling/cli.py`` only adds the subcommands; everything happens here.

Exit codes: 0 the run passed its thresholds; 1 a threshold was violated (each is named);
2 the script, the arguments or the server were unusable (the message says which); 130 the
run was interrupted (Ctrl-C): the partial report is written all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_THRESHOLD, EXIT_UNUSABLE, EXIT_INTERRUPTED = 0, 1, 2, 130


def add_parser(sub: Any) -> None:
    """Add ``loadtest`` (and ``loadtest compare``) to the ``openconsult`` command."""
    lt = sub.add_parser("loadtest", help="replay a call script against a server and report",
                        description="Replay a call script (YAML, see docs/loadtest.md) against a server; "
                                    "`openconsult loadtest compare A.json B.json` compares two reports.")
    lt.add_argument("script", help="call script file, or the name of a shipped one (one-to-one, group-6, ...); "
                                   "or `compare`")
    lt.add_argument("reports", nargs="*", help="with `compare`: the two report JSON files")
    lt.add_argument("--url", help="the server's base URL, e.g. http://127.0.0.1:8080")
    lt.add_argument("--secret", help="the server's HS256 secret: its jwt-secret file, or the value")
    lt.add_argument("--data-dir", help="the server's data dir (its jwt-secret file is read)")
    lt.add_argument("--processes", type=int, default=1, help="generator processes (default 1)")
    lt.add_argument("--out", default="loadtest-out", help="directory for report.json and report.png")
    lt.add_argument("--cache-dir", help="pre-encoded media cache (default under ~/.cache/openconsult)")
    lt.add_argument("--no-png", action="store_true", help="do not draw report.png")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        # Off a terminal (CI logs, files) the tables get room rather than 80 columns.
        console = Console(highlight=False, width=max(console.width, 160))
    if args.script == "compare":
        return _compare(args, console)
    from loadtest.runner import RunError, Target, read_secret
    from loadtest.script import ScriptError, load_script, resolve

    try:
        script = load_script(resolve(args.script))
    except ScriptError as exc:
        print(f"openconsult loadtest: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if args.reports:
        print(f"openconsult loadtest: unexpected arguments {' '.join(args.reports)} (only `compare` takes two reports)",
              file=sys.stderr)
        return EXIT_UNUSABLE
    if not args.url:
        print("openconsult loadtest: --url is required (the server's base URL)", file=sys.stderr)
        return EXIT_UNUSABLE
    if args.processes < 1:
        print("openconsult loadtest: --processes must be at least 1", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        target = Target(args.url.rstrip("/"), read_secret(args.secret, args.data_dir))
    except RunError as exc:
        print(f"openconsult loadtest: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        return asyncio.run(_run(script, target, args, console))
    except RunError as exc:
        print(f"openconsult loadtest: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE


async def _run(script: Any, target: Any, args: argparse.Namespace, console: Any) -> int:
    from loadtest import report as reporting
    from loadtest.runner import run

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    display = _Progress(console, script.duration_s)
    console.print(f"openconsult loadtest: {script.name}: {script.participant_count} participants in "
                  f"{len(script.rooms)} rooms for {script.duration_s:g} s against {target.url} "
                  f"({args.processes} generator process{'es' if args.processes > 1 else ''})", markup=False)
    try:
        with display:
            result = await run(script, target, processes=args.processes, cache_dir=args.cache_dir,
                               on_tick=display.update, stop_requested=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
    result.partial = result.partial or stop.is_set()
    if stop.is_set():
        result.stop_reason = "interrupted"
    rep = reporting.build_report(result)
    out = Path(args.out)
    reporting.write_json(rep, out / "report.json")
    if not args.no_png:
        try:
            reporting.write_png(rep, out / "report.png")
        except Exception as exc:  # noqa: BLE001 - the JSON is the report; a drawing failure is said, not fatal
            console.print(f"could not draw report.png: {exc}", markup=False)
    reporting.print_report(rep, console)
    console.print(f"report written to {out / 'report.json'}", markup=False)
    if stop.is_set():
        console.print("interrupted: the report is partial", markup=False)
        return EXIT_INTERRUPTED
    violated = reporting.violations(rep)
    for t in violated:
        console.print(f"FAILED threshold {t['name']}: limit {t['limit']:g}, measured {t['value']}", markup=False)
    return EXIT_THRESHOLD if violated else EXIT_OK


def _compare(args: argparse.Namespace, console: Any) -> int:
    from loadtest import report as reporting

    if len(args.reports) != 2:
        print("openconsult loadtest compare: give two report JSON files", file=sys.stderr)
        return EXIT_UNUSABLE
    loaded = []
    for name in args.reports:
        try:
            loaded.append(json.loads(Path(name).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            print(f"openconsult loadtest compare: cannot read {name}: {exc}", file=sys.stderr)
            return EXIT_UNUSABLE
    reporting.compare(loaded[0], loaded[1], console, (args.reports[0], args.reports[1]))
    return EXIT_OK


class _Progress:
    """A live line on a terminal (rich), one plain line every 5 s otherwise."""

    def __init__(self, console: Any, duration_s: float) -> None:
        self.console = console
        self.duration_s = duration_s
        self.live: Any = None
        self.last_plain = 0.0

    def __enter__(self) -> _Progress:
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live("starting...", console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, sample: dict[str, Any]) -> None:
        line = (f"{sample['t']:6.0f}s elapsed, {sample['remaining_s']:5.0f}s left | joined {sample['joined']} "
                f"publishing {sample['publishing']} receiving {sample['receiving']} failed {sample['failed']} | "
                f"send {sample['send_kbps'] / 1000:.1f} Mbit/s recv {sample['recv_kbps'] / 1000:.1f} Mbit/s")
        if "server_cpu_pct" in sample:
            line += f" | server CPU {sample['server_cpu_pct']:.0f}%"
        if self.live is not None:
            self.live.update(line)
        elif time.monotonic() - self.last_plain >= 5:
            self.last_plain = time.monotonic()
            print(line, flush=True)
