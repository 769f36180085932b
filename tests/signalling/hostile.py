"""Hypothesis strategies for hostile wire input, shared by the codec fuzz and the live-server fuzz.

What a stranger can put in a frame: text with lone surrogates (legal as JSON ``\\u`` escapes,
or as CESU-8 bytes in a binary frame), control characters, huge and negative numbers, deep
nesting, duplicate keys (only expressible in raw JSON text), wrong types, and messages of every
type that are almost valid, so that the schemas and the handlers behind them are reached.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

#: CI runs the same examples every time (``derandomize``); a local run explores afresh.
#: database=None: no .hypothesis/ folder in the work tree.
DERANDOMIZE = bool(os.environ.get("CI"))


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=DERANDOMIZE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


#: Characters that broke or could break something downstream, always in the mix.
NASTY_CHARACTERS = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x07", "\x1b", "\x7f", "\x85", "\u2028",
                    "\ufeff", "\ufffd", "\U0001f600", "\"", "\\", "<", "%"]

hostile_text = st.text(st.characters(codec=None) | st.sampled_from(NASTY_CHARACTERS), max_size=24)

#: 64-bit range: what msgpack can carry; JSON frames get bigger ones through ``huge_numbers``.
numbers = (st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, -1, 2**53, -(2**53) - 1, 2**63 - 1])
           | st.floats(allow_nan=False, allow_infinity=False))

hostile_values = st.recursive(
    st.none() | st.booleans() | numbers | hostile_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text, children, max_size=4),
    max_leaves=16,
)


def near_valid(bases: list[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid message of some type with fields dropped, replaced by hostile values, or added."""

    def mutate(base: dict[str, Any], drop: list[str], replace: dict[str, Any], add: dict[str, Any]) -> dict[str, Any]:
        message = {k: v for k, v in base.items() if k not in drop}
        message.update({k: v for k, v in replace.items() if k in base})
        message.update(add)
        return message

    keys = st.sampled_from(sorted({k for m in bases for k in m} | {"sdp", "candidate", "zzz"})) | hostile_text
    return st.builds(
        mutate,
        st.sampled_from(bases),
        st.lists(keys, max_size=2),
        st.dictionaries(keys, hostile_values, max_size=2),
        st.dictionaries(keys, hostile_values, max_size=1),
    )


def _json_with(base: Mapping[str, Any], extra: str) -> str:
    """``base`` as JSON text with raw ``extra`` members appended inside the object."""
    text = json.dumps(base)
    return text[:-1] + ("," if len(base) else "") + extra + "}"


def raw_json_frames(bases: list[dict[str, Any]]) -> st.SearchStrategy[str]:
    """What only raw JSON text can say: duplicate keys, deep nesting, numbers beyond 64 bits, NaN."""
    base = st.sampled_from(bases)
    duplicate = st.builds(lambda b, key, value: _json_with(b, f"{json.dumps(key)}:{json.dumps(value)}"),
                          base, st.sampled_from(["type", "id", "token", "offer", "name"]) | hostile_text,
                          hostile_values)
    deep = st.builds(lambda b, n, opener: _json_with(b, '"x":' + opener * n + ("]" if opener == "[" else "}") * n),
                     base, st.integers(1, 5000), st.sampled_from(["["]))
    deep_objects = st.builds(lambda b, n: _json_with(b, '"x":' + '{"a":' * n + "1" + "}" * n),
                             base, st.integers(1, 3000))
    huge = st.builds(lambda b, digits: _json_with(b, f'"id":{digits}'), base,
                     st.sampled_from(["1" * 400, "-" + "9" * 5000, "1e400", "-1e-400", "NaN", "Infinity",
                                      "123456789012345678901234567890"]))
    return duplicate | deep | deep_objects | huge


def json_frames(bases: list[dict[str, Any]]) -> st.SearchStrategy[str | bytes]:
    """Frames for a JSON client: text of hostile messages, raw JSON tricks, garbage, CESU-8 bytes."""
    structured = near_valid(bases).map(json.dumps) | hostile_values.map(json.dumps)
    cesu = near_valid(bases).map(lambda m: json.dumps(m, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return structured | raw_json_frames(bases) | st.text(max_size=200) | cesu | st.binary(max_size=200)


def msgpack_frames(bases: list[dict[str, Any]]) -> st.SearchStrategy[str | bytes]:
    """Frames for a msgpack client: packed hostile messages (strings as CESU-8 where needed), garbage."""

    def pack(value: Any) -> bytes:
        packed = msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")
        assert isinstance(packed, bytes)
        return packed

    structured = near_valid(bases).map(pack) | hostile_values.map(pack)
    return structured | st.binary(max_size=200) | st.text(max_size=100)
