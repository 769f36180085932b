"""Prometheus metric definitions for the whole server, and the exposition renderer.

All metrics are module-level, in namespace ``openconsult``, named ``<noun>_<verb>_<unit>``.
Label values come from Enums and every combination is created up front, so a series exists
(at 0) before the first event and dashboards never see gaps. Session, connection and
participant ids are never labels: those belong in the event log.

The media hot path never calls these per packet: it keeps plain integer counters and folds
them in on a timer with ``.inc(n)``.

``signalling`` serves :func:`render` at ``/metrics``::

    body, content_type = render()
    return web.Response(body=body, headers={"Content-Type": content_type})
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from media.events import DatagramDropReason, ForwardDropReason
from rooms.model import DisconnectReason, StreamDestroyedReason

NAMESPACE: Final = "openconsult"

# The ``*_created`` timestamp series double the series count and no dashboard reads them.
disable_created_metrics()


class MediaKind(StrEnum):
    AUDIO = "audio"
    VIDEO = "video"


class TokenRejectCode(StrEnum):
    """Why a join token was refused; the values are the wire error codes (signalling/errors.py)."""

    UNAUTHORIZED = "unauthorized"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    ROOM_MISMATCH = "room_mismatch"


class EventLogDropReason(StrEnum):
    """Why an event-log entry was lost: the writer was behind (queue full), the log was already
    closed, or SQLite refused the entry itself (its batch-mates are written all the same)."""

    QUEUE_FULL = "queue_full"
    CLOSED = "closed"
    WRITE_FAILED = "write_failed"


class UdpRouteKind(StrEnum):
    """The shared media port's route tables (``media.udp_port``): STUN by server ufrag (one
    per peer connection's ICE agent), everything else by remote address."""

    USERNAME = "username"
    ADDRESS = "address"


class ClaimResult(StrEnum):
    """A room-lease claim: ``won`` (this node holds the room now), ``elsewhere`` (another node
    does), ``error`` (Redis did not answer)."""

    WON = "won"
    ELSEWHERE = "elsewhere"
    ERROR = "error"


class RelaySide(StrEnum):
    """A relayed connection as this node sees it: ``door`` (the socket is here, the room on
    another node), ``owner`` (the room is here, the socket on another node)."""

    DOOR = "door"
    OWNER = "owner"


class WsDirection(StrEnum):
    INBOUND = "in"
    OUTBOUND = "out"


class WsResult(StrEnum):
    """Inbound: ``ok`` decoded, ``invalid`` refused by the codec (error frame sent), ``error``
    decoded but answered with an error. Outbound: ``ok`` sent, ``dropped`` not sent because the
    client's queue was full."""

    OK = "ok"
    INVALID = "invalid"
    ERROR = "error"
    DROPPED = "dropped"


# --- Live objects -------------------------------------------------------------------------

CONNECTIONS_ACTIVE: Final = Gauge(
    "connections_active", "Signalling connections currently joined to a session", namespace=NAMESPACE
)
SESSIONS_ACTIVE: Final = Gauge("sessions_active", "Sessions with at least one connection", namespace=NAMESPACE)
STREAMS_ACTIVE: Final = Gauge("streams_active", "Published streams currently live", namespace=NAMESPACE)
SUBSCRIPTIONS_ACTIVE: Final = Gauge(
    "subscriptions_active", "Subscriptions currently forwarding a stream", namespace=NAMESPACE
)
CALLS_ACTIVE: Final = Gauge(
    "calls_active",
    "Sessions with two or more connections (calls in progress): with openconsult_sessions_active, the"
    " load a node reports to the cluster",
    namespace=NAMESPACE,
)

# --- Lifecycle ----------------------------------------------------------------------------

CONNECTIONS_CLOSED: Final = Counter(
    "connections_closed",
    "Connections that left a session, by disconnect reason",
    ["reason"],
    namespace=NAMESPACE,
)
STREAMS_DESTROYED: Final = Counter(
    "streams_destroyed",
    "Streams that ended, by stream-destroyed reason",
    ["reason"],
    namespace=NAMESPACE,
)
TOKENS_REJECTED: Final = Counter(
    "tokens_rejected", "Join tokens refused, by error code", ["code"], namespace=NAMESPACE
)

# --- Media forwarding ---------------------------------------------------------------------

RTP_PACKETS_FORWARDED: Final = Counter(
    "rtp_packets_forwarded", "RTP packets forwarded to subscribers", ["kind"], namespace=NAMESPACE
)
RTP_BYTES_FORWARDED: Final = Counter(
    "rtp_bytes_forwarded", "RTP payload bytes forwarded to subscribers", ["kind"], namespace=NAMESPACE
)
KEYFRAMES_REQUESTED: Final = Counter(
    "keyframes_requested", "Keyframe requests (PLI/FIR) sent to publishers", namespace=NAMESPACE
)
NACKS_ANSWERED: Final = Counter(
    "nacks_answered", "NACKed packets retransmitted from the send buffer", namespace=NAMESPACE
)
MEDIA_DATAGRAMS_DROPPED: Final = Counter(
    "media_datagrams_dropped",
    "UDP datagrams on media sockets dropped before aiortc (RFC 7983 demultiplexing), by reason",
    ["reason"],
    namespace=NAMESPACE,
)
MEDIA_UDP_ROUTES: Final = Gauge(
    "media_udp_routes",
    "Routes on the shared media UDP port (media.udp_port), by table: they follow the live peer"
    " connections (0 without media.udp_port)",
    ["kind"],
    namespace=NAMESPACE,
)
RTP_PACKETS_DROPPED: Final = Counter(
    "rtp_packets_dropped",
    "RTP packets of a published track not forwarded to a subscriber, by reason (waiting for a keyframe,"
    " older than the subscriber's start, or its transport could not send)",
    ["reason"],
    namespace=NAMESPACE,
)
PEER_CONNECTIONS_TIMED_OUT: Final = Counter(
    "peer_connections_timed_out",
    "Publishes and subscriptions closed because they were not connected within media.connect_timeout_s",
    namespace=NAMESPACE,
)

# --- Event log ----------------------------------------------------------------------------

EVENTLOG_ENTRIES_WRITTEN: Final = Counter(
    "eventlog_entries_written", "Event-log entries committed to disk", namespace=NAMESPACE
)
EVENTLOG_ENTRIES_DROPPED: Final = Counter(
    "eventlog_entries_dropped",
    "Event-log entries lost, by reason: writer behind (queue_full), log closed, or the entry"
    " itself refused by SQLite (write_failed)",
    ["reason"],
    namespace=NAMESPACE,
)
EVENTLOG_ENTRIES_QUEUED: Final = Gauge(
    "eventlog_entries_queued", "Event-log entries waiting for the writer", namespace=NAMESPACE
)

# --- WebSocket ----------------------------------------------------------------------------

WS_MESSAGES: Final = Counter(
    "ws_messages",
    "WebSocket messages by direction and outcome",
    ["direction", "result"],
    namespace=NAMESPACE,
)

# --- Cluster (several nodes sharing Redis) --------------------------------------------------

NODE: Final = Info(
    "node",
    "This node: node_id (its id in the cluster directory and in JSON logs) and directory"
    " (redis: one of a cluster; local: alone, no Redis)",
    namespace=NAMESPACE,
)
CLUSTER_REDIS_UP: Final = Gauge(
    "cluster_redis_up",
    "1 if this node's last heartbeat reached Redis, else 0 (also 0 on a node without Redis:"
    " see openconsult_node_info's directory label)",
    namespace=NAMESPACE,
)
CLUSTER_HEARTBEAT_FAILURES: Final = Counter(
    "cluster_heartbeat_failures",
    "Heartbeats that could not reach Redis (one every cluster.lease_s / 3 while it is away)",
    namespace=NAMESPACE,
)
CLUSTER_NODES: Final = Gauge(
    "cluster_nodes",
    "Live nodes (this one included) this node saw in the directory at its last look (each heartbeat)",
    namespace=NAMESPACE,
)
CLUSTER_ROOMS_OWNED: Final = Gauge(
    "cluster_rooms_owned", "Room leases this node holds", namespace=NAMESPACE
)
CLUSTER_LEASES_LOST: Final = Counter(
    "cluster_leases_lost",
    "Room leases this node found taken by another node at renewal (a lease conflict: this node"
    " was cut off from Redis for longer than cluster.lease_s)",
    namespace=NAMESPACE,
)
CLUSTER_CLAIMS: Final = Counter(
    "cluster_claims",
    "Room-lease claims by result: won (held here now), elsewhere (another node holds the room),"
    " error (Redis did not answer)",
    ["result"],
    namespace=NAMESPACE,
)
CLUSTER_RELAYED_CONNECTIONS: Final = Gauge(
    "cluster_relayed_connections",
    "Signalling connections relayed between nodes, by side: door (socket here, room elsewhere)"
    " or owner (room here, socket elsewhere)",
    ["side"],
    namespace=NAMESPACE,
)


def _precreate() -> None:
    """Create every labelled series at 0 so it is exported before its first event."""
    for reason in DisconnectReason:
        CONNECTIONS_CLOSED.labels(reason=reason.value)
    for stream_reason in StreamDestroyedReason:
        STREAMS_DESTROYED.labels(reason=stream_reason.value)
    for code in TokenRejectCode:
        TOKENS_REJECTED.labels(code=code.value)
    for kind in MediaKind:
        RTP_PACKETS_FORWARDED.labels(kind=kind.value)
        RTP_BYTES_FORWARDED.labels(kind=kind.value)
    for drop_reason in DatagramDropReason:
        MEDIA_DATAGRAMS_DROPPED.labels(reason=drop_reason.value)
    for route_kind in UdpRouteKind:
        MEDIA_UDP_ROUTES.labels(kind=route_kind.value)
    for forward_reason in ForwardDropReason:
        RTP_PACKETS_DROPPED.labels(reason=forward_reason.value)
    for log_drop_reason in EventLogDropReason:
        EVENTLOG_ENTRIES_DROPPED.labels(reason=log_drop_reason.value)
    for claim_result in ClaimResult:
        CLUSTER_CLAIMS.labels(result=claim_result.value)
    for side in RelaySide:
        CLUSTER_RELAYED_CONNECTIONS.labels(side=side.value)
    for direction in WsDirection:
        for result in WsResult:
            WS_MESSAGES.labels(direction=direction.value, result=result.value)


_precreate()


def render(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its Content-Type header value."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
