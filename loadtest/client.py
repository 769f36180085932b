"""A wire-protocol client (protocol v1 over aiohttp's WebSocket client), used by
the load tester, the benchmarks and the tests. It speaks only the wire protocol.

With ``SignallingClient.check_frames`` on (the test suite turns it on), every frame the
server sends is validated against ``signalling/schemas/_response.json`` / ``_event.json``,
and an ok response's ``data`` against ``_response.json``'s ``$defs/data/<request type>``
where that is defined; a frame that does not match is kept in ``SCHEMA_VIOLATIONS`` (the
tests fail on it) and fails the request it answers.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
from typing import Any, ClassVar

import aiohttp
import msgpack


class RequestFailed(Exception):
    """The server answered a request with an error response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class SchemaViolation(Exception):
    """The server sent a frame its own schemas do not allow."""


#: Every server frame that failed its schema while ``check_frames`` was on: (frame, error).
SCHEMA_VIOLATIONS: list[tuple[dict[str, Any], str]] = []


def _schema_error(message: Any, request_type: str | None) -> str | None:
    """Why ``message`` is not a valid server frame (or response to ``request_type``), or None."""
    from jsonschema.exceptions import best_match

    from signalling.codec import check_outbound  # only when checking: the load tester needs no schemas
    from signalling.errors import InvalidMessage

    if not isinstance(message, dict):
        return f"a server frame must be an object, not {type(message).__name__}"
    try:
        check_outbound(message)
    except InvalidMessage as exc:
        return exc.message
    validator = _data_validators().get(request_type or "")
    if message.get("type") == "response" and message.get("ok") and validator is not None:
        error = best_match(validator.iter_errors(message["data"]))
        if error is not None:
            where = ".".join(str(part) for part in ("data", *error.absolute_path))
            return f'"{where}" in the response to "{request_type}": {error.message}'
    return None


@functools.cache
def _data_validators() -> dict[str, Any]:
    """A validator per request type for its ok response's data (``_response.json#/$defs/data``)."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    from signalling.codec import SCHEMA_DIR

    schemas = [json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))
               for name in ("_response", "_event")]
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas)
    base = schemas[0]["$id"]
    return {name: Draft202012Validator({"$ref": f"{base}#/$defs/data/{name}"}, registry=registry)
            for name in schemas[0]["$defs"]["data"] if not name.startswith("$")}


class SignallingClient:
    """One WebSocket to ``/ws``: ``request()`` returns a response's data or raises
    ``RequestFailed``; pushed events collect in ``events`` and wake ``next_event()``."""

    #: Validate every received frame against the outbound schemas (tests turn this on).
    check_frames: ClassVar[bool] = False

    def __init__(self, ws_url: str, msgpack_frames: bool = False) -> None:
        self.ws_url = ws_url
        self.msgpack = msgpack_frames
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.events: list[dict[str, Any]] = []
        self.raw: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._request_types: dict[Any, str] = {}  # id -> type of requests awaiting a response
        self._event_cond = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.joined: dict[str, Any] = {}

    async def connect(self) -> SignallingClient:
        self.session = aiohttp.ClientSession()
        protocols = ("openconsult.v1.msgpack",) if self.msgpack else ("openconsult.v1",)
        self.ws = await self.session.ws_connect(self.ws_url, protocols=protocols, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        return self

    async def join(self, token: str, **fields: Any) -> dict[str, Any]:
        self.joined = await self.request("join", token=token, **fields)
        return self.joined

    async def send_raw(self, frame: str | bytes) -> None:
        assert self.ws is not None
        if isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame)

    async def send(self, message: dict[str, Any]) -> None:
        if self.msgpack:
            await self.send_raw(msgpack.packb(message))
        else:
            await self.send_raw(json.dumps(message))

    async def request(self, type_: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        response = await self.request_raw({"type": type_, **fields}, timeout=timeout)
        if not response.get("ok"):
            error = response.get("error", {})
            raise RequestFailed(error.get("code", "?"), error.get("message", ""))
        data: dict[str, Any] = response.get("data", {})
        return data

    async def request_raw(self, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send ``message`` with a fresh id and return the whole response envelope."""
        request_id = next(self._ids)
        message = {**message, "id": request_id}
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if isinstance(message.get("type"), str):
            self._request_types[request_id] = message["type"]
        await self.send(message)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request_id, None)
            self._request_types.pop(request_id, None)

    async def next_response(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for a response that matched no pending request (e.g. to a malformed frame)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[None] = future
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(None, None)

    async def wait_event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first event ``name`` whose data contains ``match`` (already received or next)."""

        def find() -> dict[str, Any] | None:
            for event in self.events:
                if event["event"] == name and all(_get(event["data"], k) == v for k, v in match.items()):
                    return event
            return None

        async with self._event_cond:
            await asyncio.wait_for(self._event_cond.wait_for(lambda: find() is not None), timeout)
        found = find()
        assert found is not None
        return found

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    data = msgpack.unpackb(msg.data)
                else:
                    break
                self.raw.append(data)
                error = None
                if self.check_frames:
                    request_id = data.get("id") if isinstance(data, dict) else None
                    request_type = self._request_types.get(request_id) if isinstance(request_id, int | str) else None
                    error = _schema_error(data, request_type)
                if error is not None:
                    SCHEMA_VIOLATIONS.append((data, error))
                if data.get("type") == "response":
                    future = self._pending.get(data.get("id")) or self._pending.get(None)
                    if future is not None and not future.done():
                        if error is None:
                            future.set_result(data)
                        else:
                            future.set_exception(SchemaViolation(f"server frame breaks its schema: {error}: {data}"))
                elif data.get("type") == "event":
                    async with self._event_cond:
                        self.events.append(data)
                        self._event_cond.notify_all()
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"socket closed ({self.close_code})"))
            async with self._event_cond:
                self._event_cond.notify_all()

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


def _get(data: Any, dotted: str) -> Any:
    """``_get(d, "stream__stream_id")`` is ``d["stream"]["stream_id"]``, or None."""
    for part in dotted.split("__"):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data
