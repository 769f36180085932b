"""The WebSocket endpoint: frames in, coded replies and events out.

The read loop never raises: every bad frame becomes an error reply and the socket stays usable,
except a failed join (closed with 4001 after the reply) and abuse: too many invalid frames
(4001) or a frame over ``server.max_message_bytes`` (1009). aiohttp enforces that limit where the
bytes arrive, before buffering a frame's payload and while inflating a compressed one, so a
deflate bomb costs at most the limit.

Outbound messages go through one bounded :class:`Outbox` per connection, drained by one writer
task. Replies to the client's own requests wait for room in it, which pauses reading that
client: a client that sends faster than it reads slows itself down and nothing else. Pushed
events never wait; an event that finds the outbox full marks a slow consumer. Every write has a
deadline (``server.write_timeout_s``); a slow consumer is dropped with close code 4008 and
disconnect reason ``slowConsumer``. Encoding a message can never end a connection: a message that
cannot be encoded is logged (rate-limited), retried with lone surrogates replaced, and otherwise
replaced by an ``internal_error`` reply (a response) or dropped (an event).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.base_protocol import BaseProtocol

from metrics import prometheus as prom
from metrics.eventlog import EventStore
from metrics.events import EventKind
from metrics.recorder import Recorder
from rooms.directory import NodeId, Notice, RoomDirectory, RoomOwnedElsewhere
from rooms.errors import RoomsError
from rooms.model import DisconnectReason
from signalling import failover
from signalling.audit import join_sign_in
from signalling.codec import SUBPROTOCOLS, Codec, error_response, response_error, response_ok, scrubbed
from signalling.errors import (
    ErrorCode,
    InternalError,
    MessageTooLarge,
    OpenConsultError,
    OverCapacity,
    ProtocolError,
    coded,
)
from signalling.cluster import DIRECTORY_KEY
from signalling.hub import Client, Hub
from signalling.proxies import client_ip, networks
from signalling.keys import (
    CONFIG_KEY,
    EVENTLOG_KEY,
    HUB_KEY,
    SHUTTING_DOWN_KEY,
    SOCKETS_KEY,
    WORKFLOW_KEY,
)
from signalling.workflow import Workflow

logger = logging.getLogger(__name__)

CLOSE_POLICY: Final = 4001
#: The client did not read what it was sent (reason ``slowConsumer``).
CLOSE_SLOW_CONSUMER: Final = 4008
#: Messages an outbox holds at most; a pushed event that finds it full marks a slow consumer.
SEND_QUEUE_MAX: Final = 512
#: A reply waits while the outbox holds this many messages, so replies never crowd out events.
REPLY_WINDOW: Final = 64
JOIN_ERRORS = ("unauthorized", "token_expired", "token_not_yet_valid", "room_mismatch", "forbidden")
_ENCODE_ERRORS: Final = (ValueError, TypeError, OverflowError)


class LogLimiter:
    """At most one log line per ``interval_s``, telling how many were held back. Time is passed in."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = -math.inf
        self._held = 0

    def allow(self, now: float) -> int | None:
        """None: stay quiet. Otherwise log now, mentioning the returned number of held-back lines."""
        if now < self._next:
            self._held += 1
            return None
        held, self._held = self._held, 0
        self._next = now + self.interval_s
        return held


# Shared by every connection: a flood from many sockets is one line per interval, not one each.
_ENCODE_FAILURES: Final = LogLimiter(10.0)
_SLOW_CONSUMERS: Final = LogLimiter(10.0)


class Outbox:
    """The outbound messages of one connection, drained by its writer task.

    ``push`` (pushed events, called by the hub and the workflow) never waits: a full outbox
    marks the client a slow consumer and drops what it held. ``put_reply`` (replies to the
    client's own requests, awaited by the read loop) waits while ``reply_window`` or more
    messages are queued, which is backpressure on that client's reading.
    """

    def __init__(self, limit: int = SEND_QUEUE_MAX, reply_window: int = REPLY_WINDOW) -> None:
        self.limit = limit
        self.reply_window = reply_window
        self._items: deque[Mapping[str, Any]] = deque()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        #: No more messages are taken (``finish`` or ``abandon``).
        self.closed = False
        #: The client did not read: its outbox overflowed or a write missed its deadline.
        self.slow_consumer = False

    def __len__(self) -> int:
        return len(self._items)

    def push(self, message: Mapping[str, Any]) -> None:
        """Queue a pushed event without waiting."""
        if self.closed:
            prom.WS_MESSAGES.labels(direction="out", result="dropped").inc()
            return
        if len(self._items) >= self.limit:
            self.slow_consumer = True
            self.abandon()
            return
        self._items.append(message)
        self._readable.set()

    async def put_reply(self, message: Mapping[str, Any]) -> None:
        """Queue a reply once there is room for it (dropped if the outbox closes meanwhile)."""
        while not self.closed and len(self._items) >= self.reply_window:
            self._room.clear()
            await self._room.wait()
        if self.closed:
            prom.WS_MESSAGES.labels(direction="out", result="dropped").inc()
            return
        self._items.append(message)
        self._readable.set()

    async def get(self) -> Mapping[str, Any] | None:
        """The next message to send; None once closed and empty."""
        while not self._items:
            if self.closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        message = self._items.popleft()
        if len(self._items) < self.reply_window:
            self._room.set()
        return message

    def finish(self) -> None:
        """Take no more messages; the writer sends those queued, then stops."""
        self.closed = True
        self._readable.set()
        self._room.set()

    def abandon(self) -> None:
        """Take no more messages and drop those queued; the writer stops."""
        if self._items:
            prom.WS_MESSAGES.labels(direction="out", result="dropped").inc(len(self._items))
            self._items.clear()
        self.finish()


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    config = request.app[CONFIG_KEY]
    hub = request.app[HUB_KEY]
    workflow = request.app[WORKFLOW_KEY]
    write_timeout = config.server.write_timeout_s
    sockets = request.app[SOCKETS_KEY]
    if len(sockets) >= config.server.max_connections:
        # Refused before the upgrade, so a flood of sockets costs this node nothing it keeps.
        raise OverCapacity(f"this node holds {config.server.max_connections} connections "
                                 "(server.max_connections); try again later")
    # aiohttp refuses a data frame whose payload is >= max_msg_size before buffering it, and a
    # compressed one as soon as it inflates past it; both close 1009. +1: the limit itself is fine.
    ws = web.WebSocketResponse(protocols=SUBPROTOCOLS, heartbeat=config.server.heartbeat_s,
                               max_msg_size=config.server.max_message_bytes + 1)
    await ws.prepare(request)
    codec = Codec.for_subprotocol(ws.ws_protocol, config.server.max_message_bytes)
    outbox = Outbox()
    remote_ip = client_ip(request.remote, request.headers, networks(config.server.trusted_proxies))
    client = Client(outbox.push, remote_ip=remote_ip, user_agent=request.headers.get("User-Agent", ""))
    transport = request.transport
    writer = asyncio.create_task(_write_loop(ws, request.protocol, transport, codec, outbox, write_timeout,
                                             client.remote_ip))
    sockets.add(ws)

    def close_kicked() -> None:
        """The hub took this client out of its call: flush its last events, then close."""
        task = asyncio.get_running_loop().create_task(
            _close_after(outbox, writer, ws, transport, CLOSE_POLICY, b"removed from the call", write_timeout))
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    client.close_socket = close_kicked

    def close_moved() -> None:
        """The room moved to another node (this one lost its lease): flush, then close 1012."""
        task = asyncio.get_running_loop().create_task(
            _close_after(outbox, writer, ws, transport, CLOSE_NODE_LOST, b"room moved to another node", write_timeout))
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    client.close_moved = close_moved
    clustered = bool(config.redis_url)
    directory = request.app[DIRECTORY_KEY]
    door = request.app[RELAY_DOOR_KEY]
    link: _DoorLink | None = None

    def close_relayed(code: int, why: bytes) -> None:
        """The owner ended the relayed connection (or was lost): flush, then close."""
        task = asyncio.get_running_loop().create_task(
            _close_after(outbox, writer, ws, transport, code, why, write_timeout))
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    async def open_relay(node: NodeId) -> _DoorLink:
        key = uuid.uuid4().hex
        opened = door.links[key] = _DoorLink(key, node, client, outbox, close_relayed)
        client.relayed = lambda: opened.joined
        # A node that died a moment ago still holds its leases until they expire: a join relayed
        # to it gets no answer, so the socket closes (1012) and the SDK tries again.
        asyncio.get_running_loop().call_later(
            directory.lease_s, lambda: None if opened.answered else opened.end(CLOSE_NODE_LOST, "node not answering"))
        await directory.send(node, Notice("relay.open", {"conn": key, "ip": client.remote_ip,
                                                         "ua": client.user_agent}))
        return opened
    # A socket that has not joined in time is closed: unauthenticated sockets cannot pile up.
    join_deadline = asyncio.get_running_loop().call_later(
        config.server.join_timeout_s, _close_unjoined, client, outbox, ws)
    reason = DisconnectReason.NETWORK_DISCONNECTED
    invalid = 0
    try:
        async for msg in ws:
            if outbox.slow_consumer:
                break  # the writer is cutting this client off: read no more of it
            if msg.type == WSMsgType.ERROR:
                # aiohttp has closed the socket already: 1009 for a frame over the limit
                # (compressed or not), 1002 for a broken frame, 1006 for a missed heartbeat.
                break
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            try:
                request_msg = codec.decode(msg.data)
            except ProtocolError as exc:
                invalid += 1
                prom.WS_MESSAGES.labels(direction="in", result="invalid").inc()
                await outbox.put_reply(error_response(exc.request_id, exc))
                if isinstance(exc, MessageTooLarge):
                    await _close_after(outbox, writer, ws, transport, WSCloseCode.MESSAGE_TOO_BIG,
                                       b"message too large", write_timeout)
                    break
                if invalid >= config.server.max_invalid_messages:
                    await _close_after(outbox, writer, ws, transport, CLOSE_POLICY, b"too many invalid messages",
                                       write_timeout)
                    break
                continue
            prom.WS_MESSAGES.labels(direction="in", result="ok").inc()
            request_id = request_msg.get("id")
            try:
                if (clustered and link is None and request_msg["type"] == "join" and client.claims is None
                        and (owner := await _route(hub, directory, request_msg)) is not None):
                    link = await open_relay(owner)
                if link is not None:
                    await directory.send(link.node, Notice("relay.req", {"conn": link.key, "msg": request_msg}))
                    if request_msg["type"] == "leave":
                        reason = DisconnectReason.CLIENT_DISCONNECTED
                    continue
                data = await _logged(request.app[EVENTLOG_KEY], _dispatch(hub, workflow, client, request_msg))
                if request_msg["type"] == "join" and client.claims is not None:
                    await join_sign_in(request, client.claims, request_msg["token"])  # staff: a Login entry
            except RoomOwnedElsewhere as exc:
                if not (clustered and link is None and request_msg["type"] == "join"):
                    await outbox.put_reply(error_response(request_id, coded(exc)))
                    continue
                # Another node claimed the room a moment before this one: relay the join to it.
                try:
                    link = await open_relay(exc.owner)
                    await directory.send(link.node, Notice("relay.req", {"conn": link.key, "msg": request_msg}))
                except RoomsError as again:
                    await outbox.put_reply(error_response(request_id, coded(again)))
                continue
            except (OpenConsultError, RoomsError) as exc:
                error = coded(exc)  # the one place domain errors become wire errors
                await outbox.put_reply(error_response(request_id, error))
                if request_msg["type"] == "join" and error.code in JOIN_ERRORS:
                    await _close_after(outbox, writer, ws, transport, CLOSE_POLICY, b"join refused", write_timeout)
                    break
                continue
            except Exception:
                logger.exception("request %s failed", request_msg.get("type"))
                await outbox.put_reply(
                    error_response(request_id, InternalError("the server failed to handle this request")))
                continue
            # The one place a request's reply is queued after dispatch.
            await outbox.put_reply(response_ok(request_id, data))
            if request_msg["type"] == "leave":
                reason = DisconnectReason.CLIENT_DISCONNECTED
                await _close_after(outbox, writer, ws, transport, WSCloseCode.OK, b"left", write_timeout)
                break
        else:
            # The loop ended without a close frame from us: a close frame from the
            # client is a client disconnect, anything else (timeout, reset) a network one.
            if ws.close_code in (WSCloseCode.OK, WSCloseCode.GOING_AWAY):
                reason = DisconnectReason.CLIENT_DISCONNECTED
    except asyncio.CancelledError:
        reason = DisconnectReason.SERVER_SHUTDOWN
        raise
    finally:
        join_deadline.cancel()
        if outbox.slow_consumer:
            reason = DisconnectReason.SLOW_CONSUMER
        if request.app.get(SHUTTING_DOWN_KEY):
            reason = DisconnectReason.SERVER_SHUTDOWN
        sockets.discard(ws)
        outbox.abandon()
        if link is not None:
            door.links.pop(link.key, None)
            try:
                await directory.send(link.node, Notice("relay.close", {"conn": link.key, "reason": str(reason)}))
            except RoomsError:
                pass  # the owner drops it when it finds this node gone
        workflow.forget(client)
        await hub.disconnect(client, reason)
        if not writer.done():
            writer.cancel()
        if not ws.closed:
            await _close(ws, transport, WSCloseCode.OK, b"", write_timeout)
    return ws


def _close_unjoined(client: Client, outbox: Outbox, ws: web.WebSocketResponse) -> None:
    if client.session is not None or client.relayed() or ws.closed:
        return
    outbox.finish()
    # ws.close() sends the close frame and ends the read loop.
    task = asyncio.get_running_loop().create_task(ws.close(code=CLOSE_POLICY, message=b"no join in time"))
    _CLOSING.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_CLOSING.discard)


_CLOSING: Final[set[asyncio.Task[Any]]] = set()


async def _close_after(outbox: Outbox, writer: asyncio.Task[None], ws: web.WebSocketResponse,
                       transport: asyncio.Transport | None, code: int, message: bytes, timeout: float) -> None:
    """Flush queued replies (each write has its deadline), then close with ``code``."""
    outbox.finish()
    try:
        await asyncio.wait_for(asyncio.shield(writer), timeout=2 * timeout)
    except asyncio.TimeoutError:
        pass
    await _close(ws, transport, code, message, timeout)


async def _close(ws: web.WebSocketResponse, transport: asyncio.Transport | None, code: int, message: bytes,
                 timeout: float) -> None:
    """Close with ``code``; a client that does not take the close frame in time is cut off."""
    try:
        async with asyncio.timeout(timeout):
            await ws.close(code=code, message=message)
    except TimeoutError:
        _abort(transport)


def _abort(transport: asyncio.Transport | None) -> None:
    # close() would wait to flush what the client never reads; abort() frees it now.
    if transport is not None:
        transport.abort()


async def _write_loop(ws: web.WebSocketResponse, protocol: BaseProtocol, transport: asyncio.Transport | None,
                      codec: Codec, outbox: Outbox, timeout: float, remote: str) -> None:
    opcode = WSMsgType.BINARY if codec.binary else WSMsgType.TEXT
    sent = prom.WS_MESSAGES.labels(direction="out", result="ok")
    # A write that leaves the transport's buffer under its high-water mark cannot pause writing,
    # so it cannot wait for the client: only a write that could wait pays for a deadline.
    high_water = transport.get_write_buffer_limits()[1] if transport is not None else 0
    try:
        while (message := await outbox.get()) is not None:
            payload = _payload(codec, message)
            if payload is None:
                continue
            try:
                if (transport is not None and not protocol.writing_paused
                        and transport.get_write_buffer_size() + len(payload) + 16 < high_water):
                    await ws.send_frame(payload, opcode)
                else:
                    async with asyncio.timeout(timeout):
                        await ws.send_frame(payload, opcode)
            except TimeoutError:
                # The client has not read for ``timeout``: a close frame would not reach it either.
                outbox.slow_consumer = True
                _log_slow_consumer(remote, f"a write waited more than {timeout:g} s")
                outbox.abandon()
                _abort(transport)
                return
            except (ConnectionError, RuntimeError):
                return
            sent.inc()
        if outbox.slow_consumer:
            _log_slow_consumer(remote, f"its send queue overflowed ({outbox.limit} messages)")
            await _close(ws, transport, CLOSE_SLOW_CONSUMER, b"slow consumer", timeout)
    finally:
        # However the writer ends, a read loop waiting for room in the outbox must not wait forever.
        outbox.abandon()


def _log_slow_consumer(remote: str, why: str) -> None:
    held = _SLOW_CONSUMERS.allow(time.monotonic())
    if held is not None:
        logger.warning("dropped a slow consumer from %s: %s (%d more not logged)", remote, why, held)


def _payload(codec: Codec, message: Mapping[str, Any]) -> bytes | None:
    """Frame bytes for ``message``; never raises. None: the message is dropped."""
    try:
        return codec.payload(message)
    except _ENCODE_ERRORS as exc:
        failure = exc
    prom.WS_MESSAGES.labels(direction="out", result="invalid").inc()
    held = _ENCODE_FAILURES.allow(time.monotonic())
    if held is not None:
        logger.error("could not encode a %s %s: %s: %s (%d more not logged)", message.get("type"),
                     message.get("event", ""), type(failure).__name__, str(failure)[:200], held)
    try:
        return codec.payload(scrubbed(message))  # lone surrogates: the one known cause
    except _ENCODE_ERRORS:
        pass
    if message.get("type") != "response":
        return None
    request_id = message.get("id")
    for reply_id in (request_id, None):
        try:
            return codec.payload(response_error(reply_id, ErrorCode.INTERNAL_ERROR,
                                                "the server could not encode its reply"))
        except _ENCODE_ERRORS:
            continue
    return None  # pragma: no cover - a fixed reply with a null id always encodes


_T = TypeVar("_T")


async def _logged(eventlog: EventStore, request: Awaitable[_T]) -> _T:
    """Run a request; before its reply (or coded error) goes out, wait until what was logged
    meanwhile is committed, so nothing a client is told survives only in memory."""
    mark = eventlog.appended
    try:
        result = await request
    except asyncio.CancelledError:
        raise  # shutting down: no reply goes out
    except BaseException:
        await eventlog.committed_since(mark)
        raise
    await eventlog.committed_since(mark)
    return result


async def _dispatch(hub: Hub, workflow: Workflow, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
    kind = msg["type"]
    if kind in workflow.handlers:
        return await workflow.handle(client, msg)
    if kind == "join":
        return await hub.join(client, msg["token"], msg.get("room"), msg.get("user_agent"), msg.get("sdk_version"))
    if kind == "ping":
        return {"time": time.time_ns() // 1_000_000}
    if kind == "leave":
        # Leave before the reply, so what the client was told is already logged.
        hub.joined(client)
        await hub.disconnect(client, DisconnectReason.CLIENT_DISCONNECTED)
        return {}
    if kind == "publish":
        return await hub.publish(client, msg["offer"], msg.get("name"), msg.get("video_source"))
    if kind == "unpublish":
        return await hub.unpublish(client, msg["stream_id"])
    if kind == "subscribe":
        return await hub.subscribe(client, msg["stream_id"])
    if kind == "answer":
        return await hub.answer(client, msg["subscription_id"], msg["answer"])
    if kind == "unsubscribe":
        return await hub.unsubscribe(client, msg["subscription_id"])
    if kind == "ice":
        return await hub.ice(client, msg["peer_id"], msg.get("candidate"))
    if kind == "client.event":
        return hub.client_event(client, msg)
    if kind == "client.stats":
        return hub.client_stats(client, msg)
    raise ProtocolError(f'unknown message type "{kind}"', msg.get("id"))  # schemas make this unreachable


# --- relay: a client whose room lives on another node ------------------------------------------
#
# With several nodes (``redis_url``), a client may reach any node (the *door*). A join for a room
# held by another node (or placed on one: two random choices) is relayed: the door sends the
# client's frames to the owner as ``relay.*`` notices through the room directory, the owner runs
# them on a connection of its own (same hub, same workflow, same event log, same ids) and sends
# every reply and pushed event back, in order. The client never notices; its media goes straight
# to the owner (the owner's ICE candidates are in the SDP). When the owner is lost (its lease or
# heartbeat gone) the door closes the socket with 1012 and the SDK rejoins, landing on a live
# node; when the door is lost the owner drops the connection (networkDisconnected).

#: A relayed connection's frames that may wait, each way, before it counts as a slow consumer.
RELAY_QUEUE_MAX: Final = SEND_QUEUE_MAX
#: Close code of a relayed socket whose room's node was lost: the SDK reconnects.
CLOSE_NODE_LOST: Final = 1012


class RelayDoor:
    """Door side: this node's sockets relayed to another node, by relay key. ``recorder``: where a
    relayed connection whose node was lost is logged as disconnected (``nodeFailure``)."""

    def __init__(self, recorder: Recorder | None = None, directory: RoomDirectory | None = None) -> None:
        self.links: dict[str, _DoorLink] = {}
        self.recorder = recorder
        self.directory = directory

    def on_notice(self, notice: Notice) -> None:
        link = self.links.get(str(notice.data.get("conn", "")))
        if link is None or notice.origin != link.node:
            return
        if notice.kind == "relay.out":
            for message in notice.data.get("msgs") or ():
                if isinstance(message, dict):
                    link.deliver(message)
        elif notice.kind == "relay.end":
            link.end(int(notice.data.get("code") or CLOSE_POLICY), str(notice.data.get("why") or ""))

    def lost(self, live: set[NodeId]) -> None:
        """Close the sockets whose room's node is gone (the SDK rejoins through a live node). The
        lost node never logs their disconnect: this node does, reason ``nodeFailure``."""
        for link in list(self.links.values()):
            if link.node not in live:
                if link.joined and self.recorder is not None:
                    task = asyncio.get_running_loop().create_task(self._log_lost(self.recorder, link))
                    _CLOSING.add(task)
                    task.add_done_callback(_CLOSING.discard)
                self.links.pop(link.key, None)
                link.end(CLOSE_NODE_LOST, "node lost")

    async def _log_lost(self, recorder: Recorder, link: _DoorLink) -> None:
        """Log the relayed connection's disconnect (``nodeFailure``) unless the node that took the
        room over did (one of the two does: ``mark_once``)."""
        logger.warning("relay: node %s lost; connection %s of session %s closed (1012)", link.node,
                       link.connection_id, link.session_id)
        if self.directory is not None:
            try:
                if not await self.directory.mark_once(failover.closed_mark(link.connection_id),
                                                      failover.CLOSED_MARK_S):
                    return
            except RoomsError:
                pass  # logged anyway: a duplicate beats a connection never closed
        reason = DisconnectReason.NODE_FAILURE
        recorder.log(link.session_id, EventKind.DISCONNECT,
                     f"Server detected disconnect: {link.name}. Reason: {reason} (node {link.node} stopped)",
                     connection_id=link.connection_id, reason=str(reason), detail=f"node {link.node} stopped",
                     node=link.node)


#: This node's sockets relayed to the node holding their room.
RELAY_DOOR_KEY: Final = web.AppKey("relay_door", RelayDoor)


class _DoorLink:
    def __init__(self, key: str, node: NodeId, client: Client, outbox: Outbox,
                 close: Callable[[int, bytes], None]) -> None:
        self.key = key
        self.node = node
        self.client = client
        self.outbox = outbox
        self.close = close
        self.joined = False
        self.answered = False
        self.session_id = ""
        self.connection_id = ""
        self.name = ""

    def deliver(self, message: dict[str, Any]) -> None:
        self.answered = True
        data = message.get("data")
        if (message.get("type") == "response" and message.get("ok") and isinstance(data, dict)
                and "connection_id" in data and "session_id" in data):
            self.joined = True
            self.session_id, self.connection_id = str(data["session_id"]), str(data["connection_id"])
            self.name = str(data.get("name") or self.connection_id)
        self.outbox.push(message)

    def end(self, code: int, why: str) -> None:
        self.close(code, why.encode()[:100])


async def _route(hub: Hub, directory: RoomDirectory, msg: Mapping[str, Any]) -> NodeId | None:
    """The node a join must go to, or None for this one (also for a token this node will refuse:
    the refusal is logged here as usual)."""
    try:
        claims = hub.tokens.verify(msg["token"], room=msg.get("room"))
    except OpenConsultError:
        return None
    if claims.room in hub.leases:
        return None
    owner = await directory.owner(claims.room)
    if owner is None:
        owner = await directory.place()
    return None if owner == directory.node_id else owner


class RelayServer:
    """Owner side: connections whose socket is on another node, by relay key."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.conns: dict[str, _Relayed] = {}

    def on_notice(self, notice: Notice) -> None:
        key = str(notice.data.get("conn", ""))
        conn = self.conns.get(key)
        if notice.kind == "relay.open" and conn is None:
            if len(self.conns) >= self.app[CONFIG_KEY].server.max_connections:
                return  # the door's join gets no answer and times out; this node is full
            data = notice.data
            client = Client(lambda m: None, remote_ip=str(data.get("ip", ""))[:64],
                            user_agent=str(data.get("ua", ""))[:512])
            conn = self.conns[key] = _Relayed(self, key, notice.origin, client)
            conn.start()
        elif conn is None or notice.origin != conn.door:
            return
        elif notice.kind == "relay.req" and isinstance(notice.data.get("msg"), dict):
            conn.request(notice.data["msg"])
        elif notice.kind == "relay.close":
            reason = str(notice.data.get("reason", ""))
            conn.finish(DisconnectReason(reason) if reason in DisconnectReason._value2member_map_
                        else DisconnectReason.NETWORK_DISCONNECTED)

    def lost(self, live: set[NodeId]) -> None:
        """Drop the connections whose door node is gone."""
        for conn in list(self.conns.values()):
            if conn.door not in live:
                conn.finish(DisconnectReason.NETWORK_DISCONNECTED)

    async def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.finish(DisconnectReason.SERVER_SHUTDOWN)
            await conn.wait()


#: Connections relayed to this node from the node holding their socket.
RELAY_SERVER_KEY: Final = web.AppKey("relay_server", RelayServer)


class _Relayed:
    """One relayed connection on the owner: requests run in order, replies and events go back in
    order, both bounded (overflow: a slow consumer)."""

    def __init__(self, server: RelayServer, key: str, door: NodeId, client: Client) -> None:
        self.server = server
        self.key = key
        self.door = door
        self.client = client
        self.requests: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(RELAY_QUEUE_MAX)
        self.out: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(RELAY_QUEUE_MAX)
        self.reason = DisconnectReason.NETWORK_DISCONNECTED
        self.tasks: list[asyncio.Task[None]] = []
        client.send = self._send
        client.close_socket = lambda: self._end(CLOSE_POLICY, "removed from the call")
        client.close_moved = lambda: self._end(CLOSE_NODE_LOST, "room moved to another node")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._serve(), name=f"relay-in-{self.key}"),
                      loop.create_task(self._forward(), name=f"relay-out-{self.key}")]

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.out.put_nowait(("relay.out", message))
        except asyncio.QueueFull:
            self.finish(DisconnectReason.SLOW_CONSUMER)

    def _end(self, code: int, why: str) -> None:
        try:
            self.out.put_nowait(("relay.end", {"code": code, "why": why}))
        except asyncio.QueueFull:
            pass

    def request(self, msg: dict[str, Any]) -> None:
        try:
            self.requests.put_nowait(msg)
        except asyncio.QueueFull:
            self.finish(DisconnectReason.SLOW_CONSUMER)

    def finish(self, reason: DisconnectReason) -> None:
        self.reason = reason
        while True:
            try:
                self.requests.put_nowait(None)
                return
            except asyncio.QueueFull:
                self.requests.get_nowait()  # the connection ends: its unread requests go

    async def wait(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self) -> None:
        app = self.server.app
        hub, workflow = app[HUB_KEY], app[WORKFLOW_KEY]
        try:
            while (msg := await self.requests.get()) is not None:
                request_id = msg.get("id")
                try:
                    data = await _logged(app[EVENTLOG_KEY], _dispatch(hub, workflow, self.client, msg))
                except (OpenConsultError, RoomsError) as exc:
                    error = coded(exc)
                    self._send(error_response(request_id, error))
                    if msg.get("type") == "join" and error.code in JOIN_ERRORS:
                        self._end(CLOSE_POLICY, "join refused")
                    continue
                except Exception:
                    logger.exception("relayed request %s failed", msg.get("type"))
                    self._send(error_response(request_id, InternalError("the server failed to handle this request")))
                    continue
                self._send(response_ok(request_id, data))
                if msg.get("type") == "leave":
                    self.reason = DisconnectReason.CLIENT_DISCONNECTED
                    self._end(WSCloseCode.OK, "left")
        finally:
            self.server.conns.pop(self.key, None)
            workflow.forget(self.client)
            await hub.disconnect(self.client, self.reason)
            await self.out.put(("", {}))  # the forwarder's last message: stop

    async def _forward(self) -> None:
        directory = self.server.app[DIRECTORY_KEY]
        while True:
            kind, message = await self.out.get()
            if not kind:
                return
            batch = [message]
            if kind == "relay.out":  # what queued meanwhile goes in one notice
                while not self.out.empty() and len(batch) < 64:
                    nxt_kind, nxt = self.out.get_nowait()
                    if nxt_kind != "relay.out":
                        await self._publish(directory, "relay.out", batch)
                        if not nxt_kind:
                            return
                        batch = []
                        await self._publish(directory, nxt_kind, [nxt])
                        break
                    batch.append(nxt)
            if batch:
                await self._publish(directory, kind, batch)

    async def _publish(self, directory: RoomDirectory, kind: str, batch: list[dict[str, Any]]) -> None:
        data: dict[str, Any] = {"conn": self.key}
        if kind == "relay.out":
            data["msgs"] = batch
        else:
            data.update(batch[0])
        try:
            await directory.send(self.door, Notice(kind, data))
        except RoomsError as exc:
            logger.warning("relay %s: %s to node %s lost (%s)", self.key, kind, self.door, exc)
