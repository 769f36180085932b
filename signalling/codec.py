"""Wire codec of protocol v1: frames to validated request dicts, and reply dicts to frames.

Two encodings with the same message structure (docs/protocol.md): JSON in text frames
(:class:`JsonCodec`, the default) and msgpack in binary frames (:class:`MsgpackCodec`, chosen by
the ``openconsult.v1.msgpack`` subprotocol). ``decode`` enforces the size limit, parses, makes
the strings safe, checks the envelope and validates the message against its JSON schema in
``signalling/schemas/``; anything wrong raises a :class:`~signalling.errors.ProtocolError` whose
message names the field and the problem (``"offer.sdp" must be a string``) and which carries the
request ``id`` whenever it could be read. ``decode`` raises nothing else, whatever the input.

Strings from clients are made safe here, where they arrive, so that nothing downstream (an echo
in an error message, a broadcast to a msgpack peer, an event-log batch) can fail on them:

* a lone UTF-16 surrogate (legal in a JSON ``\\u`` escape, not in UTF-8) becomes U+FFFD in every
  string value and every key, before anything else looks at the message;
* control characters (C0, DEL, C1) are refused in every string except ``sdp`` (which may hold
  tab, CR and LF) and free ``text`` (chat and announcements: the workflow decides, e.g. chat
  refuses C0 other than tab and newline with ``invalid_input``);
* names echoed in an error message (an unknown ``type``, a key that is not allowed) are cut to
  40 characters with control characters escaped.

``payload`` turns an outbound message into frame bytes; the WebSocket writer pairs it with
:func:`scrubbed` so that encoding a reply can never end a connection.

Schemas are loaded and their validators compiled once, at import.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Final

import msgpack
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import best_match

from signalling.errors import (
    ErrorCode,
    InvalidMessage,
    MessageTooLarge,
    OpenConsultError,
    ProtocolError,
    RequestId,
)

SUBPROTOCOL_JSON: Final = "openconsult.v1"
SUBPROTOCOL_MSGPACK: Final = "openconsult.v1.msgpack"
SUBPROTOCOLS: Final = (SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON)

#: Default frame limit; the server passes ``server.max_message_bytes``.
DEFAULT_MAX_MESSAGE_BYTES: Final = 65_536

SCHEMA_DIR: Final = Path(__file__).parent / "schemas"

# Integers beyond 2**53 do not survive a JavaScript client, so they are not valid ids.
_MAX_SAFE_INT: Final = 2**53 - 1
_MAX_ID_CHARS: Final = 64
_MAX_ECHOED_TYPE_CHARS: Final = 40


class MessageType(StrEnum):
    """Every inbound request type; each has ``signalling/schemas/<type>.json``."""

    JOIN = "join"
    PUBLISH = "publish"
    UNPUBLISH = "unpublish"
    SUBSCRIBE = "subscribe"
    ANSWER = "answer"
    UNSUBSCRIBE = "unsubscribe"
    ICE = "ice"
    LEAVE = "leave"
    PING = "ping"
    # The clinical workflow (signalling.workflow).
    WAITING_ROOM_ENTER = "waiting_room.enter"
    WAITING_ROOM_LEAVE = "waiting_room.leave"
    QUEUE_WATCH = "queue.watch"
    QUEUE_UNWATCH = "queue.unwatch"
    QUEUE_REMOVE = "queue.remove"
    CONSULTATION_GET = "consultation.get"
    CONSULTATION_ADMIT = "consultation.admit"
    CONSULTATION_TRANSFER = "consultation.transfer"
    CONSULTATION_END = "consultation.end"
    CONSULTATION_COMPLETE = "consultation.complete"
    CONSULTATION_PHONE_FALLBACK = "consultation.phone_fallback"
    CONSULTATION_JOURNAL = "consultation.journal"
    CONSULTATION_INVITE_GUEST = "consultation.invite_guest"
    CONSULTATION_REMOVE_GUEST = "consultation.remove_guest"
    CHAT_SEND = "chat.send"
    CHAT_HISTORY = "chat.history"
    ANNOUNCEMENT_POST = "announcement.post"
    ANNOUNCEMENT_WITHDRAW = "announcement.withdraw"
    # What the browser saw (stored with component client).
    CLIENT_EVENT = "client.event"
    CLIENT_STATS = "client.stats"


class EventName(StrEnum):
    """Every server-pushed event name (``{"type": "event", "event": ...}``)."""

    CONNECTION_CREATED = "connectionCreated"
    CONNECTION_DESTROYED = "connectionDestroyed"
    STREAM_CREATED = "streamCreated"
    STREAM_DESTROYED = "streamDestroyed"
    SUBSCRIPTION_ENDED = "subscriptionEnded"
    REMOVED_FROM_CALL = "removedFromCall"
    # The clinical workflow (signalling.workflow).
    QUEUE_UPDATED = "queueUpdated"
    POSITION_CHANGED = "positionChanged"
    ADMITTED = "admitted"
    CONSULTATION_CHANGED = "consultationChanged"
    CHAT_MESSAGE = "chatMessage"
    ANNOUNCEMENT = "announcement"
    REMOVED_FROM_QUEUE = "removedFromQueue"


def _load(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


#: Compiled validator per inbound message type.
VALIDATORS: Final[Mapping[str, Draft202012Validator]] = {t.value: _load(t.value) for t in MessageType}
#: Compiled validators for what the server sends: ``"response"`` and ``"event"``.
OUTBOUND_VALIDATORS: Final[Mapping[str, Draft202012Validator]] = {
    "response": _load("_response"),
    "event": _load("_event"),
}



def _known_types() -> str:
    """The type names for error messages; dotted families as ``chat.*`` to keep it short."""
    plain = [f'"{t}"' for t in MessageType if "." not in t]
    families = dict.fromkeys(f"{t.split('.')[0]}.*" for t in MessageType if "." in t)
    return f"{', '.join(plain)} or a workflow type ({', '.join(families)})"


_KNOWN_TYPES: Final = _known_types()


# --- reply constructors -----------------------------------------------------------------------


def response_ok(request_id: RequestId | None, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"type": "response", "id": …, "ok": true, "data": {…}}``."""
    return {"type": "response", "id": request_id, "ok": True, "data": dict(data) if data is not None else {}}


def response_error(request_id: RequestId | None, code: ErrorCode | str, message: str) -> dict[str, Any]:
    """``{"type": "response", "id": …, "ok": false, "error": {"code", "message"}}``."""
    return {
        "type": "response",
        "id": request_id,
        "ok": False,
        "error": {"code": str(code), "message": message},
    }


def error_response(request_id: RequestId | None, error: OpenConsultError) -> dict[str, Any]:
    """The error response for a coded error; a :class:`ProtocolError` supplies its own id if it has one."""
    if isinstance(error, ProtocolError) and error.request_id is not None:
        request_id = error.request_id
    return response_error(request_id, error.code, error.message)


def event(name: EventName | str, data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"type": "event", "event": name, "data": {…}}``."""
    return {"type": "event", "event": str(name), "data": dict(data)}


def check_outbound(message: Mapping[str, Any]) -> None:
    """Validate a server→client message against ``_response.json`` / ``_event.json``.

    For tests and debugging (the server does not pay for this on every send). Raises
    :class:`InvalidMessage` naming the field.
    """
    validator = OUTBOUND_VALIDATORS.get(message.get("type"))  # type: ignore[arg-type]
    if validator is None:
        raise InvalidMessage(f'"type" must be "response" or "event", not {_show(message.get("type"))}')
    error = best_match(validator.iter_errors(message))
    if error is not None:
        raise InvalidMessage(_describe(error))


# --- codecs -----------------------------------------------------------------------------------


class Codec(ABC):
    """Frame ⇄ message for one WebSocket; pick one with :meth:`for_subprotocol`."""

    #: True if frames are binary (``ws.send_bytes``), False for text (``ws.send_str``).
    binary: ClassVar[bool]
    subprotocol: ClassVar[str]

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes

    @staticmethod
    def for_subprotocol(subprotocol: str | None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Codec:
        """The codec for the negotiated subprotocol: msgpack for ``openconsult.v1.msgpack``, else JSON."""
        if subprotocol == SUBPROTOCOL_MSGPACK:
            return MsgpackCodec(max_message_bytes)
        return JsonCodec(max_message_bytes)

    def decode(self, frame: str | bytes) -> dict[str, Any]:
        """Parse and validate one inbound frame into a request dict.

        Raises :class:`MessageTooLarge` for a frame over the limit (without parsing it) and
        :class:`InvalidMessage` for anything else wrong; never any other exception.
        """
        try:
            return self._decode(frame)
        except ProtocolError:
            raise
        except Exception as exc:  # a parser or validator corner we did not foresee
            raise InvalidMessage(f"message could not be read ({type(exc).__name__})") from None

    def _decode(self, frame: str | bytes) -> dict[str, Any]:
        size = _frame_size(frame, self.max_message_bytes)
        if size > self.max_message_bytes:
            raise MessageTooLarge(f"message is {size} bytes, more than the limit of {self.max_message_bytes}")
        message = self._parse(frame)
        _replace_lone_surrogates(message)
        if not isinstance(message, dict):
            raise InvalidMessage(f"message must be an object, not {_type_name(message)}")
        request_id = _readable_id(message)
        if request_id is not None:
            message["id"] = request_id  # 7.0 → 7
        message_type = message.get("type")
        if "type" not in message:
            raise InvalidMessage('"type" is required', request_id)
        if not isinstance(message_type, str):
            raise InvalidMessage(f'"type" must be a string, not {_type_name(message_type)}', request_id)
        validator = VALIDATORS.get(message_type)
        if validator is None:
            shown = _echo(message_type)
            raise InvalidMessage(f'unknown message type "{shown}"; expected one of {_KNOWN_TYPES}', request_id)
        error = best_match(validator.iter_errors(message))
        if error is not None:
            raise InvalidMessage(_describe(error), request_id)
        control = _control_character(message)
        if control is not None:
            where, char = control
            raise InvalidMessage(f'"{where}" contains control character U+{ord(char):04X}', request_id)
        return message

    @abstractmethod
    def _parse(self, frame: str | bytes) -> object:
        """Frame to Python object; raises InvalidMessage or any parser exception."""

    @abstractmethod
    def encode(self, message: Mapping[str, Any]) -> str | bytes:
        """One outbound frame for ``message`` (str for a text frame, bytes for a binary one)."""

    def payload(self, message: Mapping[str, Any]) -> bytes:
        """The bytes of one outbound frame: UTF-8 JSON for a text frame, msgpack for a binary one.

        Raises ``ValueError`` (a lone surrogate, a NaN), ``TypeError`` or ``OverflowError`` when
        ``message`` cannot be encoded; the caller decides what goes out instead.
        """
        frame = self.encode(message)
        return frame if isinstance(frame, bytes) else frame.encode("utf-8")


class JsonCodec(Codec):
    """JSON in text frames. A binary frame holding UTF-8 JSON is accepted too."""

    binary: ClassVar[bool] = False
    subprotocol: ClassVar[str] = SUBPROTOCOL_JSON

    def _parse(self, frame: str | bytes) -> object:
        try:
            return json.loads(frame, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidMessage(f"message is not valid JSON: {_json_reason(exc)}") from None

    def encode(self, message: Mapping[str, Any]) -> str:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class MsgpackCodec(Codec):
    """msgpack in binary frames (subprotocol ``openconsult.v1.msgpack``)."""

    binary: ClassVar[bool] = True
    subprotocol: ClassVar[str] = SUBPROTOCOL_MSGPACK

    def _parse(self, frame: str | bytes) -> object:
        if isinstance(frame, str):
            raise InvalidMessage("expected a binary msgpack frame, got a text frame")
        try:
            return msgpack.unpackb(frame, raw=False, strict_map_key=True, timestamp=0)
        except Exception as exc:
            raise InvalidMessage(f"message is not valid msgpack ({type(exc).__name__})") from None

    def encode(self, message: Mapping[str, Any]) -> bytes:
        packed = msgpack.packb(message, use_bin_type=True)
        assert isinstance(packed, bytes)
        return packed


# --- helpers ----------------------------------------------------------------------------------


def _frame_size(frame: str | bytes, limit: int) -> int:
    if isinstance(frame, bytes | bytearray | memoryview):
        return len(frame)
    # UTF-8 is 1-4 bytes per character: only count exactly when it could matter.
    if len(frame) > limit or len(frame) * 4 <= limit:
        return len(frame)
    return len(frame.encode("utf-8", "surrogatepass"))


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _json_reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    return str(exc)[:100]


def _readable_id(message: Mapping[Any, Any]) -> RequestId | None:
    """The request id if it is a valid one (echoing anything else back would be unsafe)."""
    raw = message.get("id")
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if -_MAX_SAFE_INT <= raw <= _MAX_SAFE_INT else None
    if isinstance(raw, float):
        return int(raw) if raw.is_integer() and -_MAX_SAFE_INT <= raw <= _MAX_SAFE_INT else None
    if isinstance(raw, str):
        return raw if 0 < len(raw) <= _MAX_ID_CHARS and not _CONTROL.search(raw) else None
    return None


_SURROGATE: Final = re.compile("[\ud800-\udfff]")
#: C0, DEL and C1 control characters.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
#: Control characters but tab, LF and CR (allowed in SDP).
_CONTROL_BUT_LINES: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: Keys whose string values are multi-line: ``sdp`` may hold tab/CR/LF, ``text`` is judged by the workflow.
_LINE_KEYS: Final = frozenset({"sdp"})
_FREE_TEXT_KEYS: Final = frozenset({"text"})


def _replace_lone_surrogates(value: object) -> None:
    """Replace every lone surrogate in the strings and keys of ``value`` by U+FFFD, in place.

    A Python string only holds a surrogate code point when it is lone (a JSON escape pair is
    joined into one character by the parser), and such a string cannot be encoded as UTF-8: it
    would fail later in a text frame, a msgpack peer's frame or an SQLite batch. Iterative, so
    nesting as deep as the parser allows cannot exhaust the stack.
    """
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any(isinstance(key, str) and _SURROGATE.search(key) for key in item):
                fixed = {(_SURROGATE.sub("\ufffd", k) if isinstance(k, str) else k): v for k, v in item.items()}
                item.clear()
                item.update(fixed)
            for key, child in item.items():
                if isinstance(child, str):
                    if _SURROGATE.search(child):
                        item[key] = _SURROGATE.sub("\ufffd", child)
                elif isinstance(child, dict | list):
                    stack.append(child)
        elif isinstance(item, list):
            for index, child in enumerate(item):
                if isinstance(child, str):
                    if _SURROGATE.search(child):
                        item[index] = _SURROGATE.sub("\ufffd", child)
                elif isinstance(child, dict | list):
                    stack.append(child)


def scrubbed(value: Any) -> Any:
    """A copy of an outbound ``value`` whose strings and keys hold no lone surrogate.

    For the writer's second attempt after an encoding failure; server-made messages are shallow.
    """
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, Mapping):
        return {scrubbed(k): scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrubbed(v) for v in value]
    return value


def _control_character(message: Mapping[str, Any]) -> tuple[str, str] | None:
    """Path and character of the first control character in a string not allowed to hold it.

    Runs after schema validation, so every key is a known field name.
    """
    stack: list[tuple[str, str, object]] = [("", "", message)]
    while stack:
        where, key, item = stack.pop()
        if isinstance(item, str):
            if key in _FREE_TEXT_KEYS:
                continue
            found = (_CONTROL_BUT_LINES if key in _LINE_KEYS else _CONTROL).search(item)
            if found:
                return where, found.group()
        elif isinstance(item, dict):
            stack.extend((_join(where, k), str(k), child) for k, child in item.items())
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", key, child) for i, child in enumerate(item))
    return None


def _echo(name: str) -> str:
    """A client's name for the echo in an error message: short, control characters escaped."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", name[:_MAX_ECHOED_TYPE_CHARS])


def _join(path: str, key: object) -> str:
    name = _echo(key) if isinstance(key, str) else _echo(repr(key))
    return f"{path}.{name}" if path else name


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out


_TYPE_WORDS: Final = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "object": "an object",
    "array": "an array",
    "boolean": "a boolean",
    "null": "null",
}


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bytes):
        return "binary data"
    return "an unsupported value"


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value[:_MAX_ECHOED_TYPE_CHARS])
    return _type_name(value)


def _describe(error: ValidationError) -> str:
    """A one-line message naming the field and what is wrong with it."""
    path = _path(deque(error.absolute_path))
    field = f'"{path}"' if path else "message"
    validator = error.validator
    expected = error.validator_value
    instance = error.instance
    if validator == "required" and isinstance(instance, dict):
        missing = [name for name in expected if name not in instance]
        return f'"{_join(path, missing[0] if missing else "?")}" is required'
    if validator == "additionalProperties" and isinstance(instance, dict):
        allowed = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extra = sorted(str(key) for key in instance if key not in allowed)
        return f'"{_join(path, extra[0] if extra else "?")}" is not allowed'
    if validator == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        return f"{field} must be {words}, not {_type_name(instance)}"
    if validator == "const":
        return f"{field} must be {json.dumps(expected)}"
    if validator == "enum":
        return f"{field} must be one of {', '.join(json.dumps(v) for v in expected)}"
    if validator == "maxLength":
        return f"{field} must be at most {expected} characters"
    if validator == "minLength":
        return f"{field} must not be empty" if expected == 1 else f"{field} must be at least {expected} characters"
    if validator == "pattern":
        return f"{field} contains characters that are not allowed (expected {expected})"
    if validator == "minimum":
        return f"{field} must be at least {expected}"
    if validator == "maximum":
        return f"{field} must be at most {expected}"
    return f"{field} is invalid ({validator})"
