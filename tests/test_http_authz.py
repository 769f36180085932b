"""The HTTP authorization matrix, generated from docs/openapi.yaml: every operation × a set of
callers (no token, a patient's link, a guest's link, staff of another department, support, a demo token, and
insiders) → refused with the status and code ``x-authorization`` documents, unless the operation's
``x-roles`` (and ``x-room``) allow the caller, in which case it is never refused (401/403) and
never fails (5xx). Nothing here lists routes or roles again: the yaml is the contract.

Also: security headers on every response, the demo endpoint's on/off rule and its tokens kept
out of the workflow, and out-of-range query values refused with a coded error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from loadtest.client import RequestFailed, SignallingClient
from rooms.model import Role
from signalling.auth import TokenAuthority, load_or_create_secret
from signalling.config import load_config
from tests.call_helpers import authority
from tests.helpers import free_port, wait_until, wait_until_sync
from tests.server import REPO_ROOT, ServerProcess, start_server
from tests.workflow.helpers import now_ms

OPENAPI = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml").read_text())
REFUSALS: dict[str, dict[str, Any]] = OPENAPI["x-authorization"]
DEPT, ROOM = "cardiology", "cardiology-main"  # the names the yaml's examples use
METHODS = ("get", "post", "put", "patch", "delete")


@dataclass(frozen=True)
class Caller:
    """Who calls: a token (or none) and what the yaml's rules look at."""

    name: str
    token: str | None
    role: str | None = None
    room: str | None = None
    departments: tuple[str, ...] = ()
    demo: bool = False
    walk_in_link: bool = False


@dataclass
class World:
    """A server with one department: a waiting room, a booked consultation, an announcement."""

    server: ServerProcess
    http: aiohttp.ClientSession
    tokens: TokenAuthority
    sid: str = ""
    announcement_id: str = ""
    callers: list[Caller] = field(default_factory=list)

    async def call(self, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.http.request(method, self.server.url + path, json=body, headers=headers) as response:
            text = await response.text()
            data = None
            if response.content_type == "application/json":
                data = await response.json()
            return response.status, data if data is not None else text, response.headers


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("authz"))
    yield server
    server.stop()


@pytest.fixture
async def world(server: ServerProcess) -> AsyncIterator[World]:
    async with aiohttp.ClientSession() as http:
        w = World(server, http, authority(server.data_dir))
        yield w


def staff(w: World, role: Role, user: str, *departments: str, room: str = "staff") -> Caller:
    token = w.tokens.mint(room, role, user, sub=user, departments=departments)
    return Caller(f"{role}:{user}@{','.join(departments) or '-'} room {room}", token, str(role), room, departments)


async def populate(w: World) -> None:
    """The department of the yaml's examples, and one caller of each kind."""
    org = staff(w, Role.ORGANISATION_ADMIN, "olga")
    status, data, _ = await w.call("POST", "/api/waiting-rooms", org.token,
                                   {"room_id": ROOM, "name": "Cardiology", "department": DEPT})
    assert status in (201, 409), data  # 409: made by an earlier test on this module's server
    status, booking, _ = await w.call("POST", "/api/consultations", org.token, {
        "department": DEPT, "waiting_room": ROOM, "patient_ref": "p-authz", "patient_name": "Anna",
        "clinician": "dr-hansen", "appointment_ms": now_ms()})
    assert status == 201, booking
    w.sid = booking["consultation"]["session_id"]
    status, ann, _ = await w.call("POST", f"/api/waiting-rooms/{ROOM}/announcements", org.token,
                                  {"text": "Running late", "expires_in_s": 600})
    assert status == 201, ann
    w.announcement_id = ann["announcement"]["announcement_id"]
    status, link, _ = await w.call("POST", f"/api/waiting-rooms/{ROOM}/walk-in-link", org.token, {})
    assert status == 201, link
    status, guest, _ = await w.call("POST", f"/api/consultations/{w.sid}/guests", org.token, {"name": "Ida"})
    assert status == 201, guest
    demo = {}
    for role in ("patient", "clinician"):
        status, minted, _ = await w.call("POST", "/api/demo/token", None, {"room": "demo-room", "name": "D", "role": role})
        assert status == 200, minted
        demo[role] = minted["token"]
    w.callers = [
        Caller("no token", None),
        Caller("patient link", booking["patient_token"], "patient", w.sid),
        Caller("clinician link", booking["clinician_token"], "clinician", w.sid, (DEPT,)),
        Caller("guest link", guest["guest_token"], "guest", w.sid),
        Caller("walk-in link", link["walk_in_token"], "patient", ROOM, walk_in_link=True),
        staff(w, Role.CLINICIAN, "dr-other", "elsewhere"),
        staff(w, Role.DEPARTMENT_ADMIN, "da-other", "elsewhere"),
        staff(w, Role.SUPPORT, "sue", room="support"),
        staff(w, Role.SUPPORT, "sue", room=ROOM),  # support, but a token for a call's room
        staff(w, Role.ADMIN, "ada", room=ROOM),
        Caller("demo patient", demo["patient"], "patient", "demo-room", demo=True),
        Caller("demo clinician", demo["clinician"], "clinician", "demo-room", demo=True),
        # Insiders last: their requests may change what they act on.
        staff(w, Role.CLINICIAN, "dr-hansen", DEPT),
        staff(w, Role.DEPARTMENT_ADMIN, "da-cardio", DEPT),
        org,
    ]


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, item in OPENAPI["paths"].items()
            for method, op in item.items() if method in METHODS]


def refusal(op: dict[str, Any], caller: Caller) -> str | None:
    """The documented refusal (a key of x-authorization) for this caller, or None if allowed."""
    if op.get("security") == []:
        return None
    if caller.token is None:
        return "no_token"
    if caller.demo:
        return "demo"
    roles: dict[str, str] = op["x-roles"]
    if caller.role not in roles:
        return "role"
    if "x-room" in op and caller.room != op["x-room"]:
        return "room"
    scope = roles[caller.role]
    if scope == "department" and DEPT not in caller.departments:
        return "department"
    if scope == "walk_in_link" and not caller.walk_in_link:
        return "walk_in_link"
    # own_departments: never refused for the department; the answer is filtered instead.
    assert scope in ("all", "department", "walk_in_link", "own_departments"), scope
    return None


def concrete(w: World, path: str) -> str:
    values = {"session_id": w.sid, "room_id": ROOM, "department": DEPT, "announcement_id": w.announcement_id,
              "guest_id": "g_none"}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


def example_body(op: dict[str, Any]) -> Any:
    content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    return content.get("example")


async def ends_node(w: World, method: str, path: str, token: str | None, body: Any) -> tuple[int, Any]:
    """An operation that makes its node exit (``x-ends-node``, e.g. a drain), allowed for this
    caller: sent to a node of its own that shares the module server's secret, which must exit 0."""
    secret = load_or_create_secret(w.server.data_dir, create=False)
    workdir = Path(tempfile.mkdtemp(prefix="oc-ends-node-"))
    node = start_server(workdir, f'[auth]\nsecret = "{secret}"\n')
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with w.http.request(method, node.url + path, json=body, headers=headers) as response:
            data = await response.json() if response.content_type == "application/json" else await response.text()
            status = response.status
        await wait_until(lambda: node.proc.poll() is not None, timeout=30, message=f"{method} {path}: the node exits")
        assert node.proc.returncode == 0, node.log_tail()
        return status, data
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_every_operation_refuses_whom_the_yaml_says(world: World) -> None:
    await populate(world)
    ops = operations()
    assert len(ops) >= 20
    outcomes: list[tuple[str, str, str, str]] = []  # (operation, caller, expected, got)
    allowed_somewhere: dict[str, int] = {}
    for method, path, op in ops:
        name = f"{method.upper()} {path}"
        if op.get("security") != []:
            assert "x-roles" in op, f"{name} takes a token but documents no x-roles"
        allowed_somewhere[name] = 0
        for caller in world.callers:
            expected = refusal(op, caller)
            if expected is None and op.get("x-ends-node"):
                status, data = await ends_node(world, method.upper(), concrete(world, path), caller.token,
                                               example_body(op))
            else:
                status, data, _ = await world.call(method.upper(), concrete(world, path), caller.token,
                                                   example_body(op))
            if expected is None:
                allowed_somewhere[name] += 1
                got = "allowed" if status not in (401, 403) and status < 500 else f"{status} {data}"
                outcomes.append((name, caller.name, "allowed", got))
            else:
                want = REFUSALS[expected]
                code = data["error"]["code"] if isinstance(data, dict) and "error" in data else None
                got = expected if (status, code) == (want["status"], want["code"]) else f"{status} {code}"
                outcomes.append((name, caller.name, expected, got))
    wrong = [o for o in outcomes if o[2] != o[3]]
    assert wrong == [], "\n".join(map(str, wrong))
    # Every operation that takes a token is reachable by someone: the matrix is not all refusals.
    assert [n for n, count in allowed_somewhere.items() if count == 0] == []
    assert len(outcomes) == len(ops) * len(world.callers)


async def test_security_headers_on_every_response(world: World) -> None:
    paths = ["/", "/inspector", "/healthz", "/metrics", "/static/openconsult.js", "/no-such-page",
             "/api/sessions", "/api/consultations/nope"]
    for path in paths:
        status, _, headers = await world.call("GET", path, None)
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Referrer-Policy"] == "no-referrer", path
        assert headers["X-Frame-Options"] == "DENY", path
        csp = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
        host = world.server.url.split("//", 1)[1]
        assert csp["script-src"] == "'self'" and csp["frame-ancestors"] == "'none'", (path, csp)
        assert csp["object-src"] == "'none'" and csp["base-uri"] == "'none'", (path, csp)
        assert csp["connect-src"].split() == ["'self'", f"ws://{host}", f"wss://{host}"], (path, csp)
        assert status < 500, path
    # The pages hold no inline script or style the CSP would block.
    static = Path(__file__).resolve().parents[1] / "signalling" / "static"
    for page in static.glob("*.html"):
        html = page.read_text()
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], page.name
        assert "<style" not in html and " style=" not in html and re.search(r"\son[a-z]+=", html) is None, page.name


@pytest.mark.parametrize("query, name, bounds", [
    ("limit=-1", "limit", "1-10000"), ("limit=0", "limit", "1-10000"), ("limit=10001", "limit", "1-10000"),
    ("limit=abc", "limit", "1-10000"), ("limit=" + "9" * 30, "limit", "1-10000"),
    ("since_ms=-5", "since_ms", "0-9007199254740991"), ("since_ms=1e3", "since_ms", "0-9007199254740991"),
])
async def test_out_of_range_query_values_are_refused(world: World, query: str, name: str, bounds: str) -> None:
    support = world.tokens.mint("support", Role.SUPPORT, "Sue")
    for path in ("/api/sessions/s_x/events", "/api/sessions", "/api/sessions/s_x/quality"):
        if name == "limit" and not path.endswith("/events"):
            continue
        status, data, _ = await world.call("GET", f"{path}?{query}", support)
        assert status == 400 and data["error"]["code"] == "invalid_message", (path, data)
        assert f'"{name}"' in data["error"]["message"] and bounds in data["error"]["message"], data
    for path in ("/api/sessions?until_ms=-1", "/api/sessions?since_ms=99999999999999999999"):
        status, data, _ = await world.call("GET", path, support)
        assert status == 400 and data["error"]["code"] == "invalid_message", (path, data)
    status, data, _ = await world.call("GET", "/api/sessions/s_x/events?limit=1&since_ms=0", support)
    assert status == 200, data


async def test_a_demo_token_reaches_no_workflow_data(world: World) -> None:
    """A demo token names no workflow identity whatever was asked; the workflow, the staff API and
    the inspector refuse it; it cannot be minted for a consultation's room."""
    await populate(world)
    status, minted, _ = await world.call("POST", "/api/demo/token", None,
                                         {"room": "demo-x", "name": "p-authz", "role": "patient", "sub": "p-authz"})
    assert status == 200, minted
    claims = world.tokens.verify(minted["token"])
    assert claims.demo and claims.sub.startswith("demo:") and claims.sub != "p-authz"
    assert (claims.consultation, claims.waiting_room, claims.link, claims.departments) == (None, None, None, ())
    # A consultation's room is not a demo room.
    status, data, _ = await world.call("POST", "/api/demo/token", None, {"room": world.sid, "name": "Eve", "role": "clinician"})
    assert status == 403 and data["error"]["code"] == "forbidden", data
    # Over the wire: it joins its media room, and every workflow message is refused.
    client = await SignallingClient(world.server.ws_url).connect()
    try:
        await client.join(minted["token"])
        channel = f"consultation:{world.sid}"
        messages: list[dict[str, Any]] = [
            {"type": "chat.history", "channel_id": channel},
            {"type": "chat.send", "channel_id": channel, "text": "hello"},
            {"type": "consultation.get", "session_id": world.sid},
            {"type": "queue.watch", "room_id": ROOM},
            {"type": "waiting_room.enter"},
        ]
        codes = []
        for message in messages:
            fields = {k: v for k, v in message.items() if k != "type"}
            try:
                await client.request(message["type"], **fields)
            except RequestFailed as exc:
                codes.append(exc.code)
        assert codes == ["forbidden"] * len(messages)
    finally:
        await client.close()


def serve(workdir: Path, host: str, config: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``openconsult serve`` on ``host`` (start_server always listens on 127.0.0.1)."""
    workdir.mkdir(parents=True)
    (workdir / "openconsult.toml").write_text(config)
    log = workdir / "server.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "signalling.cli", "serve", "--host", host, "--port", str(port),
                                 "--data-dir", str(workdir / "data"), "--config", str(workdir / "openconsult.toml")],
                                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_until_sync(healthy, timeout=60, interval=0.2, message="/healthz")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url, log


def post_demo(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url + "/api/demo/token", method="POST", data=b'{"room": "r1", "name": "Anna"}',
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("host, config, want, said", [
    ("127.0.0.1", "", 200, "on: the server listens on loopback"),
    ("127.0.0.1", "[demo]\nenabled = false\n", 404, "off: [demo] enabled = false"),
    ("0.0.0.0", "", 404, "off: the server listens on 0.0.0.0, not loopback"),
    ("0.0.0.0", "[demo]\nenabled = true\n", 200, "on: [demo] enabled = true"),
])
def test_demo_endpoint_follows_the_listen_address(tmp_path: Path, host: str, config: str, want: int,
                                                  said: str) -> None:
    """auto: on for a loopback listen address, off otherwise; true: on anywhere; false: off.
    Start-up says which, and why."""
    proc, url, log = serve(tmp_path / "node", host, '[media]\nice_addresses = ["127.0.0.1"]\n' + config)
    try:
        status, body = post_demo(url)
        assert status == want, body
        if want == 404:
            assert json.loads(body)["error"]["code"] == "not_found", body
        else:
            assert TokenAuthority.from_config(load_config(env={}, overrides={"server": {"data_dir": str(tmp_path / "node" / "data")}}),
                                              create_secret=False).verify(json.loads(body)["token"]).demo
        assert f"demo token endpoint {said}" in log.read_text(), log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("host, enabled, served", [
    ("127.0.0.1", None, True), ("::1", None, True), ("localhost", None, True), ("127.0.0.2", None, True),
    ("0.0.0.0", None, False), ("::", None, False), ("192.168.1.5", None, False), ("example.org", None, False),
    ("0.0.0.0", "true", True), ("127.0.0.1", "false", False), ("127.0.0.1", "auto", True), ("0.0.0.0", "auto", False),
])
def test_demo_switch(host: str, enabled: str | None, served: bool) -> None:
    env = {"OPENCONSULT_SERVER__HOST": host}
    if enabled is not None:
        env["OPENCONSULT_DEMO__ENABLED"] = enabled
    config = load_config(env=env)
    assert config.demo_served is served
    assert config.demo_status().startswith(f"demo token endpoint {'on' if served else 'off'}: "), config.demo_status()


def test_demo_switch_refuses_other_values() -> None:
    with pytest.raises(ValueError, match='demo.enabled must be true or false \\(or "auto"\\)'):
        load_config(env={"OPENCONSULT_DEMO__ENABLED": "maybe"})
