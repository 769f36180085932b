"""Forwarding benchmark: how many RTP packets the SFU sends per second of its own CPU.

For each K: start a real ``python -m signalling.cli serve`` (temp data dir, free
port, ICE on 127.0.0.1 only), one publisher process sending pre-encoded VP8
(~1 Mbps, 30 fps) + Opus, and K counting subscribers (no decoding) spread over
``ceil(K / subs_per_process)`` client processes. Once every subscriber receives
audio and video and a warm-up has passed, measure over a window: the server's
CPU seconds (utime + stime from /proc/<pid>/stat, all threads), the packets the
subscribers received, the client processes' CPU and the whole host's busy CPU.

Speed figures are only comparable within one run on these shared machines, so
every row also measures, in this process, right after its window, a reference:
a Python loop doing the irreducible work of a packet out of a Python SFU (build
a 12-byte RTP header, SRTP-protect with libsrtp, ``sendto`` on loopback to a
socket another process drains), and the plain ``sendto`` loop alone. The ratio is server packets per CPU-second over
the SRTP reference's packets per CPU-second.

    .venv/bin/python benchmarks/forwarding.py [--k 1,4,16,32] [--seconds 10] [--janus]

With ``--janus``, every K is also run against Debian's ``janus`` (installed when
missing; see benchmarks/janus.py) with its videoroom plugin, once with Janus's
defaults and once per ``--janus-event-loops`` value, with the same publisher,
subscribers and window, and the run ends with OpenConsult ÷ Janus per K. With
``--calls 8,16`` it runs N concurrent 1:1 calls instead (each its own room, both
participants publishing and subscribing to each other), the K column reading N.

Client processes are this file run as ``python -m benchmarks.forwarding worker``;
they read one JSON config line on stdin, then answer ``counts``/``stop`` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

TICKS = os.sysconf("SC_CLK_TCK")
TARGET_K32 = 20_000  # packets out per server CPU-second at K = 32 (this issue)


# --- measuring ------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads) in seconds, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


@dataclass(frozen=True)
class Reference:
    srtp_sendto_per_cpu_s: float
    sendto_per_cpu_s: float


_DRAIN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(5)
print(s.getsockname()[1], flush=True)
buffer = bytearray(2048)
try:
    while True:
        s.recv_into(buffer)
except OSError:
    pass
"""


def reference(cpu_seconds: float = 0.5, size: int = 1100) -> Reference:
    """Packets per CPU-second (this thread's CPU) of two trivial loops sending to a
    loopback socket that another process drains, as a client does: the kernel
    delivers each datagram and wakes the reader in the sender's context, the
    same cost the server's ``sendto`` pays for a subscriber on loopback."""
    from pylibsrtp import Policy, Session

    drain = subprocess.Popen([sys.executable, "-c", _DRAIN], stdout=subprocess.PIPE)
    assert drain.stdout is not None
    address = ("127.0.0.1", int(drain.stdout.readline()))
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    policy = Policy(key=os.urandom(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                    srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
    session = Session(policy=policy)
    payload = os.urandom(size)
    pack = struct.Struct("!BBHII").pack

    def srtp_loop(n: int, seq: int) -> None:
        for i in range(seq, seq + n):
            data = pack(0x80, 96, i & 0xFFFF, i * 3000 & 0xFFFFFFFF, 0x1234) + payload
            out.sendto(session.protect(data), address)

    def plain_loop(n: int, seq: int) -> None:
        packet = pack(0x80, 96, 1, 1, 0x1234) + payload
        for _ in range(n):
            out.sendto(packet, address)

    rates = []
    try:
        for loop in (srtp_loop, plain_loop):
            done, start = 0, time.thread_time()
            while (elapsed := time.thread_time() - start) < cpu_seconds:
                loop(500, done)
                done += 500
            rates.append(done / elapsed)
    finally:
        out.close()
        drain.kill()
        drain.wait()
    return Reference(rates[0], rates[1])


@dataclass(frozen=True)
class Result:
    k: int
    client_processes: int
    window_s: float
    packets: int
    packets_per_s: float
    server_cpu_s: float
    server_cpu_pct: float
    packets_per_server_cpu_s: float
    clients_cpu_pct: float
    host_busy_pct: float
    reference: Reference
    ratio: float
    keyframe_requests: int
    server: str = "openconsult"


# --- the orchestrator ------------------------------------------------------------


class Worker:
    """A client process speaking JSON lines on stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    async def start(cls, config: dict[str, Any]) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.forwarding", "worker", cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        worker = cls(proc)
        await worker.send(config)
        return worker

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def reply(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker {self.pid} exited ({await self.proc.wait()}) without answering")
        data: dict[str, Any] = json.loads(line)
        if "error" in data:
            raise RuntimeError(f"worker {self.pid}: {data['error']}")
        return data

    async def ask(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        await self.send({"command": command})
        return await self.reply(timeout)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                await self.send({"command": "stop"})
                await asyncio.wait_for(self.proc.wait(), 10)
            except (OSError, asyncio.TimeoutError):
                self.proc.kill()
                await self.proc.wait()


async def run_forwarding(k: int, seconds: float = 10.0, workdir: Path | None = None, subs_per_process: int = 16,
                         media_seconds: float = 10.0, warmup_s: float = 2.0, media_file: Path | None = None,
                         connect_timeout: float = 90.0, profile: Path | None = None,
                         janus_event_loops: int | None = None) -> Result:
    """One benchmark row: a fresh server, 1 publisher, ``k`` counting subscribers.
    With ``profile``, py-spy samples the server during the window into that file
    (collapsed stacks); the profiler's own cost then inflates the CPU figures.
    With ``janus_event_loops`` (0: Janus's default), the server is Janus instead."""
    from benchmarks.janus import JanusProcess, start_janus
    from loadtest.media import encode_media, save_media
    from rooms.model import Role
    from signalling.auth import TokenAuthority, load_or_create_secret
    from tests.server import ServerProcess, start_server

    with tempfile.TemporaryDirectory(prefix="forwarding-") as tmp:
        base = workdir or Path(tmp)
        if media_file is None:
            media_file = base / "media.bin"
            save_media(encode_media(media_seconds), media_file)
        server: ServerProcess | JanusProcess
        if janus_event_loops is None:
            server = await asyncio.to_thread(start_server, base / f"server-k{k}")
            label = "openconsult"
        else:
            (base / f"janus-k{k}-e{janus_event_loops}").mkdir(parents=True)
            server = await asyncio.to_thread(start_janus, base / f"janus-k{k}-e{janus_event_loops}",
                                             janus_event_loops)
            label = f"janus event_loops={janus_event_loops}" if janus_event_loops else "janus default"
        workers: list[Worker] = []
        try:
            # Both servers get the same worker configs; the keys say whose API to speak.
            publisher_config: dict[str, Any]
            subscriber_config: Callable[[list[str]], dict[str, Any]]
            if isinstance(server, JanusProcess):
                janus_keys = {"janus_url": server.ws_url, "ice_address": server.ice_address}
                publisher_config = {"role": "publisher", **janus_keys}

                def subscriber_config(names: list[str]) -> dict[str, Any]:
                    return {"role": "subscribers", **janus_keys, "stream_id": stream_id, "tokens": names}
            else:
                secret = load_or_create_secret(server.data_dir, create=False)
                tokens = TokenAuthority("HS256", secret, secret, 30)
                room = f"bench-{uuid.uuid4().hex[:8]}"
                ws_url = server.ws_url
                publisher_config = {"role": "publisher", "ws_url": ws_url,
                                    "token": tokens.mint(room, Role.PATIENT, "publisher")}

                def subscriber_config(names: list[str]) -> dict[str, Any]:
                    return {"role": "subscribers", "ws_url": ws_url, "stream_id": stream_id,
                            "tokens": [tokens.mint(room, Role.PATIENT, name) for name in names]}
            publisher = await Worker.start({**publisher_config, "media_file": str(media_file)})
            workers.append(publisher)
            stream_id = (await publisher.reply(connect_timeout))["stream_id"]
            processes = max(1, math.ceil(k / subs_per_process))
            for p in range(processes):
                workers.append(await Worker.start(subscriber_config(
                    [f"sub-{i}" for i in range(k) if i % processes == p])))
            subscribers = workers[1:]
            for worker in subscribers:
                await worker.reply(connect_timeout)
            deadline = time.monotonic() + connect_timeout
            while not all([(await w.ask("counts"))["receiving"] for w in subscribers]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not every subscriber received audio and video within {connect_timeout}s")
                await asyncio.sleep(0.2)
            await asyncio.sleep(warmup_s)

            async def snapshot() -> tuple[float, int, float, float, tuple[float, float]]:
                counts = await asyncio.gather(*(w.ask("counts") for w in subscribers))
                return (time.monotonic(), sum(c["packets"] for c in counts), process_cpu_s(server.proc.pid),
                        sum(process_cpu_s(w.pid) for w in workers), host_cpu())

            spy = None
            if profile is not None:
                spy = await asyncio.create_subprocess_exec(
                    str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(server.proc.pid),
                    "--duration", str(max(1, round(seconds))), "--rate", "200", "--native", "--format", "raw",
                    "--output", str(profile), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            t0, packets0, server0, clients0, host0 = await snapshot()
            await asyncio.sleep(seconds)
            t1, packets1, server1, clients1, host1 = await snapshot()
            if spy is not None:
                await asyncio.wait_for(spy.wait(), 30)
            keyframe_requests = int((await publisher.ask("counts"))["keyframe_requests"])
            ref = reference()
        finally:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
            await asyncio.to_thread(server.stop)
    window = t1 - t0
    packets = packets1 - packets0
    server_cpu = server1 - server0
    per_cpu = packets / server_cpu if server_cpu > 0 else math.inf
    return Result(
        k=k, client_processes=len(workers), window_s=window, packets=packets, packets_per_s=packets / window,
        server_cpu_s=server_cpu, server_cpu_pct=100 * server_cpu / window, packets_per_server_cpu_s=per_cpu,
        clients_cpu_pct=100 * (clients1 - clients0) / window,
        host_busy_pct=100 * (host1[0] - host0[0]) / max(1.0, host1[1] - host0[1]) * (os.cpu_count() or 1),
        reference=ref, ratio=per_cpu / ref.srtp_sendto_per_cpu_s, keyframe_requests=keyframe_requests,
        server=label)


HEADER = (f"{'server':<22} {'K':>3} {'procs':>5} {'window s':>8} {'pkts out':>9} {'pkts/s':>8} {'server CPU %':>12} "
          f"{'pkts/server CPU-s':>17} {'clients CPU %':>13} {'host busy %':>11} "
          f"{'ref srtp+sendto/CPU-s':>21} {'ref sendto/CPU-s':>16} {'ratio':>6} {'PLIs':>4}")


def format_row(r: Result) -> str:
    return (f"{r.server:<22} {r.k:>3} {r.client_processes:>5} {r.window_s:>8.1f} {r.packets:>9} "
            f"{r.packets_per_s:>8.0f} {r.server_cpu_pct:>12.1f} {r.packets_per_server_cpu_s:>17.0f} "
            f"{r.clients_cpu_pct:>13.1f} {r.host_busy_pct:>11.1f} {r.reference.srtp_sendto_per_cpu_s:>21.0f} "
            f"{r.reference.sendto_per_cpu_s:>16.0f} {r.ratio:>6.3f} {r.keyframe_requests:>4}")


_IDLE_LEAVES = ("epoll_pwait", "epoll_wait", "select", "poll")


def summarize_profile(path: Path, top: int = 30) -> str:
    """The server's busy event-loop samples from py-spy's collapsed stacks
    ("frame;frame;… count" lines, native frames included): per function, the
    share of samples it is on the stack (inclusive) and innermost (self).
    Samples of other threads (all idle waiting here) and of the loop waiting in
    epoll are left out, so 100 % is the event loop's CPU time."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        names = [frame.split(" (")[0] for frame in stack.split(";")]
        if "run_forever" not in names or names[-1] in _IDLE_LEAVES:
            continue
        count = int(count_text)
        total += count
        for name in set(names):
            inclusive[name] = inclusive.get(name, 0) + count
        own[names[-1]] = own.get(names[-1], 0) + count
    if not total:
        return f"profile {path}: no busy samples"
    lines = [f"profile {path}: {total} busy event-loop samples (200 Hz)", f"{'incl %':>7} {'self %':>7}  function"]
    shown = [kv for kv in sorted(inclusive.items(), key=lambda kv: -kv[1]) if kv[1] < 0.99 * total]
    for name, count in shown[:top]:
        lines.append(f"{100 * count / total:>7.1f} {100 * own.get(name, 0) / total:>7.1f}  {name}")
    return "\n".join(lines)


async def run_calls(calls: int, seconds: float, workdir: Path, media_file: Path, calls_per_process: int = 8,
                    warmup_s: float = 2.0, connect_timeout: float = 180.0,
                    janus_event_loops: int | None = None) -> Result:
    """One 1:1 row: a fresh server and ``calls`` concurrent calls, each its own room where both
    participants publish and subscribe to the other (two publishes, two subscriptions).
    ``k`` in the result is the number of calls; PLIs are not counted."""
    from benchmarks.janus import JanusProcess, start_janus
    from rooms.model import Role
    from signalling.auth import TokenAuthority, load_or_create_secret
    from tests.server import ServerProcess, start_server

    server: ServerProcess | JanusProcess
    if janus_event_loops is None:
        server = await asyncio.to_thread(start_server, workdir / f"server-calls{calls}",
                                         f"max_peer_connections = {4 * calls + 8}\n")
        label = "openconsult"
    else:
        server = await asyncio.to_thread(start_janus, workdir / f"janus-calls{calls}-e{janus_event_loops}",
                                         janus_event_loops)
        label = f"janus event_loops={janus_event_loops}" if janus_event_loops else "janus default"
    workers: list[Worker] = []
    try:
        processes = max(1, math.ceil(calls / calls_per_process))
        for p in range(processes):
            mine = [i for i in range(calls) if i % processes == p]
            if isinstance(server, JanusProcess):
                config: dict[str, Any] = {"janus_url": server.ws_url, "ice_address": server.ice_address,
                                          "rooms": [2000 + i for i in mine]}
            else:
                secret = load_or_create_secret(server.data_dir, create=False)
                tokens = TokenAuthority("HS256", secret, secret, 30)
                rooms = [f"call-{uuid.uuid4().hex[:8]}" for _ in mine]
                config = {"ws_url": server.ws_url, "calls": [
                    {name: tokens.mint(room, Role.PATIENT, name) for name in ("a", "a-view", "b", "b-view")}
                    for room in rooms]}
            workers.append(await Worker.start({"role": "calls", "media_file": str(media_file), **config}))
        for worker in workers:
            await worker.reply(connect_timeout)
        deadline = time.monotonic() + connect_timeout
        while not all([(await w.ask("counts"))["receiving"] for w in workers]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every participant received audio and video within {connect_timeout}s")
            await asyncio.sleep(0.2)
        await asyncio.sleep(warmup_s)

        async def snapshot() -> tuple[float, int, float, float, tuple[float, float]]:
            counts = await asyncio.gather(*(w.ask("counts") for w in workers))
            return (time.monotonic(), sum(c["packets"] for c in counts), process_cpu_s(server.proc.pid),
                    sum(process_cpu_s(w.pid) for w in workers), host_cpu())

        t0, packets0, server0, clients0, host0 = await snapshot()
        await asyncio.sleep(seconds)
        t1, packets1, server1, clients1, host1 = await snapshot()
        ref = reference()
    finally:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        await asyncio.to_thread(server.stop)
    window, packets, server_cpu = t1 - t0, packets1 - packets0, server1 - server0
    per_cpu = packets / server_cpu if server_cpu > 0 else math.inf
    return Result(
        k=calls, client_processes=len(workers), window_s=window, packets=packets, packets_per_s=packets / window,
        server_cpu_s=server_cpu, server_cpu_pct=100 * server_cpu / window, packets_per_server_cpu_s=per_cpu,
        clients_cpu_pct=100 * (clients1 - clients0) / window,
        host_busy_pct=100 * (host1[0] - host0[0]) / max(1.0, host1[1] - host0[1]) * (os.cpu_count() or 1),
        reference=ref, ratio=per_cpu / ref.srtp_sendto_per_cpu_s, keyframe_requests=0, server=label)


def janus_table(results: list[Result], unit: str = "K") -> str:
    """OpenConsult's packets out per server CPU-second over each Janus setup's, per K
    (``unit`` "N": per number of 1:1 calls)."""
    janus_servers = list(dict.fromkeys(r.server for r in results if r.server != "openconsult"))
    by_key = {(r.server, r.k): r.packets_per_server_cpu_s for r in results}
    lines = ["OpenConsult ÷ Janus, packets out per server CPU-second (> 1: OpenConsult forwards more per CPU-second):",
             f"{unit:>3} {'openconsult':>12} " + " ".join(f"{s:>22} {'ratio':>6}" for s in janus_servers)]
    for k in dict.fromkeys(r.k for r in results):
        ours = by_key.get(("openconsult", k), math.nan)
        cells = []
        for name in janus_servers:
            theirs = by_key.get((name, k), math.nan)
            cells.append(f"{theirs:>22.0f} {ours / theirs if theirs else math.nan:>6.2f}")
        lines.append(f"{k:>3} {ours:>12.0f} " + " ".join(cells))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    from loadtest.media import encode_media, save_media

    ks = [int(k) for k in args.k.split(",")]
    janus_loops = [0, *(int(n) for n in args.janus_event_loops.split(",") if n)] if args.janus else []
    if janus_loops:
        from benchmarks.janus import ensure_janus

        ensure_janus()  # install before the first window, not during it
    with tempfile.TemporaryDirectory(prefix="forwarding-") as tmp:
        media_file = Path(tmp) / "media.bin"
        media = encode_media(args.media_seconds)
        save_media(media, media_file)
        print(f"media: {len(media.video)} VP8 frames ({media.video_bitrate / 1000:.0f} kbps, "
              f"{sum(f.keyframe for f in media.video)} keyframes), {len(media.audio)} Opus frames; "
              f"host: {os.cpu_count()} CPUs", flush=True)
        print(HEADER.replace("  K", "  N") if args.calls else HEADER, flush=True)
        results = []
        for calls in [int(n) for n in args.calls.split(",") if n]:
            for loops in [None, *janus_loops]:
                result = await run_calls(calls, args.seconds, Path(tmp), media_file, warmup_s=args.warmup,
                                         janus_event_loops=loops)
                results.append(result)
                print(format_row(result), flush=True)
        for k in ks if not args.calls else []:
            profile = Path(f"{args.profile}-k{k}.txt") if args.profile else None
            result = await run_forwarding(k, args.seconds, Path(tmp), args.subs_per_process,
                                          warmup_s=args.warmup, media_file=media_file, profile=profile)
            results.append(result)
            print(format_row(result), flush=True)
            if profile is not None:
                print(summarize_profile(profile), flush=True)
            for loops in janus_loops:
                result = await run_forwarding(k, args.seconds, Path(tmp), args.subs_per_process,
                                              warmup_s=args.warmup, media_file=media_file,
                                              janus_event_loops=loops)
                results.append(result)
                print(format_row(result), flush=True)
    print("pkts out = RTP packets received by all subscribers in the window; the ratio is "
          "pkts/server CPU-s over the SRTP+sendto reference measured in this run.")
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    if janus_loops:
        print(janus_table(results, "N" if args.calls else "K"))
    for r in results:
        if r.k == 32 and r.server == "openconsult":
            verdict = "meets" if r.packets_per_server_cpu_s >= TARGET_K32 else "MISSES"
            print(f"K=32: {r.packets_per_server_cpu_s:.0f} packets out per server CPU-second "
                  f"{verdict} the target of {TARGET_K32}")
    return 0


# --- the client processes ----------------------------------------------------------


async def worker_main() -> None:
    """A client process: a publisher or a group of counting subscribers."""
    from loadtest.media import load_media
    from loadtest.peers import CountingSubscriber, PreEncodedPublisher
    from benchmarks.janus import JanusPublisher, JanusSubscriber
    from media.aiortc_internals import configure_ice_addresses

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    config = json.loads(await reader.readline())
    configure_ice_addresses((config.get("ice_address", "127.0.0.1"),))
    publisher: PreEncodedPublisher | JanusPublisher | None = None
    subscribers: list[CountingSubscriber] | list[JanusSubscriber] = []
    closers: list[Any] = []
    try:
        if config["role"] == "calls":
            subscribers = await _start_calls(config, closers)
            reply({"calls": len(subscribers) // 2})
        elif "janus_url" in config and config["role"] == "publisher":
            publisher = JanusPublisher(config["janus_url"], load_media(Path(config["media_file"])))
            reply({"stream_id": await publisher.publish()})
        elif "janus_url" in config:
            subscribers = janus_subscribers = [JanusSubscriber(config["janus_url"]) for _ in config["tokens"]]
            await asyncio.gather(*(s.subscribe(int(config["stream_id"])) for s in janus_subscribers))
            reply({"subscribed": len(subscribers)})
        elif config["role"] == "publisher":
            publisher = PreEncodedPublisher(config["ws_url"], load_media(Path(config["media_file"])))
            await publisher.join(config["token"])
            reply({"stream_id": await publisher.publish()})
        else:
            subscribers = counting = [CountingSubscriber(config["ws_url"]) for _ in config["tokens"]]

            async def start(sub: CountingSubscriber, token: str) -> None:
                joined = await sub.join(token)
                if all(s["stream_id"] != config["stream_id"] for s in joined["streams"]):
                    # A stream is live (subscribable) once its media is up: wait for its announcement.
                    await sub.client.wait_event("streamCreated", stream__stream_id=config["stream_id"])
                await sub.subscribe(config["stream_id"])

            await asyncio.gather(*(start(s, t) for s, t in zip(counting, config["tokens"])))
            reply({"subscribed": len(subscribers)})
        while line := await reader.readline():
            command = json.loads(line)["command"]
            if command == "stop":
                break
            if command == "counts":
                reply({"packets": sum(s.packets for s in subscribers), "octets": sum(s.octets for s in subscribers),
                       "receiving": all(s.receiving() for s in subscribers),
                       "keyframe_requests": publisher.keyframe_requests if publisher else 0})
    except Exception as exc:
        reply({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        await asyncio.gather(*(s.close() for s in subscribers), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in closers), return_exceptions=True)
        if publisher is not None:
            await publisher.close()


async def _start_calls(config: dict[str, Any], closers: list[Any]) -> Any:
    """Set up this worker's 1:1 calls; return their counting subscribers (two per call).
    Publishers go into ``closers``."""
    from benchmarks.janus import JanusPublisher, JanusSubscriber
    from loadtest.media import load_media
    from loadtest.peers import CountingSubscriber, PreEncodedPublisher

    media = load_media(Path(config["media_file"]))
    views: list[Any] = []

    async def janus_call(room: int) -> None:
        a, b = JanusPublisher(config["janus_url"], media), JanusPublisher(config["janus_url"], media)
        a_view, b_view = JanusSubscriber(config["janus_url"]), JanusSubscriber(config["janus_url"])
        closers.extend((a, b))
        views.extend((a_view, b_view))
        feed_a = await a.publish("a", room, create=True)
        feed_b = await b.publish("b", room)
        await asyncio.gather(a_view.subscribe(feed_b, room), b_view.subscribe(feed_a, room))

    async def call(tokens: dict[str, str]) -> None:
        a, b = PreEncodedPublisher(config["ws_url"], media), PreEncodedPublisher(config["ws_url"], media)
        a_view, b_view = CountingSubscriber(config["ws_url"]), CountingSubscriber(config["ws_url"])
        closers.extend((a, b))
        views.extend((a_view, b_view))
        for peer, name in ((a, "a"), (b, "b"), (a_view, "a-view"), (b_view, "b-view")):
            await peer.join(tokens[name])
        streams = await asyncio.gather(a.publish(), b.publish())
        for viewer, stream_id in ((a_view, streams[1]), (b_view, streams[0])):
            # Joined before the publish: the stream is announced once its media is up.
            await viewer.client.wait_event("streamCreated", timeout=120, stream__stream_id=stream_id)
            await viewer.subscribe(stream_id)

    if "janus_url" in config:
        await asyncio.gather(*(janus_call(room) for room in config["rooms"]))
    else:
        await asyncio.gather(*(call(tokens) for tokens in config["calls"]))
    return views


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator stops us
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
        asyncio.run(worker_main())
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="1,4,16,32", help="comma-separated subscriber counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window per K")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds after every subscriber receives")
    parser.add_argument("--subs-per-process", type=int, default=16, help="counting subscribers per client process")
    parser.add_argument("--media-seconds", type=float, default=10.0, help="seconds of media encoded once and looped")
    parser.add_argument("--profile", default="",
                        help="py-spy the server during each window into <PROFILE>-k<K>.txt and print a summary "
                             "(the profiler's cost inflates that run's CPU figures)")
    parser.add_argument("--janus", action="store_true",
                        help="also run every K against Debian's janus (installed when missing) and print "
                             "OpenConsult ÷ Janus per K")
    parser.add_argument("--calls", default="",
                        help="comma-separated counts of concurrent 1:1 calls to run instead of the K fan-out "
                             "(each call: two participants publishing and subscribing to each other; K is then "
                             "the number of calls)")
    parser.add_argument("--janus-event-loops", default="2",
                        help="comma-separated event_loops settings run besides Janus's default")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
