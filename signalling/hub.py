"""The signalling core of one node: joins, publishes, subscriptions and leaves for
every live session, wired to the media router and the event log.

Each WebSocket connection is a ``Client`` (a send queue plus its joined state);
the ``Hub`` turns validated requests into session changes, media negotiation,
pushed events and event-log entries. Nothing here parses frames or knows HTTP.

A publish is announced (``streamCreated``, join's ``streams``) only once its peer
connection is connected: until then it waits in ``pending_streams``, and one the
router reaps for not connecting in time is logged as a publish failure.

What the browser saw (``client.event``, ``client.stats`` and the tab-closed beacon) is stored in
the sender's session with component ``client`` (``signalling.client_reports`` builds the entries),
counted against ``server.client_reports_per_min`` per connection.

A guest (role ``guest``: a relative or an interpreter the clinician added) joins on a link for the
consultation's room, so the consultation's session id; at join the workflow's ``guest_check``
says whether that link still works (not removed, the consultation not over). ``kick`` removes a
connection from its call (``forceDisconnected``), e.g. a guest the clinician removed.

Cluster (``signalling.failover``): a draining node refuses a join for a room new here
(``draining``); a claim that takes a room over from a failed node logs that failure before any
join it serves; a room another node claimed meanwhile is given up (``lose_room``: its clients
here are closed 1012, reason ``nodeFailure``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from media.errors import CodecNotSupported as MediaCodecNotSupported
from media.errors import MediaError as MediaPlaneError
from media.errors import AlreadyAnswered, PeerNotFound
from media.errors import OverCapacity as MediaOverCapacity
from media.events import (
    DimensionsChanged,
    KeyframeRequested,
    MediaEvent,
    MediaFlowChanged,
    PeerFailed,
    PeerStateChanged,
    PeerTimedOut,
    QualitySample,
)
from media.router import Router
from metrics.events import EventKind, now_ms
from metrics.recorder import PeerOwner, Recorder
from metrics.useragent import parse as parse_user_agent
from rooms.live import (
    LiveConnection,
    LiveRegistry,
    LiveSession,
    LiveStream,
    LiveSubscription,
)
from rooms.directory import LocalDirectory, NodeDraining, RoomDirectory, RoomLease
from rooms.errors import RoomsError
from rooms.model import (
    ConnectionId,
    DisconnectReason,
    Role,
    SessionId,
    StreamDestroyedReason,
    StreamId,
    SubscriptionId,
    new_id,
)
from signalling import failover, logs, turn
from signalling.auth import Claims, TokenAuthority, unverified_consultation, unverified_room
from signalling.client_reports import ReportLimiter, event_entry, stats_entries
from signalling.config import Config
from signalling.errors import (
    CodecNotSupported,
    Forbidden,
    InvalidState,
    MediaError,
    NotFound,
    OpenConsultError,
    OverCapacity,
)

logger = logging.getLogger(__name__)

#: Connections remembered after they joined, for the tab-closed beacon that may come after the
#: socket is gone (bounded: the oldest are forgotten first).
KNOWN_CONNECTIONS_MAX = 10_000


__all__ = ["Client", "Hub", "PeerOwner"]


class Client:
    """One signalling connection: its outbound queue and, once joined, its identity."""

    def __init__(self, send: Callable[[dict[str, Any]], None], remote_ip: str = "", user_agent: str = "") -> None:
        self.send = send
        self.remote_ip = remote_ip
        self.user_agent = user_agent
        self.claims: Claims | None = None
        self.session: LiveSession | None = None
        self.connection: LiveConnection | None = None
        self.left = False
        #: Set by the WebSocket edge: close this client's socket (after it was kicked).
        self.close_socket: Callable[[], None] | None = None
        #: Set by the WebSocket edge: close this client's socket with 1012 (its room moved to another
        #: node; the SDK rejoins and lands on the room's owner).
        self.close_moved: Callable[[], None] | None = None
        #: Set by the WebSocket edge for a client relayed to the node holding its room: whether
        #: that node accepted its join (it is joined there, not here).
        self.relayed: Callable[[], bool] = lambda: False


class Hub:
    def __init__(self, tokens: TokenAuthority, router: Router, recorder: Recorder, config: Config | None = None) -> None:
        self.config = config or Config()
        self.max_publishes = self.config.server.max_publishes_per_connection
        self.max_subscriptions = self.config.server.max_subscriptions_per_connection
        self.tokens = tokens
        self.router = router
        self.recorder = recorder
        self.registry = LiveRegistry()
        self.clients: dict[ConnectionId, Client] = {}
        self.peers: dict[str, PeerOwner] = {}
        #: Publishes answered but not connected yet: not announced, not subscribable.
        self.pending_streams: dict[StreamId, LiveStream] = {}
        #: Which node holds which room (``signalling.app`` sets the cluster's when ``redis_url`` is
        #: set): a room's first join here claims its lease (a room lives on one node), its
        #: session's end releases it.
        self.directory: RoomDirectory = LocalDirectory()
        self.leases: dict[str, RoomLease] = {}
        #: Claims in progress, by room (joins racing for a room new here share one).
        self.claiming: dict[str, asyncio.Future[SessionId]] = {}
        #: The node drains (``signalling.failover``): a join for a room not held here is refused.
        self.draining = False
        #: Client reports (client.event, client.stats, beacons) per connection.
        self.report_limiter = ReportLimiter(self.config.server.client_reports_per_min)
        #: connection id -> (session id, token sub, room) of connections that joined lately.
        self.known_connections: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        #: Set by the workflow: raises a coded error unless a guest's link still works.
        self.guest_check: Callable[[Claims], Awaitable[object]] | None = None
        router.observer = self.on_media_event

    # --- helpers ----------------------------------------------------------------------

    def log(self, session_id: str, kind: EventKind, text: str, *, connection_id: str | None = None,
            stream_id: str | None = None, **payload: Any) -> None:
        self.recorder.log(session_id, kind, text, connection_id=connection_id, stream_id=stream_id, **payload)

    def broadcast(self, session: LiveSession, name: str, data: dict[str, Any],
                  exclude: ConnectionId | None = None) -> None:
        message = {"type": "event", "event": name, "data": data}
        for connection_id in list(session.connections):
            if connection_id == exclude:
                continue
            client = self.clients.get(connection_id)
            if client is not None:
                client.send(message)

    def _planned_session(self, claims: Claims) -> SessionId:
        """The session id the token's room runs under here: its live session's, else a new one. A
        consultation's room runs under the consultation's own session id, so its workflow and
        media entries share one log (the id support staff paste); any other room gets a fresh
        session id per instance."""
        room = claims.room
        current = self.registry.by_room.get(room)
        if current is not None:
            return current
        return SessionId(room) if claims.consultation == room else SessionId(new_id("s"))

    def _peer_count(self, connection_id: str, publish: bool) -> int:
        """Peer connections of a connection, negotiating ones included."""
        return sum(1 for o in self.peers.values() if o.connection_id == connection_id and o.is_publish == publish)

    @staticmethod
    def joined(client: Client) -> tuple[LiveSession, LiveConnection]:
        if client.session is None or client.connection is None:
            raise InvalidState("join the session first")
        return client.session, client.connection

    # --- requests ---------------------------------------------------------------------

    async def join(self, client: Client, token: str, room: str | None, user_agent: str | None,
                   sdk_version: str | None = None) -> dict[str, Any]:
        if client.session is not None:
            raise InvalidState("this connection has already joined")
        try:
            claims = self.tokens.verify(token, room=room)
        except OpenConsultError as exc:
            consultation = unverified_consultation(token)
            self.recorder.token_rejected(token, exc.message, str(exc.code), room or unverified_room(token),
                                         session_id=consultation)
            raise
        if claims.waiting_room is not None and claims.consultation is None:
            # A shared walk-in link is not a room ticket: POST /api/walk-in trades it for one.
            raise Forbidden("a walk-in link cannot join a room; the page first starts a walk-in with it")
        if claims.role is Role.GUEST:
            await self._check_guest(client, claims)
        planned = self._planned_session(claims)
        pending = self.claiming.get(claims.room)
        if pending is None and claims.room not in self.leases:
            if self.draining:
                raise NodeDraining("this node is draining: it finishes its calls and takes no new room; "
                                   "join through another node")
            # A room new here: own it in the cluster first, so it lives on one node only
            # (RoomOwnedElsewhere: the edge relays the join to the owner; DirectoryUnavailable).
            pending = self.claiming[claims.room] = asyncio.ensure_future(self._claim(claims.room, planned))
            pending.add_done_callback(self._claimed)
        if pending is not None:  # a claim in progress (ours or a racing join's): wait for it
            planned = await asyncio.shield(pending)
        session, created = self.registry.session_for_room(claims.room, planned)
        connection = LiveConnection(ConnectionId(new_id("c")), claims.name, claims.role, claims.sub,
                                    user_agent=user_agent or client.user_agent, ip=client.remote_ip)
        sid = session.session_id
        if created:
            self.recorder.session_started()
            self.log(sid, EventKind.VIDEO_SESSION,
                     f'Video session id ({sid}) has been created for room "{claims.room}"', room=claims.room)
        user_data = {"user_agent": connection.user_agent, "ip": connection.ip, "sdk_version": sdk_version or "",
                     **parse_user_agent(connection.user_agent)}
        self.log(sid, EventKind.CONNECT_ATTEMPT, f"Connect attempt: {claims.name} ({claims.role})",
                 connection_id=connection.connection_id, **user_data)
        client.claims, client.session, client.connection = claims, session, connection
        self.known_connections[connection.connection_id] = (sid, claims.sub, claims.room)
        if len(self.known_connections) > KNOWN_CONNECTIONS_MAX:
            self.known_connections.popitem(last=False)
        session.connections[connection.connection_id] = connection
        self.clients[connection.connection_id] = client
        self.recorder.connection_joined()
        self.log(sid, EventKind.SERVER_DETECTED_CONNECT, f"Server detected connect: {claims.name} ({claims.role})",
                 connection_id=connection.connection_id, role=str(claims.role), name=claims.name, user=claims.sub,
                 **user_data)
        self.broadcast(session, "connectionCreated", {"connection": connection.public()},
                       exclude=connection.connection_id)
        self.log(sid, EventKind.SUCCESSFULLY_JOINED, f"Successfully joined the session: {claims.name}",
                 connection_id=connection.connection_id)
        # From here on every line this connection's task logs names its session and connection.
        logs.bind(session_id=sid, connection_id=connection.connection_id)
        logger.info("connection joined room %s as %s", claims.room, claims.role)
        return {
            "session_id": sid, "connection_id": connection.connection_id, "room": claims.room,
            "role": str(claims.role), "name": claims.name,
            "connections": [c.public() for c in session.connections.values()
                            if c.connection_id != connection.connection_id],
            "streams": [s.public() for s in session.streams.values()],
            "ice_servers": turn.ice_servers(self.config.media, connection.connection_id),
        }

    async def _check_guest(self, client: Client, claims: Claims) -> None:
        """A guest joins only on a link the workflow issued for this consultation and still honours;
        a refused one is logged in the consultation's session, where support looks."""
        if claims.consultation is None or claims.consultation != claims.room or claims.link is None:
            raise Forbidden("a guest token must name the consultation it was issued for (its room) and its guest id")
        if self.guest_check is None:
            raise Forbidden("this node takes no guests: it runs no clinical workflow")
        try:
            await self.guest_check(claims)
        except (OpenConsultError, RoomsError) as exc:
            self.recorder.link_refused(claims.consultation, str(exc.code), exc.message)
            raise
        if client.session is not None:
            raise InvalidState("this connection has already joined")

    async def publish(self, client: Client, offer: dict[str, Any], name: str | None,
                      video_source: str | None) -> dict[str, Any]:
        session, connection = self.joined(client)
        if self._peer_count(connection.connection_id, publish=True) >= self.max_publishes:
            raise InvalidState(f"this connection already publishes {self.max_publishes} streams, the most allowed")
        if session.room not in self.leases:
            # The lease was lost (e.g. Redis came back with another owner): claim it again or fail.
            self.leases[session.room] = await self.directory.claim(session.room, session.session_id)
        stream_id = StreamId(new_id("st"))
        sid = session.session_id
        self.log(sid, EventKind.PUBLISH_ATTEMPT, f"Publish attempt: {connection.name}",
                 connection_id=connection.connection_id, stream_id=stream_id)
        self.peers[stream_id] = PeerOwner(sid, connection.connection_id, stream_id, True)
        try:
            answer = await self.router.publish(stream_id, offer["sdp"])
        except MediaPlaneError as exc:
            self.peers.pop(stream_id, None)
            self.log(sid, EventKind.PUBLISH_FAILURE, f"Publish failed: {connection.name}: {exc}",
                     connection_id=connection.connection_id, stream_id=stream_id, error=str(exc))
            if isinstance(exc, MediaOverCapacity):
                raise OverCapacity(str(exc)) from None
            if isinstance(exc, MediaCodecNotSupported):
                raise CodecNotSupported(str(exc)) from None
            raise MediaError(str(exc)) from None
        if client.session is not session or connection.connection_id not in session.connections:
            # The client left while we negotiated.
            self.peers.pop(stream_id, None)
            await self.router.close_peer(stream_id)
            raise InvalidState("the connection left during publish")
        peer = self.router.publishes[stream_id]
        kinds = peer.tracks.keys()
        stream = LiveStream(stream_id, connection.connection_id, name or connection.name, video_source or "camera",
                            has_audio="audio" in kinds, has_video="video" in kinds)
        self.log(sid, EventKind.PUBLISH_SUCCESS, f"Publish succeeded: {connection.name}",
                 connection_id=connection.connection_id, stream_id=stream_id)
        self.pending_streams[stream_id] = stream
        if peer.connected:
            self._announce(session, stream_id)
        return {"stream_id": stream_id, "answer": {"type": "answer", "sdp": answer}}

    def _announce(self, session: LiveSession, stream_id: StreamId) -> None:
        """The publish's media path is up: the stream becomes live for the others."""
        stream = self.pending_streams.pop(stream_id, None)
        if stream is None or stream.connection_id not in session.connections:
            return
        sid = session.session_id
        session.streams[stream_id] = stream
        self.recorder.stream_live()
        kinds = (f"{'audio' if stream.has_audio else ''}{'+' if stream.has_audio and stream.has_video else ''}"
                 f"{'video' if stream.has_video else ''}")
        # A screen share is a second stream of the same participant; support reads it as such.
        shown = (f"{self._connection_name_of(session, stream)} started screen sharing" if stream.video_source == "screen"
                 else stream.name)
        self.log(sid, EventKind.STREAM_CREATED, f"Stream created: {shown} ({kinds})",
                 connection_id=stream.connection_id, stream_id=stream_id, name=stream.name,
                 video_source=stream.video_source, has_audio=stream.has_audio, has_video=stream.has_video)
        self.broadcast(session, "streamCreated", {"stream": stream.public()}, exclude=stream.connection_id)

    async def _drop_pending(self, session: LiveSession, stream: LiveStream, reason: str) -> None:
        """A publish that never got connected ends: free its peer and log why (no one was told of it)."""
        if self.pending_streams.pop(stream.stream_id, None) is None:
            return
        self.router.report_unconnected(stream.stream_id)  # logged while its owner is known
        self.peers.pop(stream.stream_id, None)
        await self.router.close_peer(stream.stream_id)
        self.log(session.session_id, EventKind.PUBLISH_FAILURE, f"Publish failed: {stream.name}: {reason}",
                 connection_id=stream.connection_id, stream_id=stream.stream_id, error=reason)

    async def unpublish(self, client: Client, stream_id: str) -> dict[str, Any]:
        session, connection = self.joined(client)
        pending = self.pending_streams.get(StreamId(stream_id))
        if pending is not None and pending.connection_id == connection.connection_id:
            await self._drop_pending(session, pending, "unpublished before its media connected")
            return {}
        stream = session.streams.get(StreamId(stream_id))
        if stream is None or stream.connection_id != connection.connection_id:
            raise NotFound(f'No stream "{stream_id}" published by this connection')
        await self.destroy_stream(session, stream, StreamDestroyedReason.CLIENT_DISCONNECTED)
        return {}

    async def subscribe(self, client: Client, stream_id: str) -> dict[str, Any]:
        session, connection = self.joined(client)
        stream = session.streams.get(StreamId(stream_id))
        sid = session.session_id
        if stream is None:
            self.log(sid, EventKind.SUBSCRIBE_FAILURE, f"Subscribe failed: no stream {stream_id}",
                     connection_id=connection.connection_id, stream_id=stream_id)
            if StreamId(stream_id) in self.pending_streams:
                raise NotFound(f'Stream "{stream_id}" is not live yet: its media has not connected '
                               "(subscribe on streamCreated)")
            raise NotFound(f'No stream "{stream_id}" in session "{sid}"')
        if self._peer_count(connection.connection_id, publish=False) >= self.max_subscriptions:
            raise InvalidState(f"this connection already holds {self.max_subscriptions} subscriptions, "
                               "the most allowed")
        subscription_id = SubscriptionId(new_id("sub"))
        self.log(sid, EventKind.SUBSCRIBE_ATTEMPT, f"Subscribe attempt: {connection.name} to {stream.name}",
                 connection_id=connection.connection_id, stream_id=stream_id, subscription_id=subscription_id)
        self.peers[subscription_id] = PeerOwner(sid, connection.connection_id, stream_id, False)
        try:
            offer = await self.router.subscribe(subscription_id, stream_id)
        except MediaPlaneError as exc:
            self.peers.pop(subscription_id, None)
            self.log(sid, EventKind.SUBSCRIBE_FAILURE, f"Subscribe failed: {exc}",
                     connection_id=connection.connection_id, stream_id=stream_id)
            if isinstance(exc, MediaOverCapacity):
                raise OverCapacity(str(exc)) from None
            raise MediaError(str(exc)) from None
        if stream.stream_id not in session.streams or client.connection is not connection:
            self.peers.pop(subscription_id, None)
            await self.router.close_peer(subscription_id)
            raise NotFound(f'Stream "{stream_id}" ended during subscribe')
        session.subscriptions[subscription_id] = LiveSubscription(subscription_id, connection.connection_id,
                                                                  stream.stream_id)
        self.recorder.subscription_started()
        return {"subscription_id": subscription_id, "offer": {"type": "offer", "sdp": offer}}

    async def answer(self, client: Client, subscription_id: str, answer: dict[str, Any]) -> dict[str, Any]:
        session, connection = self.joined(client)
        subscription = self._own_subscription(session, connection, subscription_id)
        try:
            await self.router.answer(subscription_id, answer["sdp"])
        except PeerNotFound as exc:
            raise NotFound(str(exc)) from None
        except AlreadyAnswered as exc:
            raise InvalidState(str(exc)) from None
        except MediaPlaneError as exc:
            self.log(session.session_id, EventKind.SUBSCRIBE_FAILURE, f"Subscribe failed: {exc}",
                     connection_id=connection.connection_id, stream_id=subscription.stream_id)
            if isinstance(exc, MediaCodecNotSupported):
                raise CodecNotSupported(str(exc)) from None
            raise MediaError(str(exc)) from None
        self.log(session.session_id, EventKind.SUBSCRIBE_SUCCESS, f"Subscribe succeeded: {connection.name}",
                 connection_id=connection.connection_id, stream_id=subscription.stream_id,
                 subscription_id=subscription_id)
        return {}

    async def unsubscribe(self, client: Client, subscription_id: str) -> dict[str, Any]:
        session, connection = self.joined(client)
        subscription = self._own_subscription(session, connection, subscription_id)
        await self._end_subscription(session, subscription, "unsubscribed", notify=False)
        return {}

    async def ice(self, client: Client, peer_id: str, candidate: dict[str, Any] | None) -> dict[str, Any]:
        _, connection = self.joined(client)
        owner = self.peers.get(peer_id)
        if owner is None or owner.connection_id != connection.connection_id:
            raise NotFound(f'No peer "{peer_id}" of this connection')
        try:
            await self.router.add_ice_candidate(peer_id, candidate)
        except PeerNotFound as exc:
            raise NotFound(str(exc)) from None
        except MediaPlaneError as exc:
            raise MediaError(str(exc)) from None
        return {}

    # --- what the browser saw ---------------------------------------------------------

    def client_event(self, client: Client, message: Mapping[str, Any]) -> dict[str, Any]:
        """A validated ``client.event``: one ``clientEvent`` entry in the sender's session."""
        session, connection = self.joined(client)
        self.report_limiter.check(connection.connection_id, time.monotonic())
        self.recorder.entry(event_entry(session.session_id, connection.connection_id, message, now_ms()))
        return {}

    def client_stats(self, client: Client, message: Mapping[str, Any]) -> dict[str, Any]:
        """A validated ``client.stats``: one ``clientStats`` entry per track in the sender's session."""
        session, connection = self.joined(client)
        self.report_limiter.check(connection.connection_id, time.monotonic())
        known = set(session.streams)
        for entry in stats_entries(session.session_id, connection.connection_id, message, now_ms(), known):
            self.recorder.entry(entry)
        return {}

    def client_beacon(self, claims: Claims, connection_id: str, message: Mapping[str, Any]) -> None:
        """A ``client.event`` sent over HTTP (the tab is closing; the socket may be gone): stored in
        the session that connection joined, if the token is the one it joined with (same user, room)."""
        known = self.known_connections.get(connection_id)
        if known is None or known[1:] != (claims.sub, claims.room):
            raise NotFound(f'No connection "{connection_id}" joined with this token on this node')
        self.report_limiter.check(connection_id, time.monotonic())
        self.recorder.entry(event_entry(known[0], connection_id, message, now_ms()))

    def _own_subscription(self, session: LiveSession, connection: LiveConnection,
                          subscription_id: str) -> LiveSubscription:
        subscription = session.subscriptions.get(SubscriptionId(subscription_id))
        if subscription is None or subscription.connection_id != connection.connection_id:
            raise NotFound(f'No subscription "{subscription_id}" of this connection')
        return subscription

    # --- teardown ---------------------------------------------------------------------

    async def _end_subscription(self, session: LiveSession, subscription: LiveSubscription, reason: str,
                                notify: bool, detail: str = "") -> None:
        if session.subscriptions.pop(subscription.subscription_id, None) is None:
            return
        self.router.report_unconnected(subscription.subscription_id)  # logged while its owner is known
        self.peers.pop(subscription.subscription_id, None)
        self.recorder.subscription_ended()
        await self.router.close_peer(subscription.subscription_id)
        self.log(session.session_id, EventKind.UNSUBSCRIBED,
                 f"Subscription ended: {reason}" + (f" ({detail})" if detail else ""),
                 connection_id=subscription.connection_id, stream_id=subscription.stream_id,
                 subscription_id=subscription.subscription_id, reason=reason, **({"detail": detail} if detail else {}))
        client = self.clients.get(subscription.connection_id)
        if notify and client is not None:
            client.send({"type": "event", "event": "subscriptionEnded",
                         "data": {"subscription_id": subscription.subscription_id,
                                  "stream_id": subscription.stream_id, "reason": reason}})

    async def destroy_stream(self, session: LiveSession, stream: LiveStream, reason: StreamDestroyedReason) -> None:
        if session.streams.pop(stream.stream_id, None) is None:
            return
        self.recorder.stream_ended(str(reason))
        for subscription in session.subscriptions_to(stream.stream_id):
            await self._end_subscription(session, subscription, str(reason), notify=True)
        self.peers.pop(stream.stream_id, None)
        await self.router.close_peer(stream.stream_id)
        shown = (f"{self._connection_name_of(session, stream)} stopped screen sharing" if stream.video_source == "screen"
                 else stream.name)
        self.log(session.session_id, EventKind.STREAM_DESTROYED, f"Stream destroyed: {shown}. Reason: {reason}",
                 connection_id=stream.connection_id, stream_id=stream.stream_id, reason=str(reason),
                 video_source=stream.video_source)
        self.broadcast(session, "streamDestroyed", {"stream": stream.public(), "reason": str(reason)},
                       exclude=stream.connection_id)

    async def kick(self, client: Client, detail: str) -> None:
        """Take a joined client out of its call (``forceDisconnected``): it is told why
        (``removedFromCall``), the others get ``connectionDestroyed``, then its socket closes."""
        session, connection = client.session, client.connection
        if session is None or connection is None or client.left:
            return
        client.send({"type": "event", "event": "removedFromCall",
                     "data": {"session_id": session.session_id, "reason": str(DisconnectReason.FORCE_DISCONNECTED),
                              "detail": detail}})
        await self.disconnect(client, DisconnectReason.FORCE_DISCONNECTED, detail)
        if client.close_socket is not None:
            client.close_socket()

    async def disconnect(self, client: Client, reason: DisconnectReason, detail: str = "") -> None:
        """Remove a joined client: its subscriptions, streams and connection. Idempotent."""
        session, connection = client.session, client.connection
        if session is None or connection is None or client.left:
            return
        client.left = True
        for subscription in session.subscriptions_of(connection.connection_id):
            await self._end_subscription(session, subscription, str(reason), notify=False)
        for stream in session.streams_of(connection.connection_id):
            await self.destroy_stream(session, stream, StreamDestroyedReason.from_disconnect(reason))
        for pending in [s for s in self.pending_streams.values() if s.connection_id == connection.connection_id]:
            await self._drop_pending(session, pending, f"the connection left ({reason}) before its media connected")
        session.connections.pop(connection.connection_id, None)
        self.clients.pop(connection.connection_id, None)
        self.recorder.connection_left(str(reason))
        self.log(session.session_id, EventKind.DISCONNECT,
                 f"Server detected disconnect: {connection.name}. Reason: {reason}" + (f" ({detail})" if detail else ""),
                 connection_id=connection.connection_id, reason=str(reason), **({"detail": detail} if detail else {}))
        self.broadcast(session, "connectionDestroyed", {"connection": connection.public(), "reason": str(reason)})
        logger.info("connection left: %s", reason,
                    extra={"session_id": session.session_id, "connection_id": connection.connection_id})
        if self.registry.end_if_empty(session):
            self.recorder.session_ended()
            await self._release(session.room)

    async def _release(self, room: str) -> None:
        """The room's session ended here: give its lease back (it expires anyway if this fails)."""
        lease = self.leases.pop(room, None)
        if lease is None or room in self.registry.by_room:
            return
        try:
            await self.directory.release(lease)
        except RoomsError as exc:
            logger.warning("room %s: lease not released (%s); it expires by itself", room, exc)

    def _claimed(self, done: asyncio.Future[SessionId]) -> None:
        for room, pending in list(self.claiming.items()):
            if pending is done:
                del self.claiming[room]

    async def _claim(self, room: str, session_id: SessionId) -> SessionId:
        """Own ``room`` for ``session_id`` in the cluster and, if its previous node failed, log
        that first; the session id to run the room under. Joins racing for a room new here share
        one such claim, so the failure is logged once and before any of them."""
        lease = self.leases[room] = await self.directory.claim(room, session_id)
        if lease.previous is not None:
            await self._node_failed(lease)
        return self.registry.by_room.get(room) or session_id

    async def _node_failed(self, lease: RoomLease) -> None:
        """This node took over a room another node held without releasing it: log the failure and
        close what the log shows that node left open, under the session it ran there."""
        previous = lease.previous
        assert previous is not None
        session_id = previous.session or lease.room
        try:
            await self.recorder.eventlog.flush(timeout=5)
            entries = await self.recorder.eventlog.events(session_id, kinds=failover.LEFT_OPEN_KINDS)
        except Exception as exc:  # the failure is still logged, without the connections
            logger.warning("room %s: could not read session %s to close what node %s left open: %s", lease.room,
                           session_id, previous.node, exc)
            entries = []
        found = failover.left_open(entries)
        # The door of a relayed connection may have logged it closed already (one of the two does).
        mine = {cid: name for cid, name in found.connections.items()
                if cid not in self.clients and await self._mark_closed(cid)}
        found = failover.LeftOpen(mine, found.streams)
        for kind, text, fields in failover.failure_entries(session_id, previous, lease.node, found):
            cid, stream = fields.pop("connection_id", None), fields.pop("stream_id", None)
            self.log(session_id, kind, text, connection_id=cid, stream_id=stream, **fields)
        logger.warning("room %s: node %s failed holding session %s; %d connections it left open logged as "
                       "nodeFailure", lease.room, previous.node, session_id, len(found.connections))

    async def _mark_closed(self, connection_id: str) -> bool:
        """Whether this node logs ``connection_id``'s ``nodeFailure`` disconnect (first in the
        cluster to mark it; with Redis away, yes: a duplicate beats a connection never closed)."""
        try:
            return await self.directory.mark_once(failover.closed_mark(connection_id), failover.CLOSED_MARK_S)
        except RoomsError:
            return True

    async def lose_room(self, room: str) -> None:
        """Another node claimed ``room`` while this one was cut off or paused: close its clients
        here (1012: the SDK rejoins and lands on the room's owner), so the room is held once."""
        session_id = self.registry.by_room.get(room)
        session = self.registry.sessions.get(session_id) if session_id is not None else None
        if session is None:
            return
        for connection_id in list(session.connections):
            client = self.clients.get(connection_id)
            if client is None:
                continue
            await self.disconnect(client, DisconnectReason.NODE_FAILURE, "the room moved to another node")
            if client.close_moved is not None:
                client.close_moved()

    async def shutdown(self) -> None:
        for client in list(self.clients.values()):
            await self.disconnect(client, DisconnectReason.SERVER_SHUTDOWN)

    # --- media events -----------------------------------------------------------------

    def on_media_event(self, event: MediaEvent) -> None:
        """The router's observer: the recorder records, the hub acts (announce, clean up)."""
        if isinstance(event, QualitySample):
            self.recorder.media_event(event, self.peers.get(event.peer_id))
            return
        peer_key = (event.stream_id if isinstance(event, (KeyframeRequested, DimensionsChanged, MediaFlowChanged))
                    else getattr(event, "peer_id", None))
        owner = self.peers.get(peer_key) if peer_key is not None else None
        name = self._connection_name(owner) if owner is not None and isinstance(event, MediaFlowChanged) else ""
        self.recorder.media_event(event, owner, name)
        if owner is None:
            return
        if isinstance(event, PeerStateChanged):
            if owner.is_publish and event.layer == "connection" and event.state == "connected":
                session = self.registry.sessions.get(SessionId(owner.session_id))
                if session is not None:
                    self._announce(session, StreamId(event.stream_id))
        elif isinstance(event, (PeerFailed, PeerTimedOut)):
            asyncio.get_running_loop().create_task(self._peer_failed(owner, event))

    @staticmethod
    def _connection_name_of(session: LiveSession, stream: LiveStream) -> str:
        connection = session.connections.get(stream.connection_id)
        return connection.name if connection is not None else stream.name

    def _connection_name(self, owner: PeerOwner) -> str:
        session = self.registry.sessions.get(SessionId(owner.session_id))
        connection = session.connections.get(ConnectionId(owner.connection_id)) if session else None
        return connection.name if connection else owner.connection_id

    async def _peer_failed(self, owner: PeerOwner, event: PeerFailed | PeerTimedOut) -> None:
        session = self.registry.sessions.get(owner.session_id)  # type: ignore[call-overload]
        if session is None:
            return
        if isinstance(event, PeerTimedOut):
            self.recorder.peer_timed_out()
            reason = StreamDestroyedReason.NETWORK_DISCONNECTED
            detail = f"not connected (ICE and DTLS) within {event.timeout_s:g} s"
        else:
            reason = StreamDestroyedReason.NETWORK_DISCONNECTED if event.state == "failed" \
                else StreamDestroyedReason.MEDIA_STOPPED
            detail = f"peer connection {event.state} before its media connected"
        if owner.is_publish:
            pending = self.pending_streams.get(StreamId(owner.stream_id))
            if pending is not None:
                await self._drop_pending(session, pending, detail)
            stream = session.streams.get(StreamId(owner.stream_id))
            if stream is not None:
                await self.destroy_stream(session, stream, reason)
        else:
            subscription = session.subscriptions.get(SubscriptionId(event.peer_id))
            if subscription is not None:
                await self._end_subscription(session, subscription, str(reason), notify=True,
                                             detail=detail if isinstance(event, PeerTimedOut) else "")
