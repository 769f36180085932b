"""Wire codec and schemas: every message valid and invalid, both encodings, and a decode() fuzz.

The invalid cases are generated from the schemas themselves (every required field, every
property, every length bound), so a field added to a schema is covered without editing here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from metrics.prometheus import TokenRejectCode
from rooms.model import DisconnectReason, Role, StreamDestroyedReason
from signalling.codec import (
    OUTBOUND_VALIDATORS,
    SCHEMA_DIR,
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    VALIDATORS,
    Codec,
    EventName,
    JsonCodec,
    MessageType,
    MsgpackCodec,
    check_outbound,
    error_response,
    event,
    response_error,
    response_ok,
)
from signalling.codec import scrubbed
from signalling.errors import (
    ERRORS_BY_CODE,
    AuthError,
    ErrorCode,
    InvalidMessage,
    MessageTooLarge,
    NotFound,
    OpenConsultError,
    ProtocolError,
)
from tests.signalling.hostile import fuzz_settings, hostile_values, json_frames, msgpack_frames, near_valid

SDP = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"

VALID: dict[str, dict[str, Any]] = {
    "client.event": {"type": "client.event", "id": 30, "event": "iceFailed",
                     "data": {"peer_id": "st_1", "local_candidate_types": ["host", "srflx"],
                              "remote_candidate_types": ["host"], "ice_servers": 1, "camera": "ok",
                              "microphone": "denied", "error_name": "NotAllowedError", "error_message": "denied",
                              "constraints": {"audio": True, "video": False}, "attempt": 1}},
    "client.stats": {"type": "client.stats", "id": 31, "samples": [
        {"stream_id": "st_1", "subscription_id": "sub_1", "kind": "video", "direction": "recv", "framesDecoded": 300,
         "freezeCount": 0, "qualityLimitationReason": None,
         "candidate_pair": {"local_type": "host", "remote_type": "host", "protocol": "udp"}}]},
    "join": {"type": "join", "id": 1, "token": "eyJhbGciOiJIUzI1NiJ9.e30.sig", "room": "clinic-7", "user_agent": "Firefox"},
    "publish": {
        "type": "publish",
        "id": 2,
        "offer": {"type": "offer", "sdp": SDP},
        "name": "Camera",
        "video_source": "screen",
    },
    "unpublish": {"type": "unpublish", "id": 3, "stream_id": "st_AbC-12_x"},
    "subscribe": {"type": "subscribe", "id": "four", "stream_id": "st_1"},
    "answer": {"type": "answer", "id": 5, "subscription_id": "sub_1", "answer": {"type": "answer", "sdp": SDP}},
    "unsubscribe": {"type": "unsubscribe", "id": 6, "subscription_id": "sub_1"},
    "ice": {
        "type": "ice",
        "id": 7,
        "peer_id": "st_1",
        "candidate": {
            "candidate": "candidate:1 1 udp 2122260223 192.0.2.1 54400 typ host",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
            "usernameFragment": "abcd",
        },
    },
    "leave": {"type": "leave", "id": 8},
    "ping": {"type": "ping", "id": 9},
    "waiting_room.enter": {"type": "waiting_room.enter", "id": 10, "device_check_passed": True,
                           "devices": {"camera": "denied", "microphone": "ok"}},
    "waiting_room.leave": {"type": "waiting_room.leave", "id": 11},
    "queue.watch": {"type": "queue.watch", "id": 12, "room_id": "wr-cardio"},
    "queue.unwatch": {"type": "queue.unwatch", "id": 13, "room_id": "wr-cardio"},
    "consultation.admit": {"type": "consultation.admit", "id": 14, "session_id": "s_AbC-12_x"},
    "consultation.transfer": {"type": "consultation.transfer", "id": 15, "session_id": "s_1", "to_room_id": "wr-2"},
    "consultation.end": {"type": "consultation.end", "id": 16, "session_id": "s_1"},
    "consultation.complete": {"type": "consultation.complete", "id": 17, "session_id": "s_1"},
    "consultation.phone_fallback": {"type": "consultation.phone_fallback", "id": 18, "session_id": "s_1"},
    "chat.send": {"type": "chat.send", "id": 19, "channel_id": "consultation:s_1", "text": "<b>hi</b>"},
    "chat.history": {"type": "chat.history", "id": 20, "channel_id": "pair:p1:dr-2"},
    "announcement.post": {"type": "announcement.post", "id": 21, "room_id": "wr-1", "text": "Running late",
                          "expires_in_s": 600},
    "queue.remove": {"type": "queue.remove", "id": 22, "session_id": "s_AbC-12_x"},
    "consultation.journal": {"type": "consultation.journal", "id": 23, "session_id": "s_1"},
    "announcement.withdraw": {"type": "announcement.withdraw", "id": 24, "room_id": "wr-1",
                              "announcement_id": "a_XyZ-9_q"},
    "consultation.get": {"type": "consultation.get", "id": 25, "session_id": "s_AbC-12_x"},
    "consultation.invite_guest": {"type": "consultation.invite_guest", "id": 26, "session_id": "s_AbC-12_x",
                                  "name": "Ida (interpreter)"},
    "consultation.remove_guest": {"type": "consultation.remove_guest", "id": 27, "session_id": "s_AbC-12_x",
                                  "guest_id": "g_AbC-12_x"},
}

# Minimal forms: only the required fields.
MINIMAL: dict[str, dict[str, Any]] = {
    "join": {"type": "join", "id": 1, "token": "t"},
    "publish": {"type": "publish", "id": 2, "offer": {"type": "offer", "sdp": SDP}},
    "ice": {"type": "ice", "id": 7, "peer_id": "st_1", "candidate": None},
    "consultation.get": {"type": "consultation.get", "id": 25},  # the token's consultation
}

CODECS: list[Codec] = [JsonCodec(), MsgpackCodec()]


def frame(codec: Codec, message: Any) -> str | bytes:
    """Encode anything (even invalid messages) for ``codec``."""
    if isinstance(codec, MsgpackCodec):
        packed = msgpack.packb(message, use_bin_type=True)
        assert isinstance(packed, bytes)
        return packed
    return json.dumps(message)


def decode_error(codec: Codec, message: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frame(codec, message))
    return info.value


def load_schema(name: str) -> dict[str, Any]:
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    assert isinstance(schema, dict)
    return schema


# --- schemas ---------------------------------------------------------------------------------


def test_every_schema_file_is_a_valid_2020_12_schema() -> None:
    names = sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))
    assert names == sorted([*(t.value for t in MessageType), "_event", "_response"])
    for name in names:
        schema = load_schema(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("message_type", list(MessageType))
def test_inbound_schemas_are_closed_and_bounded(message_type: MessageType) -> None:
    schema = load_schema(message_type)
    assert schema["additionalProperties"] is False
    assert {"type", "id"} <= set(schema["required"])
    assert schema["properties"]["type"] == {"const": message_type.value}
    for path, prop in walk_properties(schema):
        types = prop.get("type", [])
        if "string" in ([types] if isinstance(types, str) else types):
            assert "maxLength" in prop, f"{message_type}: {path} has no maxLength"
        if "object" in ([types] if isinstance(types, str) else types):
            assert prop.get("additionalProperties") is False, f"{message_type}: {path} is open"


def test_every_message_type_has_examples() -> None:
    assert set(VALID) == {t.value for t in MessageType}


def test_outbound_enums_match_the_code() -> None:
    event_schema = load_schema("_event")
    assert event_schema["$defs"]["DisconnectReason"]["enum"] == [r.value for r in DisconnectReason]
    assert event_schema["$defs"]["StreamDestroyedReason"]["enum"] == [r.value for r in StreamDestroyedReason]
    assert event_schema["$defs"]["Connection"]["properties"]["role"]["enum"] == [r.value for r in Role]
    assert event_schema["properties"]["event"]["enum"] == [e.value for e in EventName]
    response_schema = load_schema("_response")
    assert response_schema["properties"]["error"]["properties"]["code"]["enum"] == [c.value for c in ErrorCode]


# --- errors ----------------------------------------------------------------------------------


def test_one_error_class_per_code() -> None:
    assert set(ERRORS_BY_CODE) == set(ErrorCode)
    for code, cls in ERRORS_BY_CODE.items():
        assert cls.code == code
        assert issubclass(cls, OpenConsultError)
        error = cls("what went wrong")
        assert error.message == "what went wrong" and str(error) == "what went wrong"
    auth_codes = {cls.code.value for cls in ERRORS_BY_CODE.values() if issubclass(cls, AuthError)}
    assert auth_codes == {c.value for c in TokenRejectCode}


# --- valid messages --------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
@pytest.mark.parametrize("example", [*VALID.values(), *MINIMAL.values()], ids=lambda m: str(m["type"]))
def test_valid_messages_decode_unchanged(codec: Codec, example: dict[str, Any]) -> None:
    assert codec.decode(frame(codec, example)) == example


def test_ice_end_of_candidates_forms() -> None:
    codec = JsonCodec()
    for candidate in (None, {"candidate": ""}, {"candidate": "", "sdpMid": None, "sdpMLineIndex": None}):
        message = {"type": "ice", "id": 1, "peer_id": "sub_1", "candidate": candidate}
        assert codec.decode(json.dumps(message)) == message


def test_string_ids_and_integral_float_ids() -> None:
    codec = JsonCodec()
    assert codec.decode('{"type":"ping","id":"req-1"}')["id"] == "req-1"
    # 7.0 is an integer to JSON Schema and to a JavaScript client: echo it as 7.
    decoded = codec.decode('{"type":"ping","id":7.0}')
    assert decoded["id"] == 7 and isinstance(decoded["id"], int)


def test_json_codec_accepts_utf8_json_in_a_binary_frame() -> None:
    assert JsonCodec().decode(b'{"type":"ping","id":1}') == {"type": "ping", "id": 1}


# --- invalid messages, generated from the schemas --------------------------------------------


def walk_properties(schema: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted path, property schema) for every property, depth first."""
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield path, prop
        yield from walk_properties(prop, path)


def required_paths(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for name in schema.get("required", []):
        path = f"{prefix}.{name}" if prefix else name
        yield path
        yield from required_paths(schema["properties"][name], path)


def get_parent(message: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    *parents, last = path.split(".")
    node = message
    for part in parents:
        node = node[part]
    return node, last


def cases(kind: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(message type, field path, broken message) for one kind of breakage, over all types."""
    for message_type in MessageType:
        schema = load_schema(message_type)
        base = VALID[message_type]
        if kind == "missing":
            for path in required_paths(schema):
                if path in ("type", "id"):
                    continue  # envelope fields, tested on their own below
                message = copy.deepcopy(base)
                parent, name = get_parent(message, path)
                del parent[name]
                yield message_type, path, message
        elif kind == "wrong_type":
            for path, prop in walk_properties(schema):
                if path in ("type", "id"):
                    continue
                message = copy.deepcopy(base)
                try:
                    parent, name = get_parent(message, path)
                except (KeyError, TypeError):
                    continue
                # Only the array fields (client reports' lists) take an array.
                parent[name] = "x" if prop.get("type") == "array" else [1, 2]
                yield message_type, path, message
        elif kind == "extra":
            for path, prop in [("", schema), *walk_properties(schema)]:
                if prop.get("additionalProperties") is not False:
                    continue
                message = copy.deepcopy(base)
                target = message
                if path:
                    parent, name = get_parent(message, path)
                    target = parent[name]
                target["surplus"] = 1
                yield message_type, f"{path}.surplus" if path else "surplus", message
        elif kind == "too_long":
            for path, prop in walk_properties(schema):
                if "maxLength" not in prop or path == "id":
                    continue
                message = copy.deepcopy(base)
                try:
                    parent, name = get_parent(message, path)
                except (KeyError, TypeError):
                    continue
                parent[name] = "a" * (prop["maxLength"] + 1)
                yield message_type, path, message


def case_id(case: tuple[str, str, dict[str, Any]]) -> str:
    return f"{case[0]}:{case[1]}"


# A codec with room for the 64 KiB SDP that the too_long cases build.
BIG_JSON = JsonCodec(max_message_bytes=1 << 20)


@pytest.mark.parametrize("case", list(cases("missing")), ids=case_id)
def test_missing_required_field(case: tuple[str, str, dict[str, Any]]) -> None:
    message_type, path, message = case
    error = decode_error(BIG_JSON, message)
    assert error.code == "invalid_message"
    assert error.message == f'"{path}" is required'
    assert error.request_id == message["id"]


@pytest.mark.parametrize("case", list(cases("wrong_type")), ids=case_id)
def test_wrong_type(case: tuple[str, str, dict[str, Any]]) -> None:
    message_type, path, message = case
    error = decode_error(BIG_JSON, message)
    assert isinstance(error, InvalidMessage)
    assert error.message.startswith(f'"{path}" must be '), error.message
    assert error.request_id == message["id"]


@pytest.mark.parametrize("case", list(cases("extra")), ids=case_id)
def test_unknown_extra_field(case: tuple[str, str, dict[str, Any]]) -> None:
    message_type, path, message = case
    error = decode_error(BIG_JSON, message)
    assert isinstance(error, InvalidMessage)
    assert error.message == f'"{path}" is not allowed'


@pytest.mark.parametrize("case", list(cases("too_long")), ids=case_id)
def test_oversize_string(case: tuple[str, str, dict[str, Any]]) -> None:
    message_type, path, message = case
    error = decode_error(BIG_JSON, message)
    assert isinstance(error, InvalidMessage)
    assert error.message.startswith(f'"{path}" must be at most '), error.message
    assert error.message.endswith(" characters")


def test_every_generator_produced_cases() -> None:
    for kind in ("missing", "wrong_type", "extra", "too_long"):
        assert len(list(cases(kind))) >= 9, kind


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {**VALID["publish"], "offer": {"type": "offer", "sdp": 5}},
            '"offer.sdp" must be a string, not an integer',
        ),
        ({**VALID["publish"], "offer": {"type": "answer", "sdp": SDP}}, '"offer.type" must be "offer"'),
        ({**VALID["publish"], "video_source": "tv"}, '"video_source" must be one of "camera", "screen"'),
        ({**VALID["join"], "token": ""}, '"token" must not be empty'),
        ({**VALID["join"], "room": "a room"}, '"room" contains characters that are not allowed'),
        ({**VALID["unpublish"], "stream_id": "../etc"}, '"stream_id" contains characters that are not allowed'),
        (
            {**VALID["ice"], "candidate": {"candidate": "", "sdpMLineIndex": -1}},
            '"candidate.sdpMLineIndex" must be at least 0',
        ),
        ({**VALID["ice"], "candidate": "candidate:1"}, '"candidate" must be an object or null, not a string'),
        ({**VALID["ice"], "candidate": {"sdpMid": "0"}}, '"candidate.candidate" is required'),
        ({**VALID["leave"], "token": "x"}, '"token" is not allowed'),
    ],
)
def test_messages_name_the_field_and_the_problem(message: dict[str, Any], expected: str) -> None:
    for codec in CODECS:
        error = decode_error(codec, message)
        assert error.message.startswith(expected), error.message
        assert error.request_id == message["id"]


# --- envelope --------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
def test_envelope_errors(codec: Codec) -> None:
    assert decode_error(codec, [1, 2]).message == "message must be an object, not an array"
    assert decode_error(codec, "ping").message == "message must be an object, not a string"
    assert decode_error(codec, None).message == "message must be an object, not null"

    error = decode_error(codec, {"id": 4})
    assert (error.message, error.request_id) == ('"type" is required', 4)
    error = decode_error(codec, {"type": 3, "id": "x"})
    assert (error.message, error.request_id) == ('"type" must be a string, not an integer', "x")
    error = decode_error(codec, {"type": "teleport", "id": 5})
    assert error.message.startswith('unknown message type "teleport"; expected one of "join",')
    assert error.request_id == 5

    error = decode_error(codec, {"type": "ping"})
    assert (error.message, error.request_id) == ('"id" is required', None)
    for bad_id in ([1], {"a": 1}, True, 1.5, "", "x" * 65, 2**53, None):
        error = decode_error(codec, {"type": "ping", "id": bad_id})
        assert error.message.startswith('"id" must '), (bad_id, error.message)
        assert error.request_id is None


def test_an_unknown_type_is_not_echoed_at_length() -> None:
    error = decode_error(JsonCodec(), {"type": "x" * 10_000, "id": 1})
    assert len(error.message) < 300


def test_malformed_json() -> None:
    codec = JsonCodec()
    for text in ("", "{", '{"type": "ping", "id": 1', "{'type': 'ping'}", "NaN", '{"id": Infinity}', "\x00"):
        with pytest.raises(InvalidMessage) as info:
            codec.decode(text)
        assert info.value.message.startswith("message is not valid JSON"), text
        assert info.value.request_id is None
    with pytest.raises(InvalidMessage, match="not valid JSON"):
        codec.decode(b"\xff\xfe{")


def test_deeply_nested_input_is_refused_cleanly() -> None:
    deep = '{"type":"ping","id":1,"x":' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(InvalidMessage):
        JsonCodec(max_message_bytes=1 << 20).decode(deep)
    packed = b"\x91" * 50_000 + b"\xc0"  # 50k nested one-element arrays
    with pytest.raises(InvalidMessage):
        MsgpackCodec().decode(packed)


def test_lone_surrogates_become_replacement_characters_in_values_and_keys() -> None:
    codec = JsonCodec()
    decoded = codec.decode(json.dumps({"type": "publish", "id": 1, "offer": {"type": "offer", "sdp": SDP},
                                       "name": "a\ud800b\udfff"}))
    assert decoded["name"] == "a\ufffdb\ufffd"
    # An escaped surrogate *pair* is just an emoji.
    decoded = codec.decode('{"type":"publish","id":1,"offer":{"type":"offer","sdp":"x"},"name":"\\ud83d\\ude00"}')
    assert decoded["name"] == "\U0001f600"
    # A string id is echoed as the client will see it, replaced.
    assert codec.decode(json.dumps({"type": "ping", "id": "\udc00"}))["id"] == "\ufffd"
    # CESU-8 surrogates in a binary frame holding JSON (json.loads decodes bytes with surrogatepass).
    decoded = codec.decode(b'{"type":"publish","id":1,"offer":{"type":"offer","sdp":"x"},"name":"\xed\xa0\x80"}')
    assert decoded["name"] == "\ufffd"


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
def test_every_echo_of_client_text_encodes_on_both_codecs(codec: Codec) -> None:
    """The unknown ``type`` and a refused key's name are echoed; neither may break an encoder."""
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("json", {"type": "\ud800tele\x07port", "id": 1}, 'unknown message type "\ufffdtele\\u0007port"'),
        ("json", {"type": "ping", "id": 2, "\udbff\x00key": 1}, '"\ufffd\\u0000key" is not allowed'),
        ("json", {"type": "ping", "id": 3, "k" * 5000: 1}, '"' + "k" * 40 + '" is not allowed'),
    ]
    for _, message, expected in cases:
        data = json.dumps(message)  # lone surrogates travel as \u escapes
        error = decode_error_from(JsonCodec(), data)
        assert error.message.startswith(expected), error.message
        reply = error_response(None, error)
        assert isinstance(codec.payload(reply), bytes)
        check_outbound(reply)


def test_control_characters_are_refused_by_field() -> None:
    codec = JsonCodec()
    publish = {"type": "publish", "id": 1, "offer": {"type": "offer", "sdp": SDP}}
    assert decode_error(codec, {**publish, "name": "Cam\x1b[31m"}).message == '"name" contains control character U+001B'
    assert decode_error(codec, {**publish, "name": "Cam\x85"}).message == '"name" contains control character U+0085'
    assert decode_error(codec, {"type": "join", "id": 2, "token": "t\x00"}).message == (
        '"token" contains control character U+0000')
    nul_sdp = {"type": "publish", "id": 3, "offer": {"type": "offer", "sdp": "v=0\r\n\x00"}}
    assert decode_error(codec, nul_sdp).message == '"offer.sdp" contains control character U+0000'
    # SDP lines: tab, CR and LF are fine.
    assert codec.decode(json.dumps({**publish, "offer": {"type": "offer", "sdp": "v=0\r\n\ta"}}))["id"] == 1
    # Free text is judged by the workflow (chat refuses C0 with invalid_input), not here.
    chat = {"type": "chat.send", "id": 4, "channel_id": "consultation:s_1", "text": "bell\x07\nline"}
    assert codec.decode(json.dumps(chat))["text"] == "bell\x07\nline"
    # An id holding control characters is not echoed.
    error = decode_error(codec, {"type": "ping", "id": "a\x07"})
    assert (error.message, error.request_id) == ('"id" contains control character U+0007', None)


def test_msgpack_garbage_and_wrong_frame_type() -> None:
    codec = MsgpackCodec()
    for garbage in (b"", b"\xc1", b"\x81", b"\xdb\xff\xff\xff\xff", b"\x82\xa4type", b"\x91\x01\x02"):
        with pytest.raises(InvalidMessage) as info:
            codec.decode(garbage)
        assert info.value.message.startswith("message is not valid msgpack"), garbage
    with pytest.raises(InvalidMessage, match="expected a binary msgpack frame"):
        codec.decode('{"type":"ping","id":1}')
    # Binary values, ext types and non-string keys are not strings to the schema.
    packed = msgpack.packb({"type": "ping", "id": b"\x01"}, use_bin_type=True)
    assert decode_error_from(codec, packed).message == '"id" must be an integer or a string, not binary data'
    packed = msgpack.packb({"type": "ping", "id": 1, 5: 1}, use_bin_type=True)
    with pytest.raises(InvalidMessage):
        codec.decode(packed)
    packed = msgpack.packb({"type": "ping", "id": 1, "x": msgpack.ExtType(5, b"a")}, use_bin_type=True)
    assert decode_error_from(codec, packed).message == '"x" is not allowed'


def decode_error_from(codec: Codec, data: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode(data)
    return info.value


def test_frame_too_large() -> None:
    codec = JsonCodec(max_message_bytes=1024)
    ok = json.dumps({"type": "join", "id": 1, "token": "a" * 900})
    assert codec.decode(ok)["id"] == 1
    error = decode_error_from(codec, json.dumps({"type": "join", "id": 1, "token": "a" * 1100}))
    assert isinstance(error, MessageTooLarge)
    assert error.code == "message_too_large"
    assert error.message == "message is 1138 bytes, more than the limit of 1024"
    # Bytes, not characters: 400 three-byte characters are 1200 bytes.
    text = '{"type":"join","id":1,"token":"' + "€" * 400 + '"}'
    assert len(text) < 1024
    assert isinstance(decode_error_from(codec, text), MessageTooLarge)
    assert isinstance(decode_error_from(MsgpackCodec(max_message_bytes=10), b"\x80" * 11), MessageTooLarge)
    # The limit is checked before parsing: garbage over the limit is "too large".
    assert isinstance(decode_error_from(codec, "{" * 2000), MessageTooLarge)


def test_default_limit_fits_a_large_sdp() -> None:
    sdp = "a=x\r\n" * 8_000  # 40 kB, far more than a real two-track offer
    message = {"type": "publish", "id": 1, "offer": {"type": "offer", "sdp": sdp}}
    for codec in CODECS:
        assert codec.decode(frame(codec, message)) == message


# --- encode and constructors -----------------------------------------------------------------


def test_codec_for_subprotocol() -> None:
    assert isinstance(Codec.for_subprotocol(SUBPROTOCOL_MSGPACK, 2048), MsgpackCodec)
    assert Codec.for_subprotocol(SUBPROTOCOL_MSGPACK, 2048).max_message_bytes == 2048
    for proto in (SUBPROTOCOL_JSON, None, "something-else"):
        assert isinstance(Codec.for_subprotocol(proto), JsonCodec)
    assert MsgpackCodec.binary and not JsonCodec.binary


def sample_outbound() -> list[dict[str, Any]]:
    connection = {"connection_id": "c_1", "name": "Anna", "role": Role.PATIENT, "joined_at": 1_700_000_000_000}
    stream = {
        "stream_id": "st_1",
        "connection_id": "c_1",
        "name": None,
        "video_source": "camera",
        "has_audio": True,
        "has_video": True,
        "created_at": 1_700_000_000_500,
    }
    return [
        response_ok(1),
        response_ok("a", {"time": 1_700_000_000_000}),
        response_error(None, ErrorCode.INVALID_MESSAGE, '"offer.sdp" must be a string'),
        error_response(7, NotFound('No stream "abc" in session "s1"')),
        event(EventName.CONNECTION_CREATED, {"connection": connection}),
        event(EventName.CONNECTION_DESTROYED, {"connection": connection, "reason": DisconnectReason.SERVER_SHUTDOWN}),
        event(EventName.STREAM_CREATED, {"stream": stream}),
        event(EventName.STREAM_DESTROYED, {"stream": stream, "reason": StreamDestroyedReason.MEDIA_STOPPED}),
        event(
            EventName.SUBSCRIPTION_ENDED,
            {"subscription_id": "sub_1", "stream_id": "st_1", "reason": StreamDestroyedReason.FORCE_UNPUBLISHED},
        ),
        event(EventName.REMOVED_FROM_QUEUE, {"session_id": "s_1", "room_id": "wr-1", "removed_ms": 1_700_000_000_000}),
    ]


def test_constructors_match_the_protocol_doc() -> None:
    assert response_ok(7, {"a": 1}) == {"type": "response", "id": 7, "ok": True, "data": {"a": 1}}
    assert response_error(7, "not_found", "No stream") == {
        "type": "response",
        "id": 7,
        "ok": False,
        "error": {"code": "not_found", "message": "No stream"},
    }
    assert event("streamCreated", {"stream": {}}) == {"type": "event", "event": "streamCreated", "data": {"stream": {}}}


def test_error_response_uses_the_protocol_error_id() -> None:
    try:
        JsonCodec().decode('{"type":"ping","id":42,"x":1}')
    except ProtocolError as exc:
        assert error_response(None, exc) == response_error(42, "invalid_message", '"x" is not allowed')
    else:
        raise AssertionError("decode accepted an extra field")


@pytest.mark.parametrize("codec", CODECS, ids=["json", "msgpack"])
def test_outbound_messages_validate_and_round_trip(codec: Codec) -> None:
    for message in sample_outbound():
        check_outbound(message)
        encoded = codec.encode(message)
        assert isinstance(encoded, bytes if codec.binary else str)
        raw = msgpack.unpackb(encoded) if isinstance(encoded, bytes) else json.loads(encoded)
        assert raw == json.loads(json.dumps(message))


def test_check_outbound_rejects_drift() -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"type": "response", "id": 1, "ok": True}, '"data" is required'),
        ({"type": "response", "id": 1, "ok": False, "error": {"code": "oops", "message": "m"}}, '"error.code" must'),
        ({"type": "response", "id": 1, "ok": True, "data": {}, "error": {"code": "forbidden", "message": "m"}}, ""),
        ({"type": "event", "event": "streamCreated", "data": {"stream": {"stream_id": "x"}}}, '"data.stream.'),
        ({"type": "event", "event": "connectionDestroyed", "data": {"connection": {}, "reason": "bored"}}, '"data.'),
        ({"type": "event", "event": "teleported", "data": {}}, '"event" must be one of'),
        ({"type": "hello"}, '"type" must be "response" or "event"'),
    ]
    for message, expected in bad:
        with pytest.raises(InvalidMessage) as info:
            check_outbound(message)
        assert info.value.message.startswith(expected), (message, info.value.message)


def test_validators_are_compiled_once() -> None:
    assert set(VALIDATORS) == {t.value for t in MessageType}
    assert set(OUTBOUND_VALIDATORS) == {"response", "event"}


# --- fuzz ------------------------------------------------------------------------------------

FUZZ = fuzz_settings(300)
BASES: list[dict[str, Any]] = [*VALID.values(), *MINIMAL.values()]
#: How every codec error message starts: it names the field (quoted) or speaks of the message.
NAMED = ("message ", "\"", "unknown message type \"", "expected a binary msgpack frame")


def assert_only_protocol_errors(codec: Codec, data: str | bytes) -> None:
    try:
        decoded = codec.decode(data)
    except ProtocolError as exc:
        assert exc.code in ("invalid_message", "message_too_large")
        assert exc.message.startswith(NAMED), exc.message
        assert len(exc.message) < 400, exc.message
        assert exc.request_id is None or isinstance(exc.request_id, int | str)
        # Whatever we answer must itself be encodable for either kind of client.
        for out in CODECS:
            assert isinstance(out.payload(error_response(None, exc)), bytes)
        return
    # Anything accepted is a valid request, holds no lone surrogate, and can be sent back out.
    assert VALIDATORS[decoded["type"]].is_valid(decoded)
    for out in CODECS:
        assert isinstance(out.payload(decoded), bytes)


def test_every_message_type_is_fuzzed() -> None:
    assert {m["type"] for m in BASES} == {t.value for t in MessageType}


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_json_text(data: str) -> None:
    assert_only_protocol_errors(JsonCodec(max_message_bytes=256), data)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_binary_both_codecs(data: bytes) -> None:
    assert_only_protocol_errors(JsonCodec(max_message_bytes=256), data)
    assert_only_protocol_errors(MsgpackCodec(max_message_bytes=256), data)


@FUZZ
@given(hostile_values)
def test_fuzz_structured_values(value: Any) -> None:
    assert_only_protocol_errors(JsonCodec(), json.dumps(value))
    packed = msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")
    assert_only_protocol_errors(MsgpackCodec(), packed)


@FUZZ
@given(near_valid(BASES))
def test_fuzz_near_valid_messages(message: dict[str, Any]) -> None:
    assert_only_protocol_errors(JsonCodec(), json.dumps(message))
    packed = msgpack.packb(message, use_bin_type=True, unicode_errors="surrogatepass")
    assert_only_protocol_errors(MsgpackCodec(), packed)


@FUZZ
@given(json_frames(BASES))
def test_fuzz_json_frames(frame: str | bytes) -> None:
    """Raw JSON tricks too: duplicate keys, nesting to the parser's limit, 5000-digit numbers."""
    assert_only_protocol_errors(JsonCodec(max_message_bytes=1 << 20), frame)


@FUZZ
@given(msgpack_frames(BASES))
def test_fuzz_msgpack_frames(frame: str | bytes) -> None:
    assert_only_protocol_errors(MsgpackCodec(max_message_bytes=1 << 20), frame)


def test_duplicate_keys_the_last_one_wins_and_is_validated() -> None:
    codec = JsonCodec()
    assert codec.decode('{"type":"join","id":1,"type":"ping","id":2}') == {"type": "ping", "id": 2}
    error = decode_error_from(codec, '{"type":"ping","id":1,"type":"join"}')
    assert error.message == '"token" is required'


@FUZZ
@given(hostile_values)
def test_fuzz_outbound_scrubbed_always_encodes(value: Any) -> None:
    """What the writer falls back to: any server-made value with client text in it encodes."""
    message = event(EventName.CONNECTION_CREATED, {"connection": {"name": value}})
    for out in CODECS:
        assert isinstance(out.payload(scrubbed(message)), bytes)
