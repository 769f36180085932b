"""The aiohttp application: wires config, token authority, event log, media router
and hub, each with its own lifetime (cleanup_ctx), and serves the routes."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping
from typing import Any, Final

from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Handler

from media import aiortc_internals
from media.events import DatagramDropReason
from media.router import Router
from media.udpmux import UdpMux
from metrics import prometheus as prom
from metrics.audit import AuditLog
from metrics.eventlog import EventLog, EventStore
from metrics.recorder import Recorder
from rooms.directory import DirectoryUnavailable, LocalDirectory, NodeLoad, Notice, RoomDirectory
from rooms.redis_store import RedisStore
from rooms.sqlite_store import SqliteStore
from rooms.store import Store
from signalling import logs
from signalling.api import add_routes, coded_errors, node_health
from signalling.audit import AUDIT_KEY, SIGN_INS_KEY, SignIns, staff_sign_ins
from signalling.auth import TokenAuthority
from signalling.backoffice_api import add_backoffice_routes
from signalling.cluster import DIRECTORY_KEY, NOTICE_SINKS_KEY, RedisDirectory
from signalling.config import Config, ConfigError
from signalling.failover import DRAIN_KEY, Drain
from signalling.hub import Hub
from signalling.keys import (
    CONFIG_KEY,
    EVENTLOG_KEY,
    HUB_KEY,
    ROUTER_KEY,
    SHUTTING_DOWN_KEY,
    SOCKETS_KEY,
    STARTED_KEY,
    TOKENS_KEY,
    WORKFLOW_KEY,
)
from signalling.staff_api import add_staff_routes
from signalling.supervisor import WorkerSpec
from signalling.worker import WORKER_KEY, WorkerNode
from signalling.workflow import DataRetention, Workflow
from signalling.ws import RELAY_DOOR_KEY, RELAY_SERVER_KEY, RelayDoor, RelayServer, websocket_handler

logger = logging.getLogger(__name__)


#: Every response's security headers. The pages load only their own scripts and styles (no inline
#: code), connect only to this host (HTTP and the /ws WebSocket), are never framed, and never send
#: a Referer (a consultation link's token must not leak to another site).
SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CSP: Final = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
              "media-src 'self' blob: mediastream:; connect-src 'self' {ws}; frame-ancestors 'none'; "
              "object-src 'none'; base-uri 'none'; form-action 'self'")


def _csp(request: web.Request) -> str:
    """The CSP with ``connect-src`` naming this host's WebSocket origin (older browsers do not
    count ws(s) of the same host as 'self')."""
    host = request.host
    ws = f"ws://{host} wss://{host}" if host and all(c.isalnum() or c in ".-:[]_" for c in host) else ""
    return CSP.format(ws=ws)


@web.middleware
async def security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    """Set the security headers on every response, errors included (HTTPException responses too)."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        _add_security_headers(request, exc.headers)
        raise
    if not response.prepared:  # a WebSocket has sent its headers already
        _add_security_headers(request, response.headers)
    return response


def _add_security_headers(request: web.Request, headers: MutableMapping[str, str]) -> None:
    headers.update(SECURITY_HEADERS)
    headers["Content-Security-Policy"] = _csp(request)


def create_app(config: Config, worker: WorkerSpec | None = None) -> web.Application:
    """The application; ``worker``: this process is one worker of ``serve --workers`` (its
    private site, host-wide /healthz and /metrics, see signalling/worker.py)."""
    app = web.Application(middlewares=[committed_replies, security_headers, coded_errors, staff_sign_ins],
                          client_max_size=1024 * 1024)
    config.data_path.mkdir(parents=True, exist_ok=True)
    app[CONFIG_KEY] = config
    app[TOKENS_KEY] = TokenAuthority.from_config(config)
    app[SOCKETS_KEY] = weakref.WeakSet()
    app[STARTED_KEY] = time.monotonic()
    app[SIGN_INS_KEY] = SignIns(config.audit.sign_in_window_min * 60.0)
    mux = _bind_udp_port(config)
    if mux is not None:
        app[UDP_MUX_KEY] = mux
    app.cleanup_ctx.append(_eventlog_ctx)
    app.cleanup_ctx.append(_audit_ctx)
    app.cleanup_ctx.append(_media_ctx)
    app.cleanup_ctx.append(_cluster_ctx)
    app.cleanup_ctx.append(_workflow_ctx)
    if worker is not None:
        app[WORKER_KEY] = WorkerNode(worker)
        app.cleanup_ctx.append(_worker_ctx)
    app.on_shutdown.append(_close_sockets)
    add_routes(app)
    add_staff_routes(app)
    add_backoffice_routes(app)
    app.router.add_get("/ws", websocket_handler)
    return app


@web.middleware
async def committed_replies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A reply to a request that appended event-log entries waits until they are committed,
    so nothing a client is told survives only in memory (the WebSocket does the same per
    request, see ``ws._logged``)."""
    eventlog = request.app[EVENTLOG_KEY]
    mark = eventlog.appended
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        raise
    except BaseException:
        await eventlog.committed_since(mark)
        raise
    if not isinstance(response, web.WebSocketResponse):  # a socket's replies wait one by one
        await eventlog.committed_since(mark)
    return response


async def _eventlog_ctx(app: web.Application) -> AsyncIterator[None]:
    """The event log: PostgreSQL when ``[eventlog] url`` is set (nodes on several hosts), else
    SQLite in the data dir. The one place that picks the backend."""
    settings = app[CONFIG_KEY].eventlog
    eventlog: EventStore
    if settings.url:
        from metrics.eventlog_pg import PgEventLog  # psycopg is loaded only when configured

        try:
            eventlog = await asyncio.to_thread(PgEventLog, settings.url, node_id=settings.node_id or None)
        except Exception as exc:
            # No password in the message: name the key and the driver's reason.
            raise ConfigError(f"eventlog.url: cannot open the PostgreSQL event log: {type(exc).__name__}: "
                              f"{str(exc).replace(settings.url, '<eventlog.url>')}") from None
    else:
        eventlog = EventLog(app[CONFIG_KEY].data_path / "events.sqlite3")
    app[EVENTLOG_KEY] = eventlog
    yield
    await eventlog.aclose()


async def _audit_ctx(app: web.Application) -> AsyncIterator[None]:
    """The audit log (Login and LookUp entries): its own file, append-only (see metrics.audit)."""
    audit = AuditLog(app[CONFIG_KEY].data_path / "audit.sqlite3")
    app[AUDIT_KEY] = audit
    yield
    await audit.aclose()


#: The node's shared media sockets when ``media.udp_port`` is set (bound in create_app, so a
#: taken port stops start-up with a message naming the key).
UDP_MUX_KEY: Final = web.AppKey("udp_mux", UdpMux)


def _bind_udp_port(config: Config) -> UdpMux | None:
    media = config.media
    if not media.udp_port:
        return None
    aiortc_internals.configure_ice_addresses(media.ice_addresses)
    addresses = aiortc_internals.host_addresses()
    if not addresses:
        raise ConfigError("media.udp_port: this host has no address to gather ICE candidates on "
                          "(set media.ice_addresses)")
    try:
        return UdpMux.bind(addresses, media.udp_port, dict.fromkeys(DatagramDropReason, 0),
                           rcvbuf_bytes=media.udp_rcvbuf_bytes)
    except OSError as exc:
        hint = ("; another process holds it (each server process needs its own port)"
                if exc.errno == errno.EADDRINUSE else "")
        raise ConfigError(f"media.udp_port = {media.udp_port}: {exc.strerror}{hint}") from None


def _report_receive_buffer(requested: int) -> None:
    """Log the receive buffer media sockets really get, and how to raise the kernel's cap
    when it is below what the config asks for."""
    granted = aiortc_internals.effective_receive_buffer(requested)
    if granted >= requested:
        logger.info("media sockets receive buffer: %d bytes (media.udp_rcvbuf_bytes)", granted)
        return
    logger.warning(
        "media sockets receive buffer: %d bytes, not the %d of media.udp_rcvbuf_bytes: the kernel caps it at "
        "net.core.rmem_max; raise it with `sysctl -w net.core.rmem_max=%d` (and a line in /etc/sysctl.d/ to keep "
        "it), or bursts under load are dropped (RcvbufErrors in /proc/net/snmp)", granted, requested, requested)


async def _media_ctx(app: web.Application) -> AsyncIterator[None]:
    media = app[CONFIG_KEY].media
    aiortc_internals.configure_ice_addresses(media.ice_addresses)
    mux = app.get(UDP_MUX_KEY)
    if mux is not None:
        await mux.start()
        prom.MEDIA_UDP_ROUTES.labels(kind=prom.UdpRouteKind.USERNAME.value).set_function(
            lambda: mux.route_counts()[0])
        prom.MEDIA_UDP_ROUTES.labels(kind=prom.UdpRouteKind.ADDRESS.value).set_function(
            lambda: mux.route_counts()[1])
    aiortc_internals.configure_receive_buffer(media.udp_rcvbuf_bytes)
    _report_receive_buffer(media.udp_rcvbuf_bytes)
    router = Router(pli_interval_s=media.pli_interval_s, sample_interval_s=media.sample_interval_s,
                    announced_ip=media.announced_ip, answer_timeout_s=media.answer_timeout_s,
                    connect_timeout_s=media.connect_timeout_s, max_peer_connections=media.max_peer_connections,
                    udp_mux=mux)
    app[ROUTER_KEY] = router
    app[HUB_KEY] = Hub(app[TOKENS_KEY], router, Recorder(app[EVENTLOG_KEY]), app[CONFIG_KEY])
    router.start()
    try:
        yield
    finally:
        await app[HUB_KEY].shutdown()
        await router.close()
        if mux is not None:
            mux.close()
            for kind in prom.UdpRouteKind:
                prom.MEDIA_UDP_ROUTES.labels(kind=kind.value).set_function(lambda: 0)




def _node_load(hub: Hub, cpu: float) -> NodeLoad:
    sessions = list(hub.registry.sessions.values())
    return NodeLoad(rooms=len(sessions), calls=sum(1 for s in sessions if len(s.connections) >= 2), cpu=round(cpu, 3),
                    draining=hub.draining)


def _export_cluster(hub: Hub, directory: RoomDirectory | None, door: RelayDoor, server: RelayServer,
                    clustered: bool) -> None:
    """This node's id in the logs and /metrics, and the gauges of its load and cluster state, read
    at scrape time (``directory`` None: the node is stopping, they read 0)."""
    live = directory is not None
    if directory is not None:
        logs.bind_process(node_id=directory.node_id)
        prom.NODE.info({"node_id": directory.node_id, "directory": "redis" if clustered else "local"})
    prom.CALLS_ACTIVE.set_function(lambda: _node_load(hub, 0).calls if live else 0)
    prom.CLUSTER_ROOMS_OWNED.set_function(lambda: len(directory.held()) if directory is not None else 0)
    prom.CLUSTER_RELAYED_CONNECTIONS.labels(side=prom.RelaySide.DOOR.value).set_function(
        lambda: len(door.links) if live else 0)
    prom.CLUSTER_RELAYED_CONNECTIONS.labels(side=prom.RelaySide.OWNER.value).set_function(
        lambda: len(server.conns) if live else 0)


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """The room directory and this node's heartbeat (every third of ``cluster.lease_s``: load,
    renewed leases). With Redis away the heartbeat keeps trying; calls go on meanwhile."""
    config, hub = app[CONFIG_KEY], app[HUB_KEY]
    directory: RoomDirectory
    if config.redis_url:
        directory = RedisDirectory(config.redis_url, lease_s=config.cluster.lease_s,
                                   namespace=config.cluster.namespace, address=f"{config.server.host}:{config.server.port}")
    else:
        directory = LocalDirectory(lease_s=config.cluster.lease_s)
    sinks: list[Callable[[Notice], None]] = []
    app[NOTICE_SINKS_KEY] = sinks
    door, server = RelayDoor(hub.recorder, directory), RelayServer(app)
    app[RELAY_DOOR_KEY], app[RELAY_SERVER_KEY] = door, server

    def deliver(notice: Notice) -> None:
        if notice.kind in ("relay.out", "relay.end"):
            door.on_notice(notice)
        elif notice.kind.startswith("relay."):
            server.on_notice(notice)
        else:
            for sink in sinks:
                sink(notice)

    await directory.start(deliver)
    hub.directory = directory
    app[DIRECTORY_KEY] = directory
    _export_cluster(hub, directory, door, server, bool(config.redis_url))
    logger.info("cluster: node %s (%s)", directory.node_id,
                "Redis directory" if config.redis_url else "one node, no Redis")
    stop = asyncio.Event()
    beats: set[asyncio.Task[None]] = set()

    def announce_drain() -> None:
        """Refuse new rooms now, and tell the cluster now rather than at the next beat."""
        hub.draining = True
        if isinstance(directory, LocalDirectory):
            directory.load = _node_load(hub, 0.0)
            return
        task = asyncio.get_running_loop().create_task(_beat_once(directory, _node_load(hub, 0.0)))
        beats.add(task)
        task.add_done_callback(beats.discard)

    drain = Drain(directory.node_id, lambda: (len(hub.registry.sessions), len(hub.clients) + len(door.links)),
                  announce_drain, config.cluster.drain_timeout_s)
    app[DRAIN_KEY] = drain

    async def beat() -> None:
        wall, cpu = time.monotonic(), time.process_time()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=directory.lease_s / 3)
            except TimeoutError:
                pass
            now_wall, now_cpu = time.monotonic(), time.process_time()
            share = (now_cpu - cpu) / max(1e-3, now_wall - wall)
            wall, cpu = now_wall, now_cpu
            try:
                await directory.heartbeat(_node_load(hub, share))
                for room in set(hub.leases) - directory.held():
                    # Claimed by another node while this one was cut off or paused: its clients
                    # here are closed (1012) and rejoin on that node, so the room is held once.
                    hub.leases.pop(room, None)
                    logger.warning("cluster: room %s now belongs to another node; closing its connections here "
                                   "(1012)", room)
                    await hub.lose_room(room)
                live = set(await directory.nodes())
                prom.CLUSTER_NODES.set(len(live))
                if door.links or server.conns:
                    door.lost(live)
                    server.lost(live)
            except DirectoryUnavailable:
                pass  # logged once by the directory; the next beat retries

    task = asyncio.get_running_loop().create_task(beat(), name="cluster-heartbeat")
    try:
        yield
    finally:
        stop.set()
        await task
        await drain.close()
        await asyncio.gather(*beats, return_exceptions=True)
        await directory.close()
        _export_cluster(hub, None, door, server, bool(config.redis_url))


async def _beat_once(directory: RoomDirectory, load: NodeLoad) -> None:
    try:
        await directory.heartbeat(load)
    except DirectoryUnavailable:
        pass  # the heartbeat loop retries


async def _workflow_ctx(app: web.Application) -> AsyncIterator[None]:
    """The workflow store: SQLite in the data dir (commits are synchronous, so a crash loses
    nothing acknowledged), or Redis when several nodes share ``redis_url``."""
    config = app[CONFIG_KEY]
    store: Store = (RedisStore(config.redis_url, namespace=config.cluster.namespace) if config.redis_url
                    else SqliteStore(config.data_path / "workflow.sqlite3"))
    data = DataRetention(app[EVENTLOG_KEY], app[AUDIT_KEY], config.retention)
    directory = app[DIRECTORY_KEY]
    workflow = Workflow.from_settings(store, config.workflow, app[HUB_KEY], app[HUB_KEY].recorder, app[TOKENS_KEY],
                                      data, directory=directory)
    app[WORKFLOW_KEY] = workflow
    app[NOTICE_SINKS_KEY].append(workflow.deliver)
    workflow.start()  # scheduled jobs (the retention sweep), stopped before the store closes
    yield
    app[NOTICE_SINKS_KEY].remove(workflow.deliver)
    await workflow.stop_jobs()
    await store.close()


async def _worker_ctx(app: web.Application) -> AsyncIterator[None]:
    """This worker's private loopback site and parent-death check (``serve --workers``)."""
    worker = app[WORKER_KEY]
    await worker.start(app[DIRECTORY_KEY].node_id, lambda: node_health(app), lambda: prom.render()[0])
    yield
    await worker.close()


async def _close_sockets(app: web.Application) -> None:
    """On shutdown every connection leaves with reason serverShutdown, then sockets close."""
    app[SHUTTING_DOWN_KEY] = True
    await app[RELAY_SERVER_KEY].close()
    await app[HUB_KEY].shutdown()
    sockets = app[SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
