"""The load-test runner: schedules a planned call script's participants over N generator
processes and gathers what they measured.

The parent (``run``) checks the server is reachable, opens the scripts' waiting rooms, encodes
the media once into the disk cache, starts ``processes`` workers (multiprocessing, spawn),
waits until every worker is ready, then starts them together. Rooms are dealt to workers
round-robin, so a room's participants share one process and one clock. Each worker runs one
asyncio loop with one task per room (``_Room``) and reports a small progress summary every
second and its full results at the end over a multiprocessing queue. While they run, the
parent scrapes the server's ``/metrics`` every second (CPU, RSS, counters) and feeds the live
display. SIGINT (Ctrl-C) or the end of the script's duration tells the workers to stop: each
participant leaves cleanly, the workers send what they have, and the report is written either
way (``partial`` says which).

Times a worker measures are durations on its own ``time.monotonic()``; chat latency compares a
send and a receipt that may be in different workers, so it uses wall-clock ``time.time()`` (one
machine, one clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import queue
import signal
import time
import traceback
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.script import CallScript, NetworkSpec, ParticipantPlan, PublishSpec, RoomPlan

#: How often workers send a progress summary and the parent scrapes /metrics.
TICK_S = 1.0
#: How long a stopping worker may take to leave and report.
STOP_GRACE_S = 20.0


class RunError(Exception):
    """The run could not start (server unreachable, no secret, a worker died)."""


@dataclass(frozen=True)
class Target:
    """Where and how to connect: the server's base URL and the HS256 secret for tokens."""

    url: str
    secret: str

    @property
    def ws_url(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


@dataclass(frozen=True)
class WorkerArgs:
    index: int
    target: Target
    rooms: tuple[RoomPlan, ...]
    duration_s: float
    cache_dir: str | None


@dataclass
class RunResult:
    """What the parent gathered; ``report.build_report`` turns it into the report."""

    script: CallScript
    url: str
    processes: int
    started_wall: float
    elapsed_s: float = 0.0
    partial: bool = False
    stop_reason: str = "completed"
    workers: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    server_samples: list[dict[str, float]] = field(default_factory=list)
    counters_before: dict[str, float] = field(default_factory=dict)
    counters_after: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# --- Parent side ----------------------------------------------------------------------------


def read_secret(secret: str | None, data_dir: str | None) -> str:
    """The HS256 secret: ``--secret`` (a file holding it, or the value) or ``<data-dir>/jwt-secret``."""
    if secret:
        path = Path(secret)
        value = path.read_text().strip() if path.is_file() else secret
    elif data_dir:
        path = Path(data_dir) / "jwt-secret"
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise RunError(f"cannot read the server's secret {path}: {exc.strerror or exc}") from None
    else:
        raise RunError("tokens need the server's secret: give --secret FILE or --data-dir DIR")
    if len(value) < 32:
        raise RunError("the secret is shorter than 32 characters: give the server's jwt-secret file")
    return value


async def preflight(url: str, timeout: float = 2.5) -> None:
    """Fail fast (within ``timeout``) with a clear message when the server is not there."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(url.rstrip("/") + "/healthz") as response:
                if response.status != 200:
                    raise RunError(f"the server at {url} answered /healthz with HTTP {response.status}")
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise RunError(f"cannot reach the server at {url}: {reason}") from None


async def scrape_metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every sample of ``/metrics`` as ``{"name{label=\"v\"}": value}``. A server run with
    ``--workers`` labels each worker's samples ``worker="i"``: they are kept, and also summed
    without that label, so ``process_cpu_seconds_total`` is the whole host's (100 % per core)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(url.rstrip("/") + "/metrics") as response:
        text = await response.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[_sample_key(sample.name, sample.labels)] = float(sample.value)
            if "worker" in sample.labels:
                host = _sample_key(sample.name, {k: v for k, v in sample.labels.items() if k != "worker"})
                out[host] = out.get(host, 0.0) + float(sample.value)
    return out


def _sample_key(name: str, labels: dict[str, str]) -> str:
    text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{text}}}" if text else name


def _staff_token(target: Target, role: str, user: str, department: str) -> str:
    from rooms.model import Role
    from signalling.auth import TokenAuthority

    authority = TokenAuthority("HS256", target.secret, target.secret, leeway_s=30)
    return authority.mint("staff", Role(role), user, sub=user, departments=[department], ttl_s=6 * 3600)


async def open_waiting_rooms(target: Target, script: CallScript) -> None:
    """Create every waiting room the script's workflow rooms use (one that exists is fine)."""
    wanted = {(r.workflow.waiting_room, r.workflow.department) for r in script.rooms if r.workflow is not None}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for room_id, department in sorted(wanted):
            token = _staff_token(target, "department_admin", "loadtest-admin", department)
            async with http.post(target.url.rstrip("/") + "/api/waiting-rooms",
                                 json={"room_id": room_id, "name": room_id, "department": department},
                                 headers={"Authorization": f"Bearer {token}"}) as response:
                if response.status not in (201, 409):
                    raise RunError(f"cannot open waiting room {room_id}: HTTP {response.status} {await response.text()}")


def media_specs(script: CallScript) -> list[PublishSpec]:
    return sorted({p.publish for r in script.rooms for p in r.participants if p.publish is not None},
                  key=lambda s: dataclasses.astuple(s))


async def prepare_media(script: CallScript, cache_dir: str | None) -> None:
    """Encode each distinct publish spec once into the disk cache, before the workers start."""
    from loadtest.synthetic import encoded_media

    for spec in media_specs(script):
        await encoded_media(_media_spec(spec), Path(cache_dir) if cache_dir else None)


def deal(rooms: tuple[RoomPlan, ...], processes: int) -> list[tuple[RoomPlan, ...]]:
    """Rooms round-robin over ``processes`` workers (in start order, so each ramps evenly)."""
    ordered = sorted(rooms, key=lambda r: r.start_s)
    return [tuple(ordered[i::processes]) for i in range(processes)]


async def run(script: CallScript, target: Target, processes: int = 1, cache_dir: str | None = None,
              on_tick: Callable[[dict[str, Any]], None] | None = None,
              stop_requested: asyncio.Event | None = None) -> RunResult:
    """Run ``script`` against ``target``; ``on_tick`` gets the live totals every second;
    setting ``stop_requested`` (the CLI does on SIGINT) ends the run early."""
    await preflight(target.url)
    await open_waiting_rooms(target, script)
    await prepare_media(script, cache_dir)
    stop_requested = stop_requested or asyncio.Event()
    if stop_requested.is_set():  # Ctrl-C while encoding: nothing ran, an empty partial report
        return RunResult(script, target.url, 0, time.time(), partial=True, stop_reason="interrupted")
    processes = max(1, min(processes, len(script.rooms)))
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[Any, ...]] = ctx.Queue()
    start, stop = ctx.Event(), ctx.Event()
    workers = [ctx.Process(target=worker_main, name=f"loadtest-worker-{i}", daemon=True,
                           args=(WorkerArgs(i, target, rooms, script.duration_s, cache_dir), results, start, stop))
               for i, rooms in enumerate(deal(script.rooms, processes))]
    result = RunResult(script, target.url, processes, time.time())
    latest: dict[int, dict[str, Any]] = {}
    finals: dict[int, dict[str, Any]] = {}

    def drain() -> list[tuple[Any, ...]]:
        got = []
        while True:
            try:
                got.append(results.get_nowait())
            except queue.Empty:
                return got

    for w in workers:
        w.start()
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    try:
        # Wait until every worker has imported and loaded its media, then start them together.
        ready: set[int] = set()
        deadline = time.monotonic() + 120
        while len(ready) < len(workers):
            for message in drain():
                if message[0] == "ready":
                    ready.add(message[1])
                elif message[0] == "error":
                    raise RunError(f"generator process {message[1]} failed to start:\n{message[2]}")
            if stop_requested.is_set():
                break
            if time.monotonic() > deadline or any(not w.is_alive() for w in workers):
                raise RunError("a generator process did not start (see its error above)")
            await asyncio.sleep(0.05)
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            result.counters_before = await scrape_metrics(http, target.url)
        t0 = time.monotonic()
        result.started_wall = time.time()
        start.set()
        previous_cpu: tuple[float, float] | None = None
        end = t0 + script.duration_s
        next_tick = t0
        while len(finals) < len(workers):
            now = time.monotonic()
            if not stop.is_set() and (now >= end + STOP_GRACE_S or stop_requested.is_set()):
                # Workers stop on their own at the end; this is Ctrl-C or a stuck worker.
                result.partial = stop_requested.is_set()
                result.stop_reason = "interrupted" if stop_requested.is_set() else "timeout"
                stop.set()
                stop_deadline = now + STOP_GRACE_S
            if stop.is_set() and now > stop_deadline:
                result.errors.append("a generator process did not report in time after stop; its results are missing")
                break
            for message in drain():
                if message[0] == "progress":
                    latest[message[1]] = message[2]
                elif message[0] == "final":
                    finals[message[1]] = message[2]
                elif message[0] == "error":
                    result.errors.append(f"generator process {message[1]}: {message[2]}")
                    finals[message[1]] = {"index": message[1], "failed": True}
            dead = [w for i, w in enumerate(workers) if i not in finals and not w.is_alive()]
            if dead and not drain_pending(results):
                for w in dead:
                    index = workers.index(w)
                    result.errors.append(f"generator process {index} exited with {w.exitcode} without a report")
                    finals[index] = {"index": index, "failed": True}
            if now >= next_tick:
                next_tick += TICK_S
                sample: dict[str, Any] = {"t": round(now - t0, 2)}
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
                    metrics = await scrape_metrics(http, target.url)
                    cpu = metrics.get("process_cpu_seconds_total")
                    rss = metrics.get("process_resident_memory_bytes")
                    if cpu is not None and previous_cpu is not None and now > previous_cpu[1]:
                        sample["server_cpu_pct"] = round(100 * (cpu - previous_cpu[0]) / (now - previous_cpu[1]), 1)
                    if cpu is not None:
                        previous_cpu = (cpu, now)
                    if rss is not None:
                        sample["server_rss_mb"] = round(rss / 2**20, 1)
                    if "server_cpu_pct" in sample or "server_rss_mb" in sample:
                        result.server_samples.append({k: v for k, v in sample.items()})
                totals = _totals(latest.values())
                sample.update(totals)
                sample["remaining_s"] = max(0.0, round(end - now, 1))
                result.timeline.append(sample)
                if on_tick is not None:
                    on_tick(sample)
            await asyncio.sleep(0.1)
        result.elapsed_s = time.monotonic() - t0
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            result.counters_after = await scrape_metrics(http, target.url)
    finally:
        stop.set()
        await http.close()
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
    result.workers = [finals[i] for i in sorted(finals)]
    return result


def drain_pending(results: Any) -> bool:
    """Whether the queue still holds messages (a dead worker's final may be in flight)."""
    try:
        return not results.empty()
    except (OSError, ValueError):
        return False


def _totals(summaries: Any) -> dict[str, Any]:
    keys = ("joined", "publishing", "receiving", "failed", "send_kbps", "recv_kbps")
    totals: dict[str, Any] = {k: 0 for k in keys}
    for s in summaries:
        for k in keys:
            totals[k] += s.get(k, 0)
    totals["send_kbps"] = round(totals["send_kbps"], 1)
    totals["recv_kbps"] = round(totals["recv_kbps"], 1)
    return totals


# --- Worker side ----------------------------------------------------------------------------


def _media_spec(spec: PublishSpec) -> Any:
    from loadtest.synthetic import MediaSpec

    return MediaSpec(**dataclasses.asdict(spec))


def _network(spec: NetworkSpec | None) -> Any:
    if spec is None:
        return None
    from loadtest.synthetic import BurstLoss, NetworkProfile

    burst = BurstLoss(spec.burst.every_s, spec.burst.length_ms) if spec.burst else None
    return NetworkProfile(spec.loss_pct, spec.delay_ms, spec.jitter_ms, spec.bandwidth_kbps, burst, spec.direction)


def worker_main(args: WorkerArgs, results: Any, start: Any, stop: Any) -> None:
    """A generator process: Ctrl-C is the parent's business, the stop event ends the run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
        asyncio.run(_worker(args, results, start, stop))
    except BaseException:  # noqa: BLE001 - reported to the parent, which names the process
        results.put(("error", args.index, traceback.format_exc()))


async def _worker(args: WorkerArgs, results: Any, start: Any, stop: Any) -> None:
    from loadtest.synthetic import encoded_media

    cache = Path(args.cache_dir) if args.cache_dir else None
    for spec in {p.publish for r in args.rooms for p in r.participants if p.publish is not None}:
        await encoded_media(_media_spec(spec), cache)
    results.put(("ready", args.index))
    while not start.is_set():
        if stop.is_set():
            results.put(("final", args.index, {"index": args.index, "participants": [], "rooms": [], "cpu_s": 0.0,
                                                "wall_s": 0.0}))
            return
        await asyncio.sleep(0.02)
    clock = _Clock(time.monotonic())
    done = asyncio.Event()
    state = _WorkerState(args, clock, done)
    tasks = [asyncio.create_task(_Room(room, state).run()) for room in args.rooms]
    cpu0 = time.process_time()
    last = (cpu0, clock.t0, 0, 0)
    while True:
        elapsed = clock.now()
        if stop.is_set() or elapsed >= args.duration_s:
            break
        await asyncio.sleep(min(TICK_S, args.duration_s - elapsed))
        cpu, now, sent, received = time.process_time(), time.monotonic(), *state.bytes_now()
        dt = max(1e-6, now - last[1])
        summary = state.summary()
        summary.update(cpu_pct=round(100 * (cpu - last[0]) / dt, 1),
                       send_kbps=(sent - last[2]) * 8 / dt / 1000, recv_kbps=(received - last[3]) * 8 / dt / 1000)
        last = (cpu, now, sent, received)
        results.put(("progress", args.index, summary))
    done.set()
    # Everyone leaves cleanly; a participant stuck in a request is cancelled after the grace.
    _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S - 5)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.monotonic() - clock.t0
    cpu_s = time.process_time() - cpu0
    results.put(("final", args.index, {
        "index": args.index, "cpu_s": round(cpu_s, 2), "wall_s": round(wall, 2),
        "cpu_pct": round(100 * cpu_s / wall, 1) if wall > 0 else 0.0,
        "participants": [p.result() for p in state.people],
        "rooms": [r for r in state.workflows],
        "chat_sent": state.chat_sent, "chat_received": state.chat_received,
    }))


@dataclass
class _Clock:
    t0: float

    def now(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class _WorkerState:
    args: WorkerArgs
    clock: _Clock
    done: asyncio.Event
    people: list[_Person] = field(default_factory=list)
    workflows: list[dict[str, Any]] = field(default_factory=list)
    chat_sent: list[dict[str, Any]] = field(default_factory=list)
    chat_received: list[dict[str, Any]] = field(default_factory=list)

    async def sleep_until(self, at_s: float) -> bool:
        """Sleep until ``at_s`` on the run's clock; False if the run ended first."""
        delay = at_s - self.clock.now()
        if delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.done.wait(), delay)
        return not self.done.is_set()

    def bytes_now(self) -> tuple[int, int]:
        sent = received = 0
        for person in self.people:
            for t in person.all_tracks():
                if t["direction"] == "send":
                    sent += t["bytes"]
                else:
                    received += t["bytes"]
        return sent, received

    def summary(self) -> dict[str, Any]:
        people = self.people
        return {"joined": sum(p.joined for p in people), "publishing": sum(p.publishing for p in people),
                "receiving": sum(p.receiving() for p in people), "failed": sum(p.error is not None for p in people)}


def _error_code(exc: BaseException) -> str:
    from loadtest.client import RequestFailed

    if isinstance(exc, RequestFailed):
        return exc.code
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"http_{exc.status}"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connect_failed"
    return type(exc).__name__


class _Person:
    """One planned participant: its current ``Participant`` and everything it measured
    (tracks of earlier connections are kept when it leaves and rejoins)."""

    def __init__(self, plan: ParticipantPlan, room: RoomPlan, state: _WorkerState) -> None:
        self.plan = plan
        self.room = room
        self.state = state
        self.participant: Any = None
        self.joined = False
        self.publishing = False
        self.error: str | None = None
        self.errors: list[str] = []
        self.join_ms: list[float] = []
        self.join_errors: list[str] = []
        self.first_frame_ms: list[float] = []
        self.subscribed_at: dict[str, float] = {}
        self.closed_tracks: list[dict[str, Any]] = []
        self.roles: dict[str, str] = {}      # connection_id -> role
        self.names: dict[str, str] = {}      # connection_id -> name
        self.subscribed: set[str] = set()
        self.event_cursor = 0
        self.active_s = 0.0
        self._active_since: float | None = None
        state.people.append(self)

    def all_tracks(self) -> list[dict[str, Any]]:
        live = [dataclasses.asdict(t) for t in self.participant.track_stats()] if self.participant is not None else []
        return self.closed_tracks + live

    def receiving(self) -> bool:
        if self.participant is None:
            return False
        return any(t.direction == "recv" and t.packets > 0 for t in self.participant.track_stats())

    async def join(self, token: str) -> bool:
        from loadtest.synthetic import Participant

        self.participant = Participant(self.state.args.target.ws_url, self.plan.key, _network(self.plan.network),
                                       Path(self.state.args.cache_dir) if self.state.args.cache_dir else None)
        started = time.monotonic()
        try:
            joined = await asyncio.wait_for(self.participant.join(token), 30)
        except Exception as exc:  # noqa: BLE001 - every failure is counted by its code
            self.fail(exc)
            self.join_errors.append(_error_code(exc))
            with contextlib.suppress(Exception):
                await self.participant.close()
            self.participant = None
            return False
        self.join_ms.append(round((time.monotonic() - started) * 1000, 1))
        self.joined = True
        self._active_since = time.monotonic()
        self.event_cursor = 0
        self.subscribed = set()
        for conn in joined.get("connections", []):
            self.roles[conn["connection_id"]] = conn["role"]
            self.names[conn["connection_id"]] = conn["name"]
        await self.subscribe_to(joined.get("streams", []))
        return True

    def fail(self, exc: BaseException) -> None:
        code = _error_code(exc)
        self.error = code
        self.errors.append(code)

    def wants(self, stream: dict[str, Any]) -> bool:
        rule = self.plan.subscribe
        if rule == "none":
            return False
        return rule == "all" or self.roles.get(stream["connection_id"]) == rule

    async def subscribe_to(self, streams: list[dict[str, Any]]) -> None:
        for stream in streams:
            sid = stream["stream_id"]
            if sid in self.subscribed or not self.wants(stream):
                continue
            self.subscribed.add(sid)
            self.subscribed_at[sid] = time.monotonic()
            try:
                await self.participant.subscribe(sid, stream.get("name", ""))
            except Exception as exc:  # noqa: BLE001
                self.fail(exc)

    async def follow_events(self) -> None:
        """Track who is in the room and subscribe to new streams (polled: cheap, no callbacks)."""
        client = self.participant.client
        while self.participant is not None and self.event_cursor < len(client.events):
            event = client.events[self.event_cursor]
            self.event_cursor += 1
            name, data = event["event"], event["data"]
            if name == "connectionCreated":
                conn = data["connection"]
                self.roles[conn["connection_id"]] = conn["role"]
                self.names[conn["connection_id"]] = conn["name"]
            elif name == "streamCreated":
                await self.subscribe_to([data["stream"]])
            elif name == "chatMessage":
                message = data["message"]
                self.state.chat_received.append({"message_id": message["message_id"], "by": self.plan.key,
                                                 "room": self.room.key, "at": time.time()})
        self.note_first_frames()

    def note_first_frames(self) -> None:
        """Time to first frame per subscription: subscribe sent -> first complete video frame
        (or first audio packet for an audio-only stream)."""
        if self.participant is None or not self.subscribed_at:
            return
        firsts: dict[str, dict[str, float | None]] = {}
        for t in self.participant.track_stats():
            if t.direction == "recv" and t.stream_id in self.subscribed_at:
                firsts.setdefault(t.stream_id, {})[t.kind] = t.first_frame_at if t.kind == "video" else t.first_packet_at
        for stream_id, kinds in firsts.items():
            first = kinds["video"] if "video" in kinds else kinds.get("audio")
            if first is not None:
                self.first_frame_ms.append(round((first - self.subscribed_at.pop(stream_id)) * 1000, 1))

    async def publish(self) -> None:
        if self.plan.publish is None or self.participant is None:
            return
        try:
            await asyncio.wait_for(self.participant.publish(_media_spec(self.plan.publish)), 30)
            self.publishing = True
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)

    async def leave(self) -> None:
        participant, self.participant = self.participant, None
        if participant is None:
            return
        self.joined = self.publishing = False
        if self._active_since is not None:
            self.active_s += time.monotonic() - self._active_since
            self._active_since = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(participant.leave(), 10)
        self.closed_tracks.extend(dataclasses.asdict(t) for t in participant.track_stats())
        with contextlib.suppress(Exception):
            await participant.close()

    def result(self) -> dict[str, Any]:
        active = self.active_s + (time.monotonic() - self._active_since if self._active_since is not None else 0.0)
        return {"key": self.plan.key, "role": self.plan.role, "room": self.room.key, "group": self.room.group,
                "join_ms": self.join_ms, "join_errors": self.join_errors, "first_frame_ms": self.first_frame_ms, "errors": self.errors,
                "active_s": round(active, 2), "tracks": self.all_tracks()}

    async def chat(self, channel_id: str) -> None:
        spec = self.plan.chat
        if spec is None:
            return
        start = self.state.clock.now() + spec.start_s
        for n in range(spec.count):
            if not await self.state.sleep_until(start + n * spec.interval_s) or self.participant is None:
                return
            text = f"lt {self.plan.key} {n} ".ljust(spec.size, "x")[: spec.size]
            sent_at = time.time()
            try:
                data = await self.participant.client.request("chat.send", channel_id=channel_id, text=text)
            except Exception as exc:  # noqa: BLE001
                self.fail(exc)
                continue
            self.state.chat_sent.append({"message_id": data["message"]["message_id"], "by": self.plan.key,
                                         "room": self.room.key, "at": sent_at,
                                         "ack_ms": round((time.time() - sent_at) * 1000, 1)})


class _Room:
    """One room's timeline: a plain media room, or a booked consultation's workflow."""

    def __init__(self, room: RoomPlan, state: _WorkerState) -> None:
        self.room = room
        self.state = state
        self.people = [_Person(p, room, state) for p in room.participants]

    async def run(self) -> None:
        try:
            if self.room.workflow is None:
                await asyncio.gather(*(self._plain(p) for p in self.people))
            else:
                await self._workflow()
        finally:
            await asyncio.gather(*(p.leave() for p in self.people), return_exceptions=True)

    async def _plain(self, person: _Person) -> None:
        from rooms.model import Role
        from signalling.auth import TokenAuthority

        target = self.state.args.target
        authority = TokenAuthority("HS256", target.secret, target.secret, leeway_s=30)
        plan = person.plan
        if not await self.state.sleep_until(plan.start_s):
            return
        token = authority.mint(self.room.key, Role(plan.role), plan.key, sub=plan.key, ttl_s=6 * 3600)
        if not await person.join(token):
            return
        await person.publish()
        joined_at = self.state.clock.now()
        actions = list(plan.actions)
        while not self.state.done.is_set():
            while actions and self.state.clock.now() - joined_at >= actions[0].at_s:
                await self._act(person, actions.pop(0), token)
            if person.participant is not None:
                await person.follow_events()
            await self.state.sleep_until(self.state.clock.now() + 0.1)

    async def _act(self, person: _Person, action: Any, token: str) -> None:
        try:
            if action.do in ("mute", "unmute") and person.participant is not None:
                kinds = [action.kind] if action.kind else ["audio", "video"]
                for kind in kinds:
                    await person.participant.set_muted(kind, action.do == "mute")
            elif action.do == "leave":
                await person.leave()
            elif action.do == "rejoin" and person.participant is None:
                if await person.join(token):
                    await person.publish()
        except Exception as exc:  # noqa: BLE001
            person.fail(exc)

    async def _workflow(self) -> None:
        """book -> enter -> admit -> (call) -> end -> complete, each after its scripted delay."""
        workflow = self.room.workflow
        assert workflow is not None
        target = self.state.args.target
        patient = next(p for p in self.people if p.plan.role == "patient")
        clinician = next((p for p in self.people if p.plan.role == "clinician"), None)
        clinician_id = f"{self.room.key}-clin"[:128]
        staff = _staff_token(target, "clinician", clinician_id, workflow.department)
        record: dict[str, Any] = {"room": self.room.key, "group": self.room.group, "steps": {}, "failed": None,
                                  "completed": []}
        self.state.workflows.append(record)
        steps = record["steps"]
        desk: Any = None
        session_id = channel = ""
        clock = self.state.clock
        at = self.room.start_s
        try:
            for step in workflow.steps:
                if not await self.state.sleep_until(at + step.after_s):
                    return
                started = time.monotonic()
                if step.do == "book":
                    from loadtest.client import SignallingClient

                    body: dict[str, Any] = {
                        "department": workflow.department, "waiting_room": workflow.waiting_room,
                        "patient_ref": patient.plan.key, "patient_name": patient.plan.key[:80],
                        "appointment_ms": int(time.time() * 1000 + workflow.appointment_in_min * 60_000)}
                    if clinician is not None:
                        body.update(clinician=clinician_id, clinician_name=clinician.plan.key[:80])
                    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                        async with http.post(target.url.rstrip("/") + "/api/consultations", json=body,
                                             headers={"Authorization": f"Bearer {staff}"}) as response:
                            booked = await response.json()
                            if response.status != 201:
                                raise _StepFailed("book", str(booked.get("error", {}).get("code", response.status)))
                    session_id = booked["consultation"]["session_id"]
                    record["session_id"] = session_id
                    # The patient's token comes from the link, as a patient's browser gets it.
                    link_token = urllib.parse.urlsplit(booked["patient_link"]).fragment.partition("token=")[2]
                    steps["book_ms"] = _ms(started)
                    if clinician is not None:
                        desk = SignallingClient(target.ws_url)
                        await desk.connect()
                        await desk.join(staff)
                elif step.do == "enter":
                    if not await patient.join(link_token):
                        raise _StepFailed("enter", patient.error or "join")
                    entered = await patient.participant.client.request("waiting_room.enter", device_check_passed=True)
                    channel = entered["channel_id"]
                    steps["enter_ms"] = _ms(started)
                    entered_at = time.monotonic()
                elif step.do == "admit":
                    assert clinician is not None and desk is not None
                    admitted = await desk.request("consultation.admit", session_id=session_id)
                    steps["admit_ms"] = _ms(started)
                    await patient.participant.client.wait_event("admitted", timeout=30, session_id=session_id)
                    steps["admitted_seen_ms"] = _ms(started)
                    steps["enter_to_admitted_ms"] = _ms(entered_at)
                    if not await clinician.join(admitted["token"]):
                        raise _StepFailed("admit", clinician.error or "join")
                    await asyncio.gather(patient.publish(), clinician.publish())
                    steps["call_setup_ms"] = _ms(started)
                    call_started = time.monotonic()
                    self._call = asyncio.gather(*(self._in_call(p, channel) for p in (patient, clinician)))
                elif step.do == "end":
                    assert desk is not None
                    await desk.request("consultation.end", session_id=session_id)
                    steps["end_ms"] = _ms(started)
                    steps["call_s"] = round(time.monotonic() - call_started, 2)
                    await self._stop_call((patient, clinician))
                elif step.do == "complete":
                    assert desk is not None
                    await desk.request("consultation.complete", session_id=session_id)
                    steps["complete_ms"] = _ms(started)
                record["completed"].append(step.do)
                at = clock.now()
            # Steps done before the end of the run: the call (if any) goes on until then.
            await self.state.sleep_until(self.state.args.duration_s)
        except _StepFailed as exc:
            record["failed"] = {"step": exc.step, "code": exc.code}
        except Exception as exc:  # noqa: BLE001 - a failed step is reported, not raised
            record["failed"] = {"step": _next_step(workflow, record["completed"]), "code": _error_code(exc)}
        finally:
            await self._stop_call((patient, clinician))
            if desk is not None:
                with contextlib.suppress(Exception):
                    await desk.request("leave", timeout=5)
                await desk.close()

    _call: Any = None

    async def _stop_call(self, people: tuple[_Person | None, ...]) -> None:
        # The call's loops take a last look at their events before the participants leave.
        if self._call is not None:
            call, self._call = self._call, None
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
        for person in people:
            if person is not None:
                await person.leave()

    async def _in_call(self, person: _Person, channel: str) -> None:
        chat = asyncio.create_task(person.chat(channel))
        try:
            while person.participant is not None and not self.state.done.is_set():
                await person.follow_events()
                await self.state.sleep_until(self.state.clock.now() + 0.1)
        finally:
            # A last look at the events: chat that arrived just before the end counts.
            if person.participant is not None:
                with contextlib.suppress(Exception):
                    await person.follow_events()
            chat.cancel()
            await asyncio.gather(chat, return_exceptions=True)


class _StepFailed(Exception):
    def __init__(self, step: str, code: str) -> None:
        super().__init__(f"{step}: {code}")
        self.step = step
        self.code = code


def _next_step(workflow: Any, completed: list[str]) -> str:
    return next((s.do for s in workflow.steps if s.do not in completed), "call")


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 1)
