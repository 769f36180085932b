"""Idle-connection benchmark: what an idle WebSocket costs the server, and whether
``/healthz`` stays quick while many are open.

Starts a real ``python -m signalling.cli serve`` (temp data dir, free port, ICE on
127.0.0.1), then opens N WebSockets to ``/ws`` from one or two client processes and
leaves them idle (the clients answer the server's heartbeat pings and send nothing).
Three states are measured, each after the server has settled:

- ``none``: no connection open (the baseline);
- ``connected``: N sockets open, none joined;
- ``joined``: the same sockets joined, two to a room (a consultation's pair), so each
  holds a live connection, its session and its event-log entries.

For each state it prints the server's RSS (``VmRSS`` from /proc), the RSS per
connection above the baseline, the ``/healthz`` latency (p50 / p95 over
``--samples`` sequential requests on one keep-alive connection, spread over at
least one heartbeat interval) and the server's CPU meanwhile (% of one core). RLIMIT_NOFILE is raised to its hard limit here,
and the server and client processes inherit it.

    .venv/bin/python benchmarks/idle_connections.py [--connections 10000] [--processes 2] [--samples 400]

Client processes are this file run as ``python -m benchmarks.idle_connections worker``;
they read one JSON config line on stdin, then answer ``connect``/``join``/``stop`` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

TICKS = os.sysconf("SC_CLK_TCK")
#: File descriptors a process needs beside its sockets (logs, SQLite, epoll, pipes).
FD_HEADROOM = 256


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; fail clearly if that is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise SystemExit(f"RLIMIT_NOFILE hard limit is {hard}, {needed} file descriptors are needed: "
                         f"raise it (ulimit -Hn) or ask for fewer connections")
    return target


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads) in seconds, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Row:
    state: str
    connections: int
    rss_kib: int
    per_connection_kib: float | None
    healthz_p50_ms: float
    healthz_p95_ms: float
    cpu_pct: float  # server CPU while measuring, % of one core (idle work plus the /healthz requests)


async def healthz_latency(url: str, samples: int, span_s: float) -> tuple[float, float, dict[str, Any]]:
    """p50 and p95 in ms of ``samples`` sequential GET /healthz spread over ``span_s`` seconds."""
    import aiohttp

    times: list[float] = []
    body: dict[str, Any] = {}
    gap = span_s / samples
    async with aiohttp.ClientSession() as session:
        for _ in range(samples):
            start = time.perf_counter()
            async with session.get(url + "/healthz") as response:
                body = await response.json()
                response.raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(max(0.0, gap - (time.perf_counter() - start)))
    return percentile(times, 50), percentile(times, 95), body


class Worker:
    """A client process speaking JSON lines on stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, config: dict[str, Any]) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.idle_connections", "worker", cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, limit=2**20)
        worker = cls(proc)
        await worker.send(config)
        return worker

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def ask(self, command: str, timeout: float) -> dict[str, Any]:
        await self.send({"command": command})
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited ({await self.proc.wait()}) without answering")
        data: dict[str, Any] = json.loads(line)
        if "error" in data:
            raise RuntimeError(f"worker {self.proc.pid}: {data['error']}")
        return data

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                await self.send({"command": "stop"})
                await asyncio.wait_for(self.proc.wait(), 30)
            except (OSError, asyncio.TimeoutError):
                self.proc.kill()
                await self.proc.wait()


async def run(connections: int, processes: int, samples: int, span_s: float, settle_s: float,
              timeout: float) -> list[Row]:
    from rooms.model import Role
    from signalling.auth import TokenAuthority, load_or_create_secret
    from tests.server import start_server

    # Children (server and clients) inherit the raised limit.
    raise_fd_limit(connections + FD_HEADROOM)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="idle-") as tmp:
        # The "connected" state holds unjoined sockets for a while: raise the join deadline (which
        # closes unjoined sockets) to its maximum and the node's socket cap above the load.
        limits = f"[server]\njoin_timeout_s = 600\nmax_connections = {connections + 100}\n"
        server = await asyncio.to_thread(start_server, Path(tmp) / "server", limits)
        workers: list[Worker] = []
        try:
            pid = server.proc.pid
            secret = load_or_create_secret(server.data_dir, create=False)
            tokens = TokenAuthority("HS256", secret, secret, 30)

            async def measure(state: str, count: int) -> None:
                await asyncio.sleep(settle_s)
                cpu0, t0 = process_cpu_s(pid), time.monotonic()
                p50, p95, body = await healthz_latency(server.url, samples, span_s)
                cpu_pct = 100 * (process_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
                rss = rss_kib(pid)
                base = rows[0].rss_kib if rows else rss
                per = (rss - base) / count if count else None
                rows.append(Row(state, count, rss, per, p50, p95, cpu_pct))
                print(f"  {state}: {count} connections, healthz says {body.get('connections')} joined, "
                      f"RSS {rss / 1024:.1f} MiB", file=sys.stderr)

            await measure("none", 0)
            # Two sockets per room; the pairs are split so each process holds whole rooms.
            rooms = [f"idle-{uuid.uuid4().hex[:10]}" for _ in range((connections + 1) // 2)]
            all_tokens = [tokens.mint(rooms[i // 2], Role.PATIENT if i % 2 == 0 else Role.CLINICIAN, f"user {i}",
                                      ttl_s=24 * 3600) for i in range(connections)]
            share = -(-len(rooms) // processes) * 2
            for p in range(processes):
                part = all_tokens[p * share:(p + 1) * share]
                if part:
                    workers.append(await Worker.start({"ws_url": server.ws_url, "tokens": part}))
            started = time.monotonic()
            opened = sum([(await w.ask("connect", timeout))["open"] for w in workers])
            print(f"  opened {opened} sockets in {time.monotonic() - started:.1f} s", file=sys.stderr)
            await measure("connected", opened)
            started = time.monotonic()
            joined = sum([(await w.ask("join", timeout))["joined"] for w in workers])
            print(f"  joined {joined} sockets in {time.monotonic() - started:.1f} s", file=sys.stderr)
            await measure("joined", joined)
        finally:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
            server.stop()
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'state':<10} {'connections':>11} {'server RSS MiB':>15} {'KiB/connection':>15} "
             f"{'/healthz p50 ms':>16} {'p95 ms':>8} {'server CPU %':>13}"]
    for r in rows:
        per = f"{r.per_connection_kib:.1f}" if r.per_connection_kib is not None else "-"
        lines.append(f"{r.state:<10} {r.connections:>11} {r.rss_kib / 1024:>15.1f} {per:>15} "
                     f"{r.healthz_p50_ms:>16.2f} {r.healthz_p95_ms:>8.2f} {r.cpu_pct:>13.1f}")
    return "\n".join(lines)


# --- client process ---------------------------------------------------------------


async def worker_main() -> None:
    import aiohttp

    limit = raise_fd_limit(0)
    loop = asyncio.get_running_loop()
    # All of stdin through one reader (a buffered readline could eat the commands behind the
    # config line); the config line holds every token, hence the large line limit.
    stdin = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    config = json.loads(await stdin.readline())
    ws_url: str = config["ws_url"]
    tokens: list[str] = config["tokens"]
    if limit < len(tokens) + FD_HEADROOM:
        raise SystemExit(f"worker: RLIMIT_NOFILE {limit} is too low for {len(tokens)} sockets")
    sockets: list[tuple[int, aiohttp.ClientWebSocketResponse]] = []  # (token index, socket)
    readers: list[asyncio.Task[None]] = []
    joined: dict[int, asyncio.Future[dict[str, Any]]] = {}
    in_flight = asyncio.Semaphore(100)  # handshakes at once: a burst the server's backlog takes
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    session = aiohttp.ClientSession(connector=connector)

    async def read(index: int, ws: aiohttp.ClientWebSocketResponse) -> None:
        # Reading keeps pings answered (autoping) and collects the join response.
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                future = joined.get(index)
                if data.get("type") == "response" and future is not None and not future.done():
                    future.set_result(data)

    async def open_one(index: int) -> None:
        async with in_flight:
            ws = await session.ws_connect(ws_url, protocols=("openconsult.v1",), heartbeat=None,
                                       timeout=aiohttp.ClientWSTimeout(ws_close=10))
        sockets.append((index, ws))
        readers.append(asyncio.create_task(read(index, ws)))

    async def join_one(index: int, ws: aiohttp.ClientWebSocketResponse) -> None:
        async with in_flight:
            joined[index] = asyncio.get_running_loop().create_future()
            await ws.send_str(json.dumps({"type": "join", "id": 1, "token": tokens[index]}))
            response = await asyncio.wait_for(joined[index], 60)
        if not response.get("ok"):
            raise RuntimeError(f"join refused: {response.get('error')}")

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    try:
        while line := await stdin.readline():
            command = json.loads(line)["command"]
            try:
                if command == "connect":
                    await asyncio.gather(*(open_one(i) for i in range(len(tokens))))
                    reply({"open": sum(1 for _, ws in sockets if not ws.closed)})
                elif command == "join":
                    await asyncio.gather(*(join_one(i, ws) for i, ws in sockets))
                    reply({"joined": sum(1 for _, ws in sockets if not ws.closed)})
                elif command == "stop":
                    break
            except Exception as exc:
                reply({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for _, ws in sockets), return_exceptions=True)
        await session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "worker"))
    parser.add_argument("--connections", type=int, default=10_000, help="idle WebSockets (default 10000)")
    parser.add_argument("--processes", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--samples", type=int, default=400, help="/healthz requests per state (default 400)")
    parser.add_argument("--span", type=float, default=12.0,
                        help="seconds the /healthz samples are spread over (default 12: over a heartbeat)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before measuring a state")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed to connect or join all")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        asyncio.run(worker_main())
        return 0
    print(f"idle connections: {args.connections} from {args.processes} client process(es), "
          f"/healthz over {args.samples} requests per state", file=sys.stderr)
    rows = asyncio.run(run(args.connections, args.processes, args.samples, args.span, args.settle, args.timeout))
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
