"""Property-based fuzzing of every HTTP JSON body (the operations with a requestBody in
docs/openapi.yaml) against a real server: lone surrogates, control characters, huge and negative
numbers, deep nesting, wrong types, duplicate keys, bytes that are not UTF-8 or not JSON. Every
request gets a 2xx or a 4xx coded error (``{"error": {"code", "message"}}`` with a documented
code); never a 5xx, never a traceback in the server's log, and the server stays healthy.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rooms.model import Role
from tests.call_helpers import authority
from tests.server import ServerProcess, start_server
from tests.workflow.helpers import now_ms

OPENAPI = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml").read_text())
CODES = set(OPENAPI["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
DEPT, ROOM = "cardiology", "cardiology-main"


@dataclass
class Target:
    server: ServerProcess
    tokens: dict[str, str]
    values: dict[str, str]

    def request(self, method: str, path: str, body: bytes, token: str | None) -> tuple[int, bytes]:
        url = urllib.parse.urlsplit(self.server.url)
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any, token: str | None) -> Any:
        status, data = self.request(method, path, json.dumps(body).encode(), token)
        assert status in (200, 201), (path, status, data)
        return json.loads(data)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    server = start_server(tmp_path_factory.mktemp("fuzz"), extra_config="[workflow]\nwalk_in_per_link_per_min = 10000\n")
    tokens = authority(server.data_dir)
    org = tokens.mint("staff", Role.ORGANISATION_ADMIN, "olga", sub="olga")
    t = Target(server, {"org": org}, {})
    t.json("POST", "/api/waiting-rooms", {"room_id": ROOM, "name": "Cardiology", "department": DEPT}, org)
    booking = t.json("POST", "/api/consultations", {"department": DEPT, "waiting_room": ROOM, "patient_ref": "p-fuzz",
                                                     "appointment_ms": now_ms()}, org)
    ann = t.json("POST", f"/api/waiting-rooms/{ROOM}/announcements", {"text": "Late"}, org)
    link = t.json("POST", f"/api/waiting-rooms/{ROOM}/walk-in-link", {}, org)
    t.tokens["walk_in"] = link["walk_in_token"]
    t.values = {"session_id": booking["consultation"]["session_id"], "room_id": ROOM, "department": DEPT,
                "announcement_id": ann["announcement"]["announcement_id"]}
    yield t
    log = server.log_text()
    server.stop()
    assert "Traceback" not in log and "Error handling request" not in log, log[-4000:]


def body_operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, item in OPENAPI["paths"].items() for method, op in item.items()
            if isinstance(op, dict) and "requestBody" in op]


# --- strategies -------------------------------------------------------------------------------

NASTY_TEXT = ["\ud800", "\udfff", "a\ud83d", "\x00", "\x1b[31mred", "\u202egnp.exe", "\r\nX-Injected: 1", "",
              " " * 3, "x" * 100_000, "<script>alert(1)</script>", "../../etc/passwd", "%00", "\ufeff", "💥" * 50]
NASTY_NUMBERS = [0, -1, -(2**63), 2**63, 2**64 + 1, 10**300, -(10**300), 1e308, -1e308, 0.5, float("inf"),
                 float("-inf"), float("nan"), True, False]
text = st.one_of(st.sampled_from(NASTY_TEXT),
                 st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40))
number = st.one_of(st.sampled_from(NASTY_NUMBERS), st.integers(), st.floats(allow_nan=True, allow_infinity=True))
scalar = st.one_of(st.none(), st.booleans(), number, text)
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(text, inner, max_size=4)), max_leaves=12)


def nested(depth: int, kind: str) -> Any:
    out: Any = 1
    for _ in range(depth):
        out = [out] if kind == "list" else {"a": out}
    return out


@st.composite
def body(draw: st.DrawFn, example: dict[str, Any]) -> bytes:
    """A request body: the operation's example with fields made hostile, or any JSON value, or
    bytes that are not JSON at all."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "any", "deep", "raw", "duplicate"]))
    if kind == "mutated":
        doc = {k: draw(st.one_of(st.just(v), value)) for k, v in example.items()}
        doc.update(draw(st.dictionaries(text, value, max_size=2)))
        ascii_only = draw(st.booleans())
        encoded = json.dumps(doc, ensure_ascii=ascii_only)
        return encoded.encode("utf-8", "surrogatepass")  # a raw lone surrogate is not UTF-8
    if kind == "any":
        return json.dumps(draw(value)).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([50, 900, 5_000, 100_000]))
        return json.dumps(nested(min(depth, 900), draw(st.sampled_from(["list", "dict"])))).encode() if depth <= 900 \
            else ("[" * depth + "]" * depth).encode()
    if kind == "duplicate":
        key = draw(st.sampled_from(sorted(example) or ["x"]))
        return f'{{"{key}": "a", "{key}": {json.dumps(draw(value))}}}'.encode()
    return draw(st.one_of(st.binary(max_size=64), st.sampled_from(
        [b"", b"{", b"null", b"[]", b'"x"', b"\xff\xfe{}", b'{"a": 1e99999}', b'{"n": ' + b"9" * 5000 + b"}",
         b"\xed\xa0\x80", b'{"a": "\\ud800"}', b"NaN", b"{\"a\":}"])))


@pytest.mark.parametrize("method, path, op", body_operations(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_http_body_gets_a_coded_answer(target: Target, method: str, path: str, op: dict[str, Any]) -> None:
    example = op["requestBody"]["content"]["application/json"].get("example") or {}
    token = None if op.get("security") == [] else target.tokens["walk_in" if path == "/api/walk-in" else "org"]
    concrete = re.sub(r"\{(\w+)\}", lambda m: target.values[m.group(1)], path)
    seen: list[int] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payload=body(example))
    def check(payload: bytes) -> None:
        status, raw = target.request(method.upper(), concrete, payload, token)
        seen.append(status)
        assert status < 500, (status, raw[:300], payload[:300])
        if status >= 400:
            error = json.loads(raw)["error"]
            assert error["code"] in CODES and isinstance(error["message"], str) and error["message"], error

    check()
    assert len(seen) >= 30
    assert any(400 <= s < 500 for s in seen)  # the hostile bodies were seen and refused
    status, _ = target.request("GET", "/healthz", b"", None)
    assert status == 200
