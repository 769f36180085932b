"""The ``openconsult`` command: ``serve`` runs a node, ``token`` prints a signed join token,
``loadtest`` replays a call script against a server (``loadtest/cli.py``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime
from typing import Any

from loadtest.cli import add_parser as add_loadtest
from rooms.model import Role
from signalling.config import ConfigError, load_config
from signalling.supervisor import WorkerSpec


def _timestamp(value: str) -> int:
    """Unix seconds or an ISO 8601 time (2026-11-21T09:15:00Z)."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{value}" is neither Unix seconds nor an ISO 8601 time') from None
    if dt.tzinfo is None:
        raise argparse.ArgumentTypeError(f'"{value}" needs a time zone (e.g. Z or +01:00)')
    return int(dt.timestamp())


def _workers(value: str) -> int:
    from signalling.supervisor import available_cores, parse_worker_count

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        return parse_worker_count(value, available_cores(os.cpu_count(), affinity))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _worker_spec(value: str) -> WorkerSpec:
    try:
        return WorkerSpec.from_arg(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openconsult", description="OpenConsult video consultation server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server node")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--data-dir", help="directory for the SQLite files and the generated secret (default ./data)")
    serve.add_argument("--config", help="TOML config file (see deploy/openconsult.sample.toml)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="log lines on stderr: text, or json (one object per line); default server.log_format")
    serve.add_argument("--workers", type=_workers,
                       help='run N worker processes (or "auto": one per core) behind one port, each a node of '
                            "the cluster in redis_url (required); without it: one process (see docs/operations.md)")
    serve.add_argument("--worker-spec", type=_worker_spec, help=argparse.SUPPRESS)  # set by the supervisor
    serve.add_argument("--drain", action="store_true",
                       help="SIGTERM drains the node (no new rooms; exit once its calls end, at most "
                            "cluster.drain_timeout_s) instead of stopping it; a second SIGTERM stops it")
    token = sub.add_parser("token", help="print a signed join token")
    token.add_argument("--room", required=True)
    token.add_argument("--role", required=True, choices=[r.value for r in Role])
    token.add_argument("--name", required=True)
    token.add_argument("--sub", help="user id (default: the name)")
    token.add_argument("--department", action="append", default=[], dest="departments",
                       help="a department the staff member belongs to (repeat for several)")
    token.add_argument("--ttl", type=int, default=3600, help="seconds the token is valid from now (default 3600)")
    token.add_argument("--not-before", type=_timestamp, help="start of the access window (Unix seconds or ISO 8601)")
    token.add_argument("--expires", type=_timestamp, help="end of the access window (Unix seconds or ISO 8601)")
    token.add_argument("--data-dir")
    token.add_argument("--config")
    add_loadtest(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    server: dict[str, Any] = {}
    for key in ("host", "port", "data_dir", "log_format"):
        value = getattr(args, key, None)
        if value is not None:
            server[key] = value
    return {"server": server} if server else {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "loadtest":
        from loadtest.cli import main as loadtest_main

        return loadtest_main(args)
    try:
        config = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"openconsult: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        return _token(args, config)
    return _serve(args, config)


def _token(args: argparse.Namespace, config: Any) -> int:
    from signalling.auth import TokenAuthority

    try:
        authority = TokenAuthority.from_config(config)
        token = authority.mint(args.room, Role(args.role), args.name, sub=args.sub, not_before=args.not_before,
                               expires=args.expires, ttl_s=args.ttl, departments=args.departments)
    except (ConfigError, ValueError) as exc:
        print(f"openconsult: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _refuse(message: str, json_logs: bool, log: logging.Logger) -> int:
    """Say why ``serve`` cannot start (a log line when logs are JSON: every line a log collector
    reads is a JSON object) and return its exit code, 2."""
    if json_logs:
        log.error("openconsult: %s", message)
    else:
        print(f"openconsult: {message}", file=sys.stderr)
    return 2


def _supervise(args: argparse.Namespace, config: Any) -> int:
    """``serve --workers N``: the supervisor (signalling/supervisor.py) runs N workers, each this
    command with the same options and its ``--worker-spec``."""
    from signalling.auth import TokenAuthority
    from signalling.supervisor import check_port_free, check_worker_config, supervise, worker_command

    from signalling import logs

    logs.configure(config.server.log_format, args.log_level, label="supervisor: ")
    json_logs = config.server.log_format == "json"
    log = logging.getLogger("openconsult.supervisor")

    def refuse(message: str) -> int:
        return _refuse(message, json_logs, log)

    if args.drain:
        return refuse("--drain is for one node; with --workers, drain the host by stopping the supervisor "
                      "after its load balancer stopped sending it clients (see docs/operations.md)")
    try:
        check_worker_config(config, args.workers)
        # The generated secret (if any) is written once here, not raced by the workers.
        config.data_path.mkdir(parents=True, exist_ok=True)
        TokenAuthority.from_config(config)
    except (ConfigError, OSError) as exc:
        return refuse(f"config error: {exc}")
    try:
        check_port_free(config.server.host, config.server.port)
    except OSError as exc:
        return refuse(str(exc.strerror))
    serve_args = ["--log-level", args.log_level, "--log-format", config.server.log_format]
    for option in ("host", "port", "data_dir", "config"):
        value = getattr(args, option)
        if value is not None:
            serve_args += [f"--{option.replace('_', '-')}", str(value)]
    host = config.server.host
    shown = f"[{host}]" if ":" in host else host
    if json_logs:
        log.info("OpenConsult: %d workers on %s:%d (data in %s)", args.workers, shown, config.server.port,
                     config.data_path.resolve())
    else:
        print(f"OpenConsult {time.strftime('%Y-%m-%d %H:%M:%S')}: {args.workers} workers on http://{shown}:"
              f"{config.server.port}/ (data in {config.data_path.resolve()})", flush=True)
    return supervise(args.workers, config, worker_command(serve_args))


def _serve(args: argparse.Namespace, config: Any) -> int:
    from dataclasses import replace

    from aiohttp import web

    from signalling.app import create_app

    from signalling import logs

    if args.workers is not None:
        return _supervise(args, config)
    spec: WorkerSpec | None = args.worker_spec
    who = "" if spec is None else f"worker {spec.index}: "
    if spec is not None:
        config = replace(config, media=replace(config.media, udp_port=spec.udp_port))
        logs.bind_process(worker=str(spec.index))
    logs.configure(config.server.log_format, args.log_level, label=who)
    json_logs = config.server.log_format == "json"
    for noisy in ("aiohttp.access", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        pass
    # Whether anyone may mint demo tokens is said at every start, with the reason.
    if config.demo_served and config.demo.enabled:
        logging.warning("%s", config.demo_status())
    else:
        logging.info("%s", config.demo_status())
    try:
        app = create_app(config, worker=spec)
    except (ConfigError, OSError) as exc:
        # JSON lines carry the worker as a field; text lines name it.
        return _refuse(str(exc) if json_logs else f"{who}{exc}", json_logs, logging.getLogger())
    if args.drain:
        from signalling.failover import drain_on_sigterm

        drain_on_sigterm(app)
    host = config.server.host
    shown = f"[{host}]" if ":" in host else host
    if json_logs:  # every line a log collector reads is a JSON object
        logging.info("OpenConsult listening on %s:%d (data in %s)", shown, config.server.port, config.data_path.resolve())
    else:
        print(f"OpenConsult {time.strftime('%Y-%m-%d %H:%M:%S')}: {who}demo page at http://{shown}:{config.server.port}/ "
              f"(data in {config.data_path.resolve()})", flush=True)
    try:
        # Workers share the public port: the kernel spreads new connections over them.
        web.run_app(app, host=host, port=config.server.port, print=None, shutdown_timeout=5,
                    reuse_port=True if spec is not None else None)
    except OSError as exc:
        # Most often the port is taken (another OpenConsult, or another web server).
        logging.error("openconsult: cannot listen on %s:%d: %s. Pick another port with --port.", shown,
                      config.server.port, exc.strerror or exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
