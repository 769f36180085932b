"""One worker of ``openconsult serve --workers N`` (see signalling/supervisor.py): its private
loopback site, the host-wide ``/healthz`` and ``/metrics``, and the parent-death check.

A request on the shared public port lands on any worker, so the worker that gets ``/healthz`` or
``/metrics`` asks its siblings over their private loopback ports (given by the supervisor,
stable per index) and answers for the whole host: ``/healthz`` lists every worker (ok or
unreachable), ``/metrics`` carries every worker's series with a ``worker`` label plus
``openconsult_worker_up``. The private site serves only this worker's own figures and is bound
to 127.0.0.1 by the supervisor.

Merging and the host health are pure functions (:func:`merge_expositions`, :func:`host_health`);
:class:`WorkerNode` does the I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from signalling.supervisor import WorkerSpec

logger = logging.getLogger(__name__)

#: A sibling that has not answered by then is reported unreachable.
SIBLING_TIMEOUT_S: Final = 2.0
#: How often a worker checks that its supervisor is still its parent.
PARENT_CHECK_S: Final = 1.0
WORKER_LABEL: Final = "worker"
WORKER_UP: Final = "openconsult_worker_up"


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Sequence[Metric]:
        return self.families


def merge_expositions(texts: Sequence[str | None]) -> bytes:
    """One exposition for the host from each worker's (by index; None: unreachable): every
    sample gains a ``worker`` label, families keep their first HELP and TYPE, and
    ``openconsult_worker_up`` says which workers answered. A worker whose text does not parse
    counts as unreachable."""
    families: dict[str, Metric] = {}
    up = Metric(WORKER_UP, "1 when the worker answered this scrape on the host, 0 when it was unreachable", "gauge")
    for index, text in enumerate(texts):
        parsed: list[Metric] | None = None
        if text is not None:
            try:
                parsed = list(text_string_to_metric_families(text))
            except (ValueError, TypeError, IndexError):
                logger.warning("worker %d sent metrics that do not parse; counted as unreachable", index)
        up.add_sample(WORKER_UP, {WORKER_LABEL: str(index)}, 1.0 if parsed is not None else 0.0)
        for family in parsed or ():
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, WORKER_LABEL: str(index)}, s.value, s.timestamp, s.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([up, *families.values()]))
    return generate_latest(registry)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def worker_row(index: int, answer: Mapping[str, Any] | None) -> dict[str, Any]:
    """One worker's line in the host's ``/healthz`` from its private ``/healthz`` (None, or an
    answer that is not what a worker sends: unreachable)."""
    if answer is not None:
        pid, rooms, connections = _count(answer.get("pid")), _count(answer.get("rooms")), _count(answer.get("connections"))
        node_id = answer.get("node_id")
        if (answer.get("index") == index and pid is not None and rooms is not None and connections is not None
                and isinstance(node_id, str)):
            status = "draining" if answer.get("status") == "draining" else "ok"
            return {"index": index, "pid": pid, "node_id": node_id, "status": status, "rooms": rooms,
                    "connections": connections}
    return {"index": index, "pid": None, "node_id": None, "status": "unreachable", "rooms": None, "connections": None}


def host_health(answering: Mapping[str, Any], answers: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The host's ``/healthz``: the one-process fields (``version`` and ``uptime_s`` of the worker
    that answered; ``rooms`` and ``connections`` summed over the workers that answered),
    ``status`` ok when every worker answered (draining if one of them drains) else degraded, and
    ``workers`` one row each."""
    rows = [worker_row(index, answer) for index, answer in enumerate(answers)]
    live = [r for r in rows if r["status"] != "unreachable"]
    status = "degraded" if len(live) < len(rows) else "draining" if any(r["status"] == "draining" for r in live) else "ok"
    return {"status": status, "version": answering["version"],
            "uptime_s": answering["uptime_s"], "rooms": sum(r["rooms"] for r in live),
            "connections": sum(r["connections"] for r in live), "workers": rows}


class WorkerNode:
    """This worker's part of the host: its private site and the sibling queries."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.node_id = ""
        self._local_health: Callable[[], dict[str, Any]] = dict
        self._local_metrics: Callable[[], bytes] = bytes
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._watch: asyncio.Task[None] | None = None

    def own_health(self) -> dict[str, Any]:
        return {**self._local_health(), "index": self.spec.index, "pid": os.getpid(), "node_id": self.node_id}

    async def start(self, node_id: str, local_health: Callable[[], dict[str, Any]],
                    local_metrics: Callable[[], bytes]) -> None:
        self.node_id, self._local_health, self._local_metrics = node_id, local_health, local_metrics
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SIBLING_TIMEOUT_S))
        private = web.Application()
        private.router.add_get("/healthz", self._private_health)
        private.router.add_get("/metrics", self._private_metrics)
        self._runner = web.AppRunner(private, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, socket.socket(fileno=self.spec.control_fd)).start()
        self._watch = asyncio.get_running_loop().create_task(self._watch_parent(), name="worker-parent-check")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _watch_parent(self) -> None:
        """A worker whose supervisor died exits (cleanly, as on SIGTERM): no orphans."""
        while True:
            await asyncio.sleep(PARENT_CHECK_S)
            if os.getppid() != self.spec.supervisor_pid:
                logger.warning("the supervisor (pid %d) is gone: stopping", self.spec.supervisor_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    async def _private_health(self, request: web.Request) -> web.Response:
        return web.json_response(self.own_health())

    async def _private_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._local_metrics(), content_type="text/plain")

    async def _sibling(self, index: int, path: str) -> bytes | None:
        assert self._session is not None
        try:
            async with self._session.get(f"http://127.0.0.1:{self.spec.control_ports[index]}{path}") as response:
                if response.status != 200:
                    return None
                return await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    async def _gather(self, path: str, own: bytes) -> list[bytes | None]:
        others = [self._sibling(i, path) for i in range(self.spec.count) if i != self.spec.index]
        answers: list[bytes | None] = list(await asyncio.gather(*others))
        answers.insert(self.spec.index, own)
        return answers

    async def host_health(self) -> dict[str, Any]:
        own = self.own_health()
        raw = await self._gather("/healthz", b"")
        answers: list[Mapping[str, Any] | None] = []
        for index, body in enumerate(raw):
            if index == self.spec.index:
                answers.append(own)
                continue
            try:
                data = json.loads(body) if body is not None else None
            except ValueError:
                data = None
            answers.append(data if isinstance(data, dict) else None)
        return host_health(own, answers)

    async def host_metrics(self, own: bytes) -> bytes:
        """The host's exposition; ``own``: this worker's, already rendered."""
        raw = await self._gather("/metrics", own)
        texts: list[str | None] = []
        for body in raw:
            try:
                texts.append(body.decode() if body is not None else None)
            except UnicodeDecodeError:
                texts.append(None)
        return merge_expositions(texts)


WORKER_KEY: Final = web.AppKey("worker", WorkerNode)
