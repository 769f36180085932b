"""HTTP endpoints: health, draining a node (POST /api/admin/drain, admin tokens), the inspector API (support/admin tokens), the demo
token endpoint, the pre-call test's token (POST /api/precall/token) and page (/test), the tab-closed beacon (POST /api/client-events), Prometheus metrics and the
static pages."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from metrics import prometheus as prom
from metrics.diagnosis import diagnose
from metrics.eventlog import Analysis
from metrics.summary import summary
from metrics.events import EventKind
from rooms.errors import RoomsError
from rooms.model import Role
from rooms.service import CONSULTATION
from signalling import __version__
from signalling.audit import CLAIMS_KEY, TOKEN_DIGEST_KEY, audit_lookup, token_digest
from signalling.auth import ROOM_PATTERN, Claims
from signalling.client_reports import BEACON_MAX_BYTES, ReportLimiter, validate_beacon
from signalling.failover import DRAIN_KEY
from signalling.errors import (
    Forbidden,
    InvalidMessage,
    MessageTooLarge,
    NotFound,
    OpenConsultError,
    RateLimited,
    RoomMismatch,
    Unauthorized,
    coded,
)
from signalling.keys import CONFIG_KEY, EVENTLOG_KEY, HUB_KEY, STARTED_KEY, TOKENS_KEY, WORKFLOW_KEY
from signalling.proxies import client_ip, networks
from signalling.worker import WORKER_KEY

STATIC_DIR = Path(__file__).parent / "static"
#: What the event list shows: every kind but the quality timeline (read via /quality).
EVENT_KINDS = [str(k) for k in EventKind if k is not EventKind.QUALITY_SAMPLE]
INSPECTOR_ROLES = (Role.SUPPORT, Role.ADMIN)
#: The room claim an inspector token must carry: the inspector reads every session's log, so its
#: token names the inspector, not one media room (a token for a call's room cannot read the logs).
INSPECTOR_ROOM = "support"
#: Bounds of the inspector's query parameters (a time in UTC ms, a number of entries).
TIME_MS_MAX = 2**53 - 1
EVENTS_LIMIT_MAX = 10_000

STATUS = {
    "invalid_message": 400, "invalid_input": 400, "unauthorized": 401, "token_expired": 401,
    "token_not_yet_valid": 401, "room_mismatch": 403, "forbidden": 403, "not_found": 404, "invalid_state": 409,
    "conflict": 409, "too_early": 409, "too_late": 409, "message_too_large": 413, "rate_limited": 429,
    "over_capacity": 503, "codec_not_supported": 415, "cluster_unavailable": 503, "draining": 503,
}


def error_json(error: OpenConsultError | RoomsError) -> web.Response:
    """The one place a coded error (the edge's or a rooms/ domain error) becomes an HTTP status."""
    exc = coded(error)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else None
    return web.json_response({"error": {"code": str(exc.code), "message": exc.message}},
                             status=STATUS.get(str(exc.code), 500), headers=headers)


@web.middleware
async def coded_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except (OpenConsultError, RoomsError) as exc:
        return error_json(exc)


def bearer_claims(request: web.Request, roles: tuple[Role, ...], room: str | None = None) -> Claims:
    """The verified claims of the request's bearer token, if its role is one of ``roles`` (and its
    room claim is ``room`` when given). Demo tokens are refused here: no HTTP API serves them."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise Unauthorized("an Authorization: Bearer <token> header is required")
    token = header[len("Bearer "):].strip()
    claims = request.app[TOKENS_KEY].verify(token)
    # The order of the refusals is the one docs/openapi.yaml documents: demo, role, room.
    if claims.demo:
        raise Forbidden("a demo token may only join a media room; it may not use the HTTP API")
    if claims.role not in roles:
        raise Forbidden(f'role "{claims.role}" may not read this; it needs {" or ".join(roles)}')
    if room is not None and claims.room != room:
        raise RoomMismatch(f'token is for room "{claims.room}", not "{room}" (the room of this API)')
    request[CLAIMS_KEY] = claims  # for the sign-in audit (signalling.audit.staff_sign_ins)
    request[TOKEN_DIGEST_KEY] = token_digest(token)
    return claims


def inspector_claims(request: web.Request) -> Claims:
    """A support or admin token for the inspector: its room claim must be ``support``."""
    return bearer_claims(request, INSPECTOR_ROLES, room=INSPECTOR_ROOM)


def node_health(app: web.Application) -> dict[str, Any]:
    """This process's /healthz body: ``status`` ok, or draining while the node drains."""
    hub = app[HUB_KEY]
    drain = app.get(DRAIN_KEY)
    draining = drain is not None and drain.active
    return {
        "status": "draining" if draining else "ok", "version": __version__,
        "uptime_s": round(time.monotonic() - app[STARTED_KEY], 1),
        # len() of the hub's joined clients: O(1), where summing over sessions cost a few ms at 10k sockets.
        "rooms": len(hub.registry.sessions), "connections": len(hub.clients),
    }


async def healthz(request: web.Request) -> web.Response:
    """200 ``ok``; 503 ``draining`` while the node drains (a load balancer sends it no new client)."""
    worker = request.app.get(WORKER_KEY)
    if worker is not None:  # serve --workers: every worker of the host (signalling/worker.py)
        return web.json_response(await worker.host_health())
    body = node_health(request.app)
    return web.json_response(body, status=503 if body["status"] == "draining" else 200)


#: Who may drain a node: it is an operator's act, not a clinical one.
DRAIN_ROLES = (Role.ADMIN,)
#: Bounds of a drain's ``deadline_s`` (seconds).
DRAIN_DEADLINE_MAX_S = 86_400


async def admin_drain(request: web.Request) -> web.Response:
    """Start draining this node (as SIGTERM does under ``serve --drain``): 202 with its status;
    again while draining: the same drain's status."""
    claims = bearer_claims(request, DRAIN_ROLES)
    body = await json_body(request) if request.can_read_body else {}
    deadline = body.get("deadline_s")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not 1 <= deadline <= DRAIN_DEADLINE_MAX_S):
        raise InvalidMessage(f'"deadline_s" must be a number of seconds, 1-{DRAIN_DEADLINE_MAX_S}')
    status = request.app[DRAIN_KEY].start(f"POST /api/admin/drain by {claims.sub}",
                                          None if deadline is None else float(deadline))
    return web.json_response(status, status=202)


async def session_events(request: web.Request) -> web.Response:
    claims = inspector_claims(request)
    session_id = request.match_info["session_id"]
    since = _int_query(request, "since_ms", 0, TIME_MS_MAX)
    limit = _int_query(request, "limit", 1, EVENTS_LIMIT_MAX) or EVENTS_LIMIT_MAX
    await audit_lookup(request, claims, "session", session_id)
    eventlog = request.app[EVENTLOG_KEY]
    await eventlog.flush(timeout=5)  # read what was logged up to this request
    events = await eventlog.events(session_id, kinds=EVENT_KINDS, since_ms=since, limit=limit)
    return web.json_response({"session_id": session_id, "events": events})


#: Default and bounds of /quality's max_points: a chart per track needs a few hundred points.
QUALITY_MAX_POINTS = 5_000
QUALITY_POINTS_MAX = 100_000
#: Most raw samples /quality returns.
QUALITY_RAW_LIMIT = 100_000


async def session_quality(request: web.Request) -> web.Response:
    """The session's quality timeline: its raw samples (one per track and interval), or, for a
    long call, their roll-ups at the finest resolution that fits in ``max_points``."""
    claims = inspector_claims(request)
    session_id = request.match_info["session_id"]
    since = _int_query(request, "since_ms", 0, TIME_MS_MAX)
    max_points = _int_query(request, "max_points", 1, QUALITY_POINTS_MAX) or QUALITY_MAX_POINTS
    resolution = request.query.get("resolution")
    resolution_s: int | None = None
    if resolution is not None and resolution != "raw":
        if not (resolution.isascii() and resolution.isdigit() and len(resolution) <= 5
                and 10 <= int(resolution) <= 86_400):
            raise InvalidMessage('query parameter "resolution" must be "raw" or seconds of 10-86400, '
                                 f"got {ascii(resolution[:40])}")
        resolution_s = int(resolution)
    await audit_lookup(request, claims, "session", session_id)
    eventlog = request.app[EVENTLOG_KEY]
    await eventlog.flush(timeout=5)
    if resolution is None:
        count = await asyncio.to_thread(eventlog.sample_count_sync, session_id)
        resolution = "raw" if count <= max_points else None
    if resolution == "raw":
        entries = await eventlog.events(session_id, kinds=[EventKind.QUALITY_SAMPLE], since_ms=since,
                                        limit=QUALITY_RAW_LIMIT)
        samples = [{"connection_id": e["connection_id"], **e["payload"]} for e in entries]
        return web.json_response({"session_id": session_id, "resolution": "raw", "samples": samples})
    resolution_ms, points = await asyncio.to_thread(eventlog.quality_points_sync, session_id,
                                                    (resolution_s or 0) * 1000, since, max_points)
    return web.json_response({"session_id": session_id, "resolution": resolution_ms // 1000, "samples": points})


async def _analysis(request: web.Request, session_id: str, *, marks: bool = True) -> Analysis:
    """The session's entries (samples aside), roll-ups and span, as the summary and diagnosis read them."""
    eventlog = request.app[EVENTLOG_KEY]
    await eventlog.flush(timeout=5)
    return await eventlog.analysis(session_id, marks=marks)


async def session_summary(request: web.Request) -> web.Response:
    """Meeting stats, participants with scores and quality over time, and the error log."""
    claims = inspector_claims(request)
    session_id = request.match_info["session_id"]
    await audit_lookup(request, claims, "session", session_id)
    read = await _analysis(request, session_id, marks=False)
    return web.json_response(await asyncio.to_thread(summary, session_id, read.entries, read.rolled, read.span))


async def session_diagnosis(request: web.Request) -> web.Response:
    """Why the call went wrong: findings, problems first."""
    claims = inspector_claims(request)
    session_id = request.match_info["session_id"]
    await audit_lookup(request, claims, "session", session_id)
    read = await _analysis(request, session_id)
    return web.json_response(await asyncio.to_thread(diagnose, session_id, read.entries, read.rolled, read.span))


async def sessions(request: web.Request) -> web.Response:
    claims = inspector_claims(request)
    now = int(time.time() * 1000)
    since = _int_query(request, "since_ms", 0, TIME_MS_MAX)
    until = _int_query(request, "until_ms", 0, TIME_MS_MAX)
    since = now - 7 * 86_400_000 if since is None else since
    until = now + 60_000 if until is None else until
    text, room, name, session_id = (_text_query(request, key) for key in ("q", "room", "name", "session_id"))
    if since > until:
        raise InvalidMessage(f'query parameter "since_ms" ({since}) must not be after "until_ms" ({until})')
    filters = "".join(f" {key}={value}" for key, value in
                      (("q", text), ("room", room), ("name", name), ("session_id", session_id)) if value)
    await audit_lookup(request, claims, "query", f"sessions{filters} since_ms={since} until_ms={until}")
    await request.app[EVENTLOG_KEY].flush(timeout=5)
    found = await request.app[EVENTLOG_KEY].sessions(since, until, text=text, room=room, name=name,
                                                     session_id=session_id)
    return web.json_response({"sessions": found})


#: Longest free-text search parameter.
SEARCH_TEXT_MAX = 200


def _text_query(request: web.Request, name: str) -> str | None:
    """A search text parameter (None when absent or empty); over :data:`SEARCH_TEXT_MAX` characters or
    with control characters: 400 invalid_message naming it."""
    value = request.query.get(name, "").strip()
    if not value:
        return None
    if len(value) > SEARCH_TEXT_MAX or any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value):
        raise InvalidMessage(f'query parameter "{name}" must be at most {SEARCH_TEXT_MAX} printable characters')
    return value


def _int_query(request: web.Request, name: str, low: int, high: int) -> int | None:
    """An integer query parameter within ``low``-``high``, None when absent; else 400 invalid_message
    naming the parameter and its bounds."""
    value = request.query.get(name)
    if value is None:
        return None
    try:
        number = int(value) if len(value) <= 20 else None
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise InvalidMessage(f'query parameter "{name}" must be an integer of {low}-{high}, '
                             f"got {ascii(value[:40])}")
    return number


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a coded error saying what is wrong with it."""
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, UnicodeDecodeError and an integer over Python's
        # digit limit; RecursionError a body nested deeper than the parser goes.
        raise InvalidMessage("the body must be JSON (UTF-8, nested at most a few hundred levels)") from None
    if not isinstance(body, dict):
        raise InvalidMessage("the body must be a JSON object")
    return body


#: Who may post client events: whoever may join a call (the beacon names its own connection).
CALLER_ROLES = tuple(Role)


async def client_events(request: web.Request) -> web.Response:
    """The tab-closed beacon: one ``client.event`` over HTTP, for when the socket may be gone.

    ``navigator.sendBeacon`` cannot set headers, so the join token may come in the body
    (``"token"``) instead of ``Authorization: Bearer``; either way it is checked like a bearer
    token (demo tokens refused) and must be the one the named connection joined with."""
    if request.content_length is not None and request.content_length > BEACON_MAX_BYTES:
        raise MessageTooLarge(f"the body is {request.content_length} bytes, more than the limit of {BEACON_MAX_BYTES}")
    raw = bytearray()
    while len(raw) <= BEACON_MAX_BYTES:  # a chunked body has no length: read no more than the limit
        chunk = await request.content.read(BEACON_MAX_BYTES + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > BEACON_MAX_BYTES:
        raise MessageTooLarge(f"the body is more than the limit of {BEACON_MAX_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidMessage("the body must be JSON (UTF-8)") from None
    if not isinstance(body, dict):
        raise InvalidMessage("the body must be a JSON object")
    if "Authorization" in request.headers or not isinstance(body.get("token"), str):
        claims = bearer_claims(request, CALLER_ROLES)
    else:
        claims = _body_token_claims(request, body["token"])
    connection_id, message = validate_beacon(body)
    eventlog = request.app[EVENTLOG_KEY]
    mark = eventlog.appended
    request.app[HUB_KEY].client_beacon(claims, connection_id, message)
    await eventlog.committed_since(mark)  # accepted means stored
    return web.json_response({}, status=202)


def _body_token_claims(request: web.Request, token: str) -> Claims:
    """:func:`bearer_claims` for a token carried in the body."""
    if not 0 < len(token) <= 8192:
        raise Unauthorized('"token" must be a join token')
    claims = request.app[TOKENS_KEY].verify(token)
    if claims.demo:
        raise Forbidden("a demo token may only join a media room; it may not use the HTTP API")
    return claims


async def demo_token(request: web.Request) -> web.Response:
    """Mint a media-only patient or clinician token for the demo page. Served only as
    ``Config.demo_served`` says (loopback listen address, or [demo] enabled = true); the token is
    marked demo, its ``sub`` is the server's own (``demo:…``), it carries no workflow claim, and a
    consultation's room is refused: the workflow and its calls stay out of reach."""
    if not request.app[CONFIG_KEY].demo_served:
        raise NotFound("the demo token endpoint is off on this server (see [demo] enabled)")
    body = await json_body(request)
    room, name, role = body.get("room"), body.get("name"), body.get("role", "patient")
    if not isinstance(room, str) or not ROOM_PATTERN.match(room):
        raise InvalidMessage('"room" must be 1-64 characters of A-Z a-z 0-9 _ . : -')
    if not isinstance(name, str) or not 0 < len(name.strip()) <= 80 or not name.isprintable():
        raise InvalidMessage('"name" must be 1-80 printable characters')
    if role not in (Role.PATIENT, Role.CLINICIAN):
        raise InvalidMessage('"role" must be "patient" or "clinician"')
    if await request.app[WORKFLOW_KEY].service.store.get(CONSULTATION, room) is not None:
        raise Forbidden(f'room "{room}" is a consultation\'s room; a demo token may not join it')
    token = request.app[TOKENS_KEY].mint(room, Role(role), name.strip(), ttl_s=4 * 3600, demo=True)
    return web.json_response({"token": token})


#: Pre-call test tokens: how many a client address may mint a minute, and how long one is valid
#: for joining (the test itself takes about 10 s, 20 s more with a relay-only run).
PRECALL_TOKENS_PER_IP_PER_MIN = 20
PRECALL_TOKEN_TTL_S = 120
#: The prefix of the pre-call test's private rooms (the rest is random: nobody else can join).
PRECALL_ROOM_PREFIX = "precall-"
PRECALL_LIMITER_KEY = web.AppKey("precall_limiter", ReportLimiter)


async def precall_token(request: web.Request) -> web.Response:
    """A short-lived media-only token for the pre-call test: a private throwaway room
    ``precall-<random>`` where the page publishes and subscribes to its own stream. No sign-in
    (a patient tests before having anything else); no workflow identity (a demo token: refused
    by the workflow and every HTTP API); at most :data:`PRECALL_TOKENS_PER_IP_PER_MIN` a minute per
    client address (429 ``rate_limited`` with Retry-After)."""
    config = request.app[CONFIG_KEY]
    ip = client_ip(request.remote, request.headers, networks(config.server.trusted_proxies))
    wait = request.app[PRECALL_LIMITER_KEY].acquire(ip or "?", time.monotonic())
    if wait is not None:
        raise RateLimited(f"too many pre-call tests from this address (at most {PRECALL_TOKENS_PER_IP_PER_MIN} "
                          f"a minute); retry in {wait:.0f} s", retry_after_s=max(1, int(wait + 0.999)))
    room = PRECALL_ROOM_PREFIX + secrets.token_urlsafe(12)
    token = request.app[TOKENS_KEY].mint(room, Role.PATIENT, "Pre-call test", ttl_s=PRECALL_TOKEN_TTL_S, demo=True)
    return web.json_response({"token": token, "room": room, "expires_in_s": PRECALL_TOKEN_TTL_S}, status=201)


async def precall_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "test.html")


async def metrics(request: web.Request) -> web.Response:
    body, content_type = prom.render()
    worker = request.app.get(WORKER_KEY)
    if worker is not None:  # serve --workers: every worker's series, labelled (signalling/worker.py)
        body = await worker.host_metrics(own=body)
    response = web.Response(body=body)
    response.content_type = content_type.split(";")[0]
    return response


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def inspector(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "inspector.html")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/inspector", inspector)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/api/admin/drain", admin_drain)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/sessions", sessions)
    app.router.add_get("/api/sessions/{session_id}/events", session_events)
    app.router.add_get("/api/sessions/{session_id}/quality", session_quality)
    app.router.add_get("/api/sessions/{session_id}/summary", session_summary)
    app.router.add_get("/api/sessions/{session_id}/diagnosis", session_diagnosis)
    app.router.add_post("/api/demo/token", demo_token)
    app.router.add_post("/api/client-events", client_events)
    app[PRECALL_LIMITER_KEY] = ReportLimiter(PRECALL_TOKENS_PER_IP_PER_MIN)
    app.router.add_post("/api/precall/token", precall_token)
    app.router.add_get("/test", precall_page)
    app.router.add_static("/static/", STATIC_DIR)
