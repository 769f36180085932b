"""The ``openconsult`` command: ``serve`` runs a node, ``token`` prints a signed join token,
``loadtest`` replays a call script against a server (``loadtest/cli.py``)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime
from typing import Any

from loadtest.cli import add_parser as add_loadtest
from rooms.model import Role
from signalling.config import ConfigError, load_config


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openconsult", description="OpenConsult video consultation server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server node")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--data-dir", help="directory for the SQLite files and the generated secret (default ./data)")
    serve.add_argument("--config", help="TOML config file (see deploy/openconsult.sample.toml)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
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
    for key in ("host", "port", "data_dir"):
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


def _serve(args: argparse.Namespace, config: Any) -> int:
    from aiohttp import web

    from signalling.app import create_app

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        app = create_app(config)
    except (ConfigError, OSError) as exc:
        print(f"openconsult: {exc}", file=sys.stderr)
        return 2
    if args.drain:
        from signalling.failover import drain_on_sigterm

        drain_on_sigterm(app)
    host = config.server.host
    shown = f"[{host}]" if ":" in host else host
    print(f"OpenConsult {time.strftime('%Y-%m-%d %H:%M:%S')}: demo page at http://{shown}:{config.server.port}/ "
          f"(data in {config.data_path.resolve()})", flush=True)
    try:
        web.run_app(app, host=host, port=config.server.port, print=None, shutdown_timeout=5)
    except OSError as exc:
        # Most often the port is taken (another OpenConsult, or another web server).
        print(f"openconsult: cannot listen on {shown}:{config.server.port}: {exc.strerror or exc}. "
              "Pick another port with --port.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
