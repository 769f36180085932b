"""Memory and threads per 1:1 call: a real ``openconsult serve`` (temp data dir, free
port, ICE on 127.0.0.1 only) and N concurrent 1:1 calls driven from client processes.

A call is one room where each of the two participants publishes pre-encoded VP8
(~1 Mbit/s, 30 fps) + Opus and subscribes to the other (counting packets, no
decoding): two publishes and two subscriptions on the server, as in a consultation.
For each N: a fresh server, its idle RSS (``VmRSS``) and thread count, then the same
once every subscriber receives audio and video and ``--settle`` seconds have passed;
the per-call figures are the difference divided by N. "setup s" runs from starting the
client processes until every subscriber receives audio and video; "server CPU s" and
"clients CPU s" are the CPU seconds (user + system, /proc) the server and the client
processes used meanwhile (the clients' include their start-up and media loading), to tell
which of the two set the pace on a shared host.

    .venv/bin/python benchmarks/call_memory.py [--calls 8,16] [--calls-per-process 8]

Client processes are this file run as ``python -m benchmarks.call_memory worker``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))


def process_status(pid: int) -> tuple[float, int]:
    """(VmRSS in MiB, threads) of a process, from /proc/<pid>/status."""
    rss, threads = 0.0, 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, from /proc/<pid>/stat (0 once
    it has been reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Worker:
    """A client process hosting some calls, speaking JSON lines on stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, config: dict[str, Any]) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.call_memory", "worker", cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        worker = cls(proc)
        await worker.send(config)
        return worker

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def reply(self, timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited without answering")
        data: dict[str, Any] = json.loads(line)
        if "error" in data:
            raise RuntimeError(f"worker {self.proc.pid}: {data['error']}")
        return data

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                await self.send({"command": "stop"})
                await asyncio.wait_for(self.proc.wait(), 20)
            except (OSError, asyncio.TimeoutError):
                self.proc.kill()
                await self.proc.wait()


async def measure(calls: int, media_file: Path, workdir: Path, calls_per_process: int, settle_s: float,
                  media_connect_timeout_s: float = 15.0, connect_timeout: float = 180.0) -> dict[str, float]:
    from rooms.model import Role
    from signalling.auth import TokenAuthority, load_or_create_secret
    from tests.server import start_server

    server = await asyncio.to_thread(start_server, workdir / f"server-{calls}",
                                     f"max_peer_connections = {4 * calls + 8}\n"
                                     f"connect_timeout_s = {media_connect_timeout_s}\n")
    workers: list[Worker] = []
    try:
        await asyncio.sleep(settle_s)
        idle_rss, idle_threads = process_status(server.proc.pid)
        secret = load_or_create_secret(server.data_dir, create=False)
        tokens = TokenAuthority("HS256", secret, secret, 30)
        rooms = [f"call-{uuid.uuid4().hex[:8]}" for _ in range(calls)]
        processes = max(1, math.ceil(calls / calls_per_process))
        started = time.monotonic()
        server_cpu = cpu_seconds(server.proc.pid)
        for p in range(processes):
            mine = [room for i, room in enumerate(rooms) if i % processes == p]
            workers.append(await Worker.start({
                "ws_url": server.ws_url, "media_file": str(media_file),
                "calls": [{name: tokens.mint(room, Role.PATIENT, name) for name in ("a", "a-view", "b", "b-view")}
                          for room in mine]}))
        try:
            for worker in workers:
                await worker.reply(connect_timeout)
        except RuntimeError as exc:
            # A call failed (on a starved host: a peer connection not connected within
            # media.connect_timeout_s). Say when, and who had used the CPU until then.
            raise RuntimeError(
                f"{exc} after {time.monotonic() - started:.1f} s; CPU s so far: server "
                f"{cpu_seconds(server.proc.pid) - server_cpu:.1f}, clients "
                f"{sum(cpu_seconds(w.proc.pid) for w in workers):.1f}") from None
        setup_s = time.monotonic() - started
        setup_server_cpu = cpu_seconds(server.proc.pid) - server_cpu
        setup_clients_cpu = sum(cpu_seconds(w.proc.pid) for w in workers)
        await asyncio.sleep(settle_s)
        rss, threads = process_status(server.proc.pid)
        return {"calls": calls, "idle_rss_mib": idle_rss, "idle_threads": idle_threads, "rss_mib": rss,
                "threads": threads, "rss_per_call_mib": (rss - idle_rss) / calls,
                "threads_per_call": (threads - idle_threads) / calls, "setup_s": setup_s,
                "setup_server_cpu_s": setup_server_cpu, "setup_clients_cpu_s": setup_clients_cpu}
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        await asyncio.to_thread(server.stop)


async def worker_main() -> None:
    """A client process: per call, two pre-encoded publishers and two counting subscribers."""
    from loadtest.media import load_media
    from loadtest.peers import CountingSubscriber, PreEncodedPublisher
    from media.aiortc_internals import configure_ice_addresses

    configure_ice_addresses(("127.0.0.1",))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    config = json.loads(await reader.readline())
    media = load_media(Path(config["media_file"]))
    peers: list[PreEncodedPublisher | CountingSubscriber] = []

    async def call(tokens: dict[str, str]) -> None:
        a, b = PreEncodedPublisher(config["ws_url"], media), PreEncodedPublisher(config["ws_url"], media)
        a_view, b_view = CountingSubscriber(config["ws_url"]), CountingSubscriber(config["ws_url"])
        peers.extend((a, b, a_view, b_view))
        for peer, name in ((a, "a"), (b, "b"), (a_view, "a-view"), (b_view, "b-view")):
            await peer.join(tokens[name])
        streams = await asyncio.gather(a.publish(), b.publish())
        for viewer, stream_id in ((a_view, streams[1]), (b_view, streams[0])):
            # Joined before the publish: the stream is announced once its media is up.
            await viewer.client.wait_event("streamCreated", timeout=120, stream__stream_id=stream_id)
            await viewer.subscribe(stream_id)
        while not (a_view.receiving() and b_view.receiving()):
            await asyncio.sleep(0.1)

    try:
        await asyncio.gather(*(call(tokens) for tokens in config["calls"]))
        reply({"calls": len(config["calls"])})
        while line := await reader.readline():
            if json.loads(line)["command"] == "stop":
                break
    except Exception as exc:
        reply({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)


async def main_async(args: argparse.Namespace) -> int:
    from loadtest.media import encode_media, save_media

    with tempfile.TemporaryDirectory(prefix="call-memory-") as tmp:
        media_file = Path(tmp) / "media.bin"
        save_media(encode_media(args.media_seconds), media_file)
        print(f"{'calls':>5} {'idle RSS MiB':>12} {'idle threads':>12} {'RSS MiB':>8} {'threads':>7} "
              f"{'RSS/call MiB':>12} {'threads/call':>12} {'setup s':>7} {'server CPU s':>12} {'clients CPU s':>13}")
        for calls in (int(c) for c in args.calls.split(",")):
            r = await measure(calls, media_file, Path(tmp), args.calls_per_process, args.settle,
                              args.media_connect_timeout_s)
            print(f"{calls:>5} {r['idle_rss_mib']:>12.1f} {r['idle_threads']:>12.0f} {r['rss_mib']:>8.1f} "
                  f"{r['threads']:>7.0f} {r['rss_per_call_mib']:>12.2f} {r['threads_per_call']:>12.2f} "
                  f"{r['setup_s']:>7.1f} {r['setup_server_cpu_s']:>12.1f} {r['setup_clients_cpu_s']:>13.1f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator stops us
        asyncio.run(worker_main())
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="8,16", help="comma-separated numbers of concurrent 1:1 calls")
    parser.add_argument("--calls-per-process", type=int, default=8, help="calls per client process")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before each RSS reading")
    parser.add_argument("--media-connect-timeout-s", type=float, default=15.0,
                        help="the server's media.connect_timeout_s (default 15, the server's default)")
    parser.add_argument("--media-seconds", type=float, default=5.0, help="seconds of media encoded once and looped")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
