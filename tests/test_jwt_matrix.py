"""The JWT matrix: hostile tokens against a real HS256 server and a real RS256 server, over the
WebSocket join (coded error, then close 4001) and over HTTP bearer (the documented status and code).

Tokens are built by hand (header, payload, signature), so that nothing a JWT library refuses to
produce is left out: alg none / empty / unknown / missing, key confusion both ways (an HS256 token
whose HMAC key is the server's RSA public key; an RS256 token on an HS256 server), a wrong key,
expired, not yet valid, each required claim missing, ill-typed claims, a wrong room, a tampered
role, an oversized token, a header holding a lone surrogate or a control character, and shapes
that are not a JWT. A well-signed control token is accepted on both paths (the forger works).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from loadtest.client import RequestFailed, SignallingClient
from tests.server import ServerProcess, start_server

STATUS = {"unauthorized": 401, "token_expired": 401, "token_not_yet_valid": 401, "room_mismatch": 403}
ROOM = "jwt-room"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class Node:
    """A running server and the key material a forger might or might not have."""

    server: ServerProcess
    algorithm: str
    secret: bytes  # HS256: the server's secret; RS256: unused
    private: rsa.RSAPrivateKey  # RS256: the server's key; HS256: a key the server never saw
    other: rsa.RSAPrivateKey  # a key nobody trusts

    def sign(self, signing_input: bytes, alg: str, key: bytes | rsa.RSAPrivateKey | None = None) -> str:
        """Sign as ``alg`` with ``key`` (default: the server's own key for its algorithm)."""
        if alg == "HS256":
            secret = key if isinstance(key, bytes) else self.secret
            return b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
        private = key if isinstance(key, rsa.RSAPrivateKey) else self.private
        return b64(private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))

    def token(self, payload: dict[str, Any] | str | None = None, *, header: dict[str, Any] | str | None = None,
              alg: str | None = None, key: bytes | rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
        """A token: ``header``/``payload`` as objects or raw JSON text; signed with the server's key
        and algorithm unless told otherwise; ``claims`` change the default payload (None deletes)."""
        now = int(time.time())
        if payload is None:
            payload = {"room": ROOM, "role": "support", "name": "Mallory", "sub": "mallory", "nbf": now - 10,
                       "exp": now + 600, "iat": now}
            for name, value in claims.items():
                if value is None:
                    payload.pop(name, None)
                else:
                    payload[name] = value
        alg = alg or self.algorithm
        header = {"alg": alg, "typ": "JWT"} if header is None else header
        head = header if isinstance(header, str) else json.dumps(header)
        body = payload if isinstance(payload, str) else json.dumps(payload)
        signing_input = f"{b64(head.encode('utf-8', 'surrogatepass'))}.{b64(body.encode())}".encode()
        return f"{signing_input.decode()}.{self.sign(signing_input, alg, key)}"


def oversized(node: Node) -> str:
    """A well-signed token of 8100 characters: over the 8000 accepted, under HTTP's header limit."""
    base = len(node.token(pad=""))
    token = node.token(pad="x" * ((8100 - base) * 3 // 4))
    assert 8000 < len(token) < 8180, len(token)
    return token


def cases(node: Node) -> dict[str, tuple[str, str | None, dict[str, Any]]]:
    """name → (token, the refusal code or None for the control, extra join fields)."""
    now = int(time.time())
    good = node.token()
    head, payload, sig = good.split(".")
    tampered_payload = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered_payload["role"] = "organisation_admin"
    tampered = f"{head}.{b64(json.dumps(tampered_payload).encode())}.{sig}"
    public_pem = pem_public(node.private)
    u = "unauthorized"
    out: dict[str, tuple[str, str | None, dict[str, Any]]] = {
        "control": (good, None, {}),
        "alg_none": (node.token(header={"alg": "none", "typ": "JWT"}).rsplit(".", 1)[0] + ".", u, {}),
        "alg_None": (node.token(header={"alg": "None"}).rsplit(".", 1)[0] + ".", u, {}),
        "alg_empty": (node.token(header={"alg": ""}), u, {}),
        "alg_unknown": (node.token(header={"alg": "HS999"}), u, {}),
        "alg_missing": (node.token(header={"typ": "JWT"}), u, {}),
        "alg_not_a_string": (node.token(header={"alg": ["HS256", "RS256"]}), u, {}),
        "alg_control_char": (node.token(header={"alg": node.algorithm + "\x00"}), u, {}),
        "header_lone_surrogate": (node.token(header='{"alg":"\ud800","typ":"JWT"}'), u, {}),
        "header_escaped_lone_surrogate": (node.token(header='{"alg":"\\ud800","typ":"JWT"}'), u, {}),
        "header_not_an_object": (node.token(header="[1, 2]"), u, {}),
        "key_confusion_hs256_with_rsa_public_key": (node.token(alg="HS256", key=public_pem), u, {}),
        "key_confusion_rs256_signed_by_unknown_key": (node.token(alg="RS256", key=node.other), u, {}),
        "wrong_key": (node.token(key=b"k" * 48 if node.algorithm == "HS256" else node.other), u, {}),
        "signature_stripped": (good.rsplit(".", 1)[0] + ".", u, {}),
        "expired": (node.token(nbf=now - 7200, exp=now - 3600), "token_expired", {}),
        "not_yet_valid": (node.token(nbf=now + 3600, exp=now + 7200), "token_not_yet_valid", {}),
        "wrong_room": (good, "room_mismatch", {"room": "another-room"}),
        "tampered_role": (tampered, u, {}),
        "oversized": (oversized(node), u, {}),
        "payload_not_json": (node.token("not json"), u, {}),
        "payload_not_an_object": (node.token("[1]"), u, {}),
        "two_segments": (".".join(good.split(".")[:2]), u, {}),
        "four_segments": (good + ".x", u, {}),
        "empty": ("", u, {}),
        "garbage": ("not-a-jwt", u, {}),
        "demo_namespace_without_demo_claim": (node.token(sub="demo:abc"), u, {}),
        "demo_claim_with_workflow_claims": (node.token(sub="demo:abc", demo=True, consultation="s_1"), u, {}),
    }
    for claim in ("exp", "nbf", "room", "role", "name"):
        out[f"missing_{claim}"] = (node.token(**{claim: None}), u, {})
    ill_typed: dict[str, Any] = {
        "room": 5, "role": ["support"], "name": {"x": 1}, "exp": "soon", "nbf": True, "sub": 7, "demo": "yes",
        "departments": "cardio", "consultation": 3, "link": "", "iat": "now",
    }
    for claim, value in ill_typed.items():
        out[f"ill_typed_{claim}"] = (node.token(**{claim: value}), u, {})
    out["role_unknown"] = (node.token(role="janitor"), u, {})
    out["room_malformed"] = (node.token(room="a room/with spaces"), u, {})
    out["name_too_long"] = (node.token(name="n" * 81), u, {})
    out["departments_items_ill_typed"] = (node.token(departments=[1, None]), u, {})
    return out


@pytest.fixture(scope="module", params=["HS256", "RS256"])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    workdir = tmp_path_factory.mktemp(f"jwt-{request.param}")
    private, other = rsa_key(), rsa_key()
    secret = b"s" * 48
    if request.param == "HS256":
        config = f'[auth]\nsecret = "{secret.decode()}"\n'
    else:
        (workdir / "public.pem").write_bytes(pem_public(private))
        config = f'[auth]\nalgorithm = "RS256"\npublic_key_file = "{workdir / "public.pem"}"\n'
    server = start_server(workdir, extra_config=config)
    yield Node(server, request.param, secret, private, other)
    server.stop()


async def join_outcome(node: Node, token: str, fields: dict[str, Any]) -> tuple[str | None, int | None]:
    client = await SignallingClient(node.server.ws_url).connect()
    try:
        try:
            await client.join(token, **fields)
        except RequestFailed as exc:
            if exc.code == "invalid_message":  # the message's shape, not the token: socket stays open
                assert client.close_code is None
                return exc.code, None
            await asyncio.wait_for(client.closed.wait(), 30)
            return exc.code, client.close_code
        return None, None
    finally:
        await client.close()


async def http_outcome(http: aiohttp.ClientSession, node: Node, token: str) -> tuple[int, str | None]:
    """GET the inspector's session list with ``token`` as the bearer."""
    async with http.get(node.server.url + "/api/sessions", headers={"Authorization": f"Bearer {token}"}) as response:
        data = await response.json() if response.content_type == "application/json" else None
        return response.status, data["error"]["code"] if data and "error" in data else None


async def test_every_hostile_token_is_refused_with_its_code(node: Node) -> None:
    table = cases(node)
    assert len(table) >= 45
    over_ws: list[tuple[str, Any]] = []
    over_http: list[tuple[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        for name, (token, code, fields) in table.items():
            over_ws.append((name, await join_outcome(node, token, fields)))
            over_http.append((name, await http_outcome(http, node, token)))
    # An empty token fails the join message's schema (docs/protocol.md: invalid_message, the
    # socket stays open); every other refusal closes with 4001 after the coded reply.
    want_ws = [(name, ("invalid_message", None) if name == "empty" else (code, 4001 if code else None))
               for name, (_, code, _) in table.items()]
    assert over_ws == want_ws
    # HTTP: the control token is a support token for ROOM, so the inspector (room support) answers
    # room_mismatch; so does wrong_room; everything else is refused before the room is looked at.
    want_http = [(name, (STATUS[code or "room_mismatch"], code or "room_mismatch"))
                 for name, (_, code, _) in table.items()]
    assert [(n, o) for n, o in over_http] == [(n, w) for n, w in want_http]


async def test_a_well_signed_support_token_reads_the_inspector(node: Node) -> None:
    """The control over HTTP: the forger's token for room support is accepted."""
    async with aiohttp.ClientSession() as http:
        token = node.token(room="support")
        async with http.get(node.server.url + "/api/sessions", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()


def test_forged_tokens_are_what_they_claim(tmp_path: Path) -> None:
    """The forger itself: an HS256 control token verifies with PyJWT and the secret."""
    import jwt

    node = Node.__new__(Node)
    node.algorithm, node.secret, node.private, node.other = "HS256", b"s" * 48, rsa_key(), rsa_key()
    token = node.token()
    assert jwt.decode(token, node.secret, algorithms=["HS256"])["room"] == ROOM
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(node.token(key=b"k" * 48), node.secret, algorithms=["HS256"])

