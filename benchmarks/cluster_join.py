"""Relayed-signalling benchmark: what a door node adds to a request whose room lives on another
node of the cluster.

Starts a real ``redis-server`` and node A (``openconsult serve`` with ``redis_url``, temp data
dir, free port, ICE on 127.0.0.1), opens ``--rooms`` rooms through A while it is the only node
(so A owns them: each holds a clinician publishing pre-encoded VP8 + Opus and a patient who saw
the stream announced), then starts node B on the same Redis. Then, ``--samples`` times per path,
alternating which path goes first, a new participant:

- opens a WebSocket and joins (``join`` timed with and without the WebSocket connect),
- sends one ``ping`` (the relay's cost with no work behind it),
- publishes a fresh aiortc offer (``publish`` request to its answer, the SDP work on the owner),
- subscribes to the room's stream with a decoding aiortc peer (``subscribe`` sent to the first
  decoded video frame; the media flows straight to the owner, only the signalling is relayed),
- and closes its socket.

*direct* sends it to A (the owner), *relayed* to B (the door relays it through Redis pub/sub).
Each row prints p50/p95/p99 of both paths and what the relay adds at p50 and p95; the host's
1-minute load average is sampled at every participant. ``--warmup`` participants per path go
first, unrecorded.

    .venv/bin/python benchmarks/cluster_join.py [--samples 200] [--rooms 4] [--no-first-frame] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

SECRET = "cluster-join-benchmark-secret-0123456789"
PATHS = ("direct", "relayed")
#: (sample key, row label), in the order the table prints them.
MEASURES = (
    ("join_ms", "join (socket open)"),
    ("connect_join_ms", "connect + join"),
    ("ping_ms", "ping"),
    ("publish_ms", "publish -> answer"),
    ("first_frame_ms", "subscribe -> 1st frame"),
)


@dataclass
class Samples:
    """Milliseconds per path and measure, and the host's load average meanwhile."""

    values: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {path: {key: [] for key, _ in MEASURES} for path in PATHS})
    load: list[float] = field(default_factory=list)

    def add(self, path: str, measured: dict[str, float]) -> None:
        for key, ms in measured.items():
            self.values[path][key].append(ms)
        self.load.append(os.getloadavg()[0])


def compare(direct: list[float], relayed: list[float]) -> dict[str, Any]:
    """Percentiles of both paths and what the relay adds at p50 and p95 (None without samples)."""
    from loadtest.report import percentiles

    d, r = percentiles(direct), percentiles(relayed)

    def added(q: str) -> float | None:
        direct_q, relayed_q = d[q], r[q]
        return None if direct_q is None or relayed_q is None else round(relayed_q - direct_q, 1)

    return {"direct": d, "relayed": r, "added_p50": added("p50"), "added_p95": added("p95")}


def format_table(samples: Samples) -> str:
    """One row per measure that has samples: n, p50/p95/p99 direct and relayed, what the relay adds
    at p50 and p95."""
    head = (f"{'ms':<24} {'n':>4}  {'direct p50':>10} {'p95':>7} {'p99':>7}  "
            f"{'relayed p50':>11} {'p95':>7} {'p99':>7}  {'added p50':>9} {'p95':>7}")
    lines = [head]
    for key, label in MEASURES:
        row = compare(samples.values["direct"][key], samples.values["relayed"][key])
        d, r = row["direct"], row["relayed"]
        if not d["count"] and not r["count"]:
            continue
        n = min(d["count"], r["count"])
        lines.append(f"{label:<24} {n:>4}  {_f(d['p50']):>10} {_f(d['p95']):>7} {_f(d['p99']):>7}  "
                     f"{_f(r['p50']):>11} {_f(r['p95']):>7} {_f(r['p99']):>7}  "
                     f"{_signed(row['added_p50']):>9} {_signed(row['added_p95']):>7}")
    if samples.load:
        lines.append(f"host: {os.cpu_count()} cores, 1-minute load average during the run "
                     f"min {min(samples.load):.2f} mean {sum(samples.load) / len(samples.load):.2f} "
                     f"max {max(samples.load):.2f}")
    return "\n".join(lines)


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Room:
    name: str
    stream_id: str
    closers: list[Any]


async def open_room(ws_url: str, tokens: Any, name: str, media: Any, timeout: float) -> Room:
    """A room opened through ``ws_url``: a clinician publishing, a patient who saw it announced."""
    from loadtest.client import SignallingClient
    from loadtest.peers import PreEncodedPublisher
    from rooms.model import Role

    publisher = PreEncodedPublisher(ws_url, media)
    watcher = SignallingClient(ws_url)
    room = Room(name, "", [publisher, watcher])
    await publisher.join(tokens.mint(name, Role.CLINICIAN, "Dr Anchor"))
    await watcher.connect()
    await watcher.join(tokens.mint(name, Role.PATIENT, "Pat Anchor"))
    room.stream_id = await publisher.publish()
    await watcher.wait_event("streamCreated", timeout=timeout)  # announced once its media is up
    return room


async def participant(ws_url: str, token: str, stream_id: str, first_frame: bool,
                      timeout: float) -> dict[str, float]:
    """One participant's timings (ms) on ``ws_url``; see the module docstring."""
    from loadtest.client import SignallingClient
    from tests.helpers import wait_until
    from tests.media.peers import Subscriber, publisher_offer

    offer = await publisher_offer()  # gathered before the clock starts: the client's own work
    subscriber: Subscriber | None = None
    client = SignallingClient(ws_url)
    measured: dict[str, float] = {}
    try:
        start = time.perf_counter()
        await client.connect()
        opened = time.perf_counter()
        await client.request("join", timeout=timeout, token=token)
        joined = time.perf_counter()
        measured["join_ms"] = (joined - opened) * 1000
        measured["connect_join_ms"] = (joined - start) * 1000

        start = time.perf_counter()
        await client.request("ping", timeout=timeout)
        measured["ping_ms"] = (time.perf_counter() - start) * 1000

        start = time.perf_counter()
        await client.request("publish", timeout=timeout,
                             offer={"type": "offer", "sdp": offer.localDescription.sdp})
        measured["publish_ms"] = (time.perf_counter() - start) * 1000

        if first_frame:
            subscriber = Subscriber()
            started = time.monotonic()  # the clock Subscriber stamps its frames with
            data = await client.request("subscribe", timeout=timeout, stream_id=stream_id)
            answer = await subscriber.answer(data["offer"]["sdp"])
            await client.request("answer", timeout=timeout, subscription_id=data["subscription_id"],
                                 answer={"type": "answer", "sdp": answer})
            received = subscriber.received
            await wait_until(lambda: received.first_frame_at is not None, timeout=timeout, interval=0.002,
                             message="the first decoded video frame")
            assert received.first_frame_at is not None
            measured["first_frame_ms"] = (received.first_frame_at - started) * 1000
    finally:
        if subscriber is not None:
            await subscriber.close()
        await offer.close()
        await client.close()
    return measured


def scrape(url: str) -> dict[str, float]:
    """Unlabelled series -> value, from a node's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


async def run(args: argparse.Namespace) -> Samples:
    from loadtest.media import encode_media
    from rooms.model import Role
    from signalling.auth import TokenAuthority
    from tests.helpers import wait_until
    from tests.redis_server import redis_server
    from tests.server import ServerProcess, start_server

    tokens = TokenAuthority("HS256", SECRET, SECRET, leeway_s=30)
    config = f'[auth]\nsecret = "{SECRET}"\n'
    media = await asyncio.to_thread(encode_media, 4.0, bitrate=500_000, keyframe_interval=60)
    samples = Samples()
    rooms: list[Room] = []
    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="openconsult-cluster-join-") as tmp, redis_server() as redis:
        env = {"OPENCONSULT_REDIS_URL": redis.url}
        try:
            a = await asyncio.to_thread(start_server, Path(tmp) / "a", config, env=env)
            servers.append(a)
            # A is the only node: every room opened now is placed on it and stays there (its lease
            # is renewed while the room holds anyone).
            for i in range(args.rooms):
                rooms.append(await open_room(a.ws_url, tokens, f"bench-{i}", media, args.timeout))
            b = await asyncio.to_thread(start_server, Path(tmp) / "b", config, env=env)
            servers.append(b)
            await wait_until(lambda: all(scrape(n.url)["openconsult_cluster_nodes"] == 2 for n in (a, b)),
                             timeout=30, interval=0.2, message="both nodes seeing each other")
            owned = [scrape(n.url)["openconsult_cluster_rooms_owned"] for n in (a, b)]
            if owned != [args.rooms, 0]:
                raise RuntimeError(f"rooms owned by A, B: {owned}; expected all {args.rooms} on A")
            urls = {"direct": a.ws_url, "relayed": b.ws_url}
            print(f"redis {redis.url}, A {a.url} owns {args.rooms} rooms, B {b.url} relays to it; "
                  f"{args.warmup} warm-up + {args.samples} participants per path", file=sys.stderr)

            count = 0
            for i in range(args.warmup + args.samples):
                for path in (PATHS if i % 2 == 0 else PATHS[::-1]):
                    room = rooms[count % len(rooms)]
                    count += 1
                    token = tokens.mint(room.name, Role.PATIENT, f"Pat {count}")
                    measured = await participant(urls[path], token, room.stream_id, args.first_frame, args.timeout)
                    if i >= args.warmup:
                        samples.add(path, measured)
                if i == 0:
                    # Relayed for real: B relayed that participant (and never took a room).
                    door = scrape(b.url)
                    if door.get("openconsult_cluster_rooms_owned") != 0:
                        raise RuntimeError("B took a room: the relayed path is not relayed")
                if (i + 1) % 50 == 0:
                    print(f"  {i + 1} / {args.warmup + args.samples}, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
        finally:
            for room in rooms:
                for closer in room.closers:
                    await closer.close()
            for server in reversed(servers):
                await asyncio.to_thread(server.stop)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="participants per path (default 200)")
    parser.add_argument("--warmup", type=int, default=5, help="unrecorded participants per path first (default 5)")
    parser.add_argument("--rooms", type=int, default=4,
                        help="rooms on A, taken in turn (spaces out each stream's keyframe requests; default 4)")
    parser.add_argument("--no-first-frame", dest="first_frame", action="store_false",
                        help="skip the subscription (no time to first frame)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per request (default 30)")
    parser.add_argument("--json", help="also write the samples and the table's figures to this file")
    args = parser.parse_args(argv)
    for name in ("samples", "rooms"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    started = time.monotonic()
    samples = asyncio.run(run(args))
    print(format_table(samples))
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.json:
        figures = {key: compare(samples.values["direct"][key], samples.values["relayed"][key]) for key, _ in MEASURES}
        Path(args.json).write_text(json.dumps({"figures": figures, "samples": samples.values,
                                               "load": samples.load}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
