"""The WebSocket endpoint: frames in, coded replies and events out.

The read loop never raises: every bad frame becomes an error reply and the
socket stays usable, except a failed join (closed with 4001 after the reply)
and abuse (too many invalid frames, or oversized ones: 1009). Outbound
messages go through a bounded queue drained by one writer task, so a slow
client cannot stall its session; a client whose queue overflows is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from metrics import prometheus as prom
from rooms.errors import RoomsError
from rooms.model import DisconnectReason
from signalling.codec import SUBPROTOCOLS, Codec, error_response, response_ok
from signalling.errors import InternalError, OpenConsultError, ProtocolError, coded
from signalling.hub import Client, Hub
from signalling.keys import (
    CONFIG_KEY,
    HUB_KEY,
    SHUTTING_DOWN_KEY,
    SOCKETS_KEY,
    WORKFLOW_KEY,
)
from signalling.workflow import Workflow

logger = logging.getLogger(__name__)

CLOSE_POLICY = 4001
SEND_QUEUE_MAX = 512
JOIN_ERRORS = ("unauthorized", "token_expired", "token_not_yet_valid", "room_mismatch", "forbidden")


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    config = request.app[CONFIG_KEY]
    hub = request.app[HUB_KEY]
    workflow = request.app[WORKFLOW_KEY]
    ws = web.WebSocketResponse(protocols=SUBPROTOCOLS, heartbeat=config.server.heartbeat_s,
                               max_msg_size=0)
    await ws.prepare(request)
    codec = Codec.for_subprotocol(ws.ws_protocol, config.server.max_message_bytes)
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(SEND_QUEUE_MAX)
    overflow = asyncio.Event()

    def send(message: dict[str, Any]) -> None:
        try:
            queue.put_nowait(message)
        except asyncio.QueueFull:
            overflow.set()

    client = Client(send, remote_ip=request.remote or "", user_agent=request.headers.get("User-Agent", ""))
    writer = asyncio.create_task(_write_loop(ws, codec, queue, overflow))
    sockets = request.app[SOCKETS_KEY]
    sockets.add(ws)
    reason = DisconnectReason.NETWORK_DISCONNECTED
    invalid = oversized = 0
    try:
        async for msg in ws:
            if msg.type == WSMsgType.CLOSE:
                break
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            try:
                request_msg = codec.decode(msg.data)
            except ProtocolError as exc:
                invalid += 1
                prom.WS_MESSAGES.labels(direction="in", result="invalid").inc()
                send(error_response(exc.request_id, exc))
                oversized += exc.code == "message_too_large"
                if oversized >= 3:
                    await _close_after(queue, writer, ws, WSCloseCode.MESSAGE_TOO_BIG, b"messages too large")
                    break
                if invalid >= config.server.max_invalid_messages:
                    await _close_after(queue, writer, ws, CLOSE_POLICY, b"too many invalid messages")
                    break
                continue
            prom.WS_MESSAGES.labels(direction="in", result="ok").inc()
            request_id = request_msg.get("id")
            try:
                data = await _dispatch(hub, workflow, client, request_msg)
            except (OpenConsultError, RoomsError) as exc:
                error = coded(exc)  # the one place domain errors become wire errors
                send(error_response(request_id, error))
                if request_msg["type"] == "join" and error.code in JOIN_ERRORS:
                    await _close_after(queue, writer, ws, CLOSE_POLICY, b"join refused")
                    break
                continue
            except Exception:
                logger.exception("request %s failed", request_msg.get("type"))
                send(error_response(request_id, InternalError("the server failed to handle this request")))
                continue
            send(response_ok(request_id, data))
            if request_msg["type"] == "leave":
                reason = DisconnectReason.CLIENT_DISCONNECTED
                await _close_after(queue, writer, ws, WSCloseCode.OK, b"left")
                break
        else:
            # The loop ended without a close frame from us: a close frame from the
            # client is a client disconnect, anything else (timeout, reset) a network one.
            if ws.close_code in (WSCloseCode.OK, WSCloseCode.GOING_AWAY):
                reason = DisconnectReason.CLIENT_DISCONNECTED
        if overflow.is_set():
            reason = DisconnectReason.NETWORK_DISCONNECTED
    except asyncio.CancelledError:
        reason = DisconnectReason.SERVER_SHUTDOWN
        raise
    finally:
        if request.app.get(SHUTTING_DOWN_KEY):
            reason = DisconnectReason.SERVER_SHUTDOWN
        sockets.discard(ws)
        workflow.forget(client)
        await hub.disconnect(client, reason)
        writer.cancel()
        if not ws.closed:
            await ws.close()
    return ws


async def _close_after(queue: asyncio.Queue[dict[str, Any] | None], writer: asyncio.Task[None],
                       ws: web.WebSocketResponse, code: int, message: bytes) -> None:
    """Flush queued replies, then close with ``code``."""
    try:
        queue.put_nowait(None)
        await asyncio.wait_for(asyncio.shield(writer), timeout=5)
    except (asyncio.QueueFull, asyncio.TimeoutError):
        pass
    await ws.close(code=code, message=message)


async def _write_loop(ws: web.WebSocketResponse, codec: Codec, queue: asyncio.Queue[dict[str, Any] | None],
                      overflow: asyncio.Event) -> None:
    while True:
        message = await queue.get()
        if message is None or ws.closed:
            return
        if overflow.is_set():
            # The client could not keep up: drop it rather than let it stall the session.
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"send queue overflow")
            return
        frame = codec.encode(message)
        try:
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
        except (ConnectionError, RuntimeError):
            return
        prom.WS_MESSAGES.labels(direction="out", result="ok").inc()


async def _dispatch(hub: Hub, workflow: Workflow, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
    kind = msg["type"]
    if kind in workflow.handlers:
        return await workflow.handle(client, msg)
    if kind == "join":
        return await hub.join(client, msg["token"], msg.get("room"), msg.get("user_agent"))
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
    raise ProtocolError(f'unknown message type "{kind}"', msg.get("id"))  # schemas make this unreachable
