"""The staff HTTP API (JSON) for people and integrations: waiting rooms, booking and cancelling
consultations with their join links, guests added to a consultation, a department's consultations
and queues.

Every request carries ``Authorization: Bearer <JWT>`` with a staff role (clinician, department
admin, organisation admin, support, admin) and, for department-scoped roles, a ``departments``
claim. The permission table in :mod:`rooms.permissions` decides; a refused request gets 403
``forbidden`` and changes nothing. Errors are mapped to statuses by ``signalling.api.coded_errors``.
Described in ``docs/openapi.yaml``.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Final

from aiohttp import web

from metrics.events import token_preview
from rooms.consultation import Consultation
from rooms.model import Role, SessionId
from rooms.permissions import Action, Actor
from rooms.service import CONSULTATION, ROOM, Result
from rooms.waiting_room import State as QState
from rooms.waiting_room import WaitingRoom
from signalling.api import bearer_claims, json_body
from signalling.auth import NAME_MAX, ROOM_PATTERN
from signalling.errors import (
    Forbidden,
    InvalidInput,
    InvalidMessage,
    InvalidState,
    NotFound,
    RateLimited,
)
from signalling.keys import CONFIG_KEY, TOKENS_KEY, WORKFLOW_KEY
from signalling.workflow import (
    MEDIA_TOKEN_TTL_S,
    SYSTEM,
    WALK_IN_NAME,
    actor_of,
    announcement_json,
    consultation_json,
    now_ms,
    queue_entry_json,
    queued_json,
)

STAFF_ROLES: Final = (Role.CLINICIAN, Role.DEPARTMENT_ADMIN, Role.ORGANISATION_ADMIN, Role.SUPPORT, Role.ADMIN)
JOB_ROLES: Final = (Role.ORGANISATION_ADMIN, Role.ADMIN)
#: The ``sub`` of a walk-in link: shared by everyone who uses it; each walk-in gets its own patient ref.
WALK_IN_SUB: Final = "walk-in"
REF_MAX: Final = 128


def staff(request: web.Request) -> Actor:
    return actor_of(bearer_claims(request, STAFF_ROLES))


async def _optional_body(request: web.Request) -> dict[str, Any]:
    """The JSON body, or {} when the request has none."""
    if not request.can_read_body:
        return {}
    return await json_body(request)


def _int(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidMessage(f'"{key}" must be an integer of {low}-{high}')
    return value


def _text(body: dict[str, Any], key: str, *, required: bool = True, max_len: int = REF_MAX,
          pattern: bool = False) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 0 < len(value.strip()) <= max_len:
        raise InvalidMessage(f'"{key}" must be a string of 1-{max_len} characters')
    if pattern and not ROOM_PATTERN.match(value):
        raise InvalidMessage(f'"{key}" must be 1-64 characters of A-Z a-z 0-9 _ . : -')
    return value


def _appointment_ms(body: dict[str, Any]) -> int:
    """``appointment`` (ISO 8601 with a time zone) or ``appointment_ms`` (UTC ms)."""
    if ("appointment" in body) == ("appointment_ms" in body):
        raise InvalidMessage('give exactly one of "appointment" (ISO 8601) and "appointment_ms"')
    if "appointment_ms" in body:
        value = body["appointment_ms"]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
            raise InvalidMessage('"appointment_ms" must be a non-negative integer')
        return value
    raw = body["appointment"]
    try:
        when = datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise InvalidMessage('"appointment" must be an ISO 8601 time with a time zone, e.g. 2026-11-21T09:15:00Z')
    return int(when.timestamp() * 1000)


def _room_json(room: WaitingRoom) -> dict[str, Any]:
    return {"room_id": room.room_id, "name": room.name, "department": room.department,
            "clinician": room.clinician, "waiting": len(room.waiting)}


# --- waiting rooms ----------------------------------------------------------------------------


async def create_waiting_room(request: web.Request) -> web.Response:
    actor = staff(request)
    body = await json_body(request)
    room_id = _text(body, "room_id", pattern=True)
    name = _text(body, "name", max_len=NAME_MAX)
    department = _text(body, "department", pattern=True)
    clinician = _text(body, "clinician", required=False)
    assert room_id and name and department
    workflow = request.app[WORKFLOW_KEY]
    room = await workflow.record(await workflow.service.create_waiting_room(
        actor, room_id=room_id, name=name, department=department, clinician=clinician, now_ms=now_ms()))
    return web.json_response({"waiting_room": _room_json(room)}, status=201)


async def room_queue(request: web.Request) -> web.Response:
    actor = staff(request)
    workflow = request.app[WORKFLOW_KEY]
    room_id = request.match_info["room_id"]
    room = await workflow.service.waiting_room(actor, room_id)
    now = now_ms()
    queue = await workflow.service.queue(actor, room_id, now_ms=now)
    announcements = await workflow.service.announcements(actor, room_id, now_ms=now)
    return web.json_response({"waiting_room": _room_json(room), "queue": [queued_json(q) for q in queue],
                              "announcements": [announcement_json(a) for a in announcements]})


async def post_announcement(request: web.Request) -> web.Response:
    actor = staff(request)
    body = await json_body(request)
    text = _text(body, "text", max_len=500)
    expires_in_s = body.get("expires_in_s", 3600)
    if not isinstance(expires_in_s, int) or isinstance(expires_in_s, bool) or not 1 <= expires_in_s <= 2_592_000:
        raise InvalidMessage('"expires_in_s" must be an integer of 1-2592000 seconds')
    assert text
    ann = await request.app[WORKFLOW_KEY].announce(actor, request.match_info["room_id"], text, expires_in_s)
    return web.json_response({"announcement": announcement_json(ann)}, status=201)


async def withdraw_announcement(request: web.Request) -> web.Response:
    ann = await request.app[WORKFLOW_KEY].withdraw(staff(request), request.match_info["room_id"],
                                                   request.match_info["announcement_id"])
    return web.json_response({"announcement": announcement_json(ann)})


async def remove_from_queue(request: web.Request) -> web.Response:
    """Staff take a waiting patient out of this room's queue (removed by staff)."""
    actor = staff(request)
    workflow = request.app[WORKFLOW_KEY]
    room_id, sid = request.match_info["room_id"], SessionId(request.match_info["session_id"])
    await workflow.service.waiting_room(actor, room_id)
    qe = await workflow.service.queue_entry(actor, sid)
    if qe.state is QState.WAITING and qe.room_id != room_id:
        raise NotFound(f'session "{sid}" is not waiting in "{room_id}"')
    qe = await workflow.remove(actor, sid)
    return web.json_response({"queue_entry": queue_entry_json(qe)})


async def walk_in_link(request: web.Request) -> web.Response:
    """A link patients use to walk in to this room without a booking (e.g. published for walk-in
    hours). One link serves everyone; ``valid_for_min`` defaults to workflow.walk_in_link_valid_min."""
    actor = staff(request)
    body = await _optional_body(request)
    workflow = request.app[WORKFLOW_KEY]
    room = await workflow.service.waiting_room(actor, request.match_info["room_id"])
    workflow.service.authorize(actor, Action.INVITE, room.department)
    settings = request.app[CONFIG_KEY].workflow
    valid_min = _int(body, "valid_for_min", settings.walk_in_link_valid_min, 1, 30 * 24 * 60)
    nbf = now_ms() // 1000
    exp = nbf + valid_min * 60
    token = request.app[TOKENS_KEY].mint(room.room_id, Role.PATIENT, "Walk-in patient", sub=WALK_IN_SUB,
                                         not_before=nbf, expires=exp, waiting_room=room.room_id)
    await workflow.record(Result(None, (workflow.walk_in_link_issued(actor, room.room_id, room.name,
                                                                      token_preview(token), exp * 1000),)))
    return web.json_response({"waiting_room": room.room_id, "walk_in_link": f"{_base(request)}/#walk_in={token}",
                              "walk_in_token": token, "valid_from_ms": nbf * 1000, "valid_until_ms": exp * 1000},
                             status=201)


async def walk_in(request: web.Request) -> web.Response:
    """A patient arrives with a walk-in link (Bearer): a consultation without a booking is created
    and the patient queues at once; the answer carries their own token for its media room."""
    claims = bearer_claims(request, (Role.PATIENT,))
    if claims.waiting_room is None or claims.consultation is not None or claims.sub != WALK_IN_SUB:
        raise Forbidden("this token is not a walk-in link")
    body = await _optional_body(request)
    given = _text(body, "name", required=False, max_len=NAME_MAX)
    name = given.strip() if given else None
    workflow = request.app[WORKFLOW_KEY]
    link_token = request.headers["Authorization"][len("Bearer "):].strip()
    wait_s = await workflow.walk_in_wait(link_token)  # counted across the cluster
    if wait_s is not None:
        retry = max(1, math.ceil(wait_s))
        limit = workflow.walk_in_limiter.per_minute
        raise RateLimited(f"this walk-in link was used {limit} times in the last minute; try again in {retry} s",
                          retry_after_s=retry)
    c, qe = await workflow.walk_in(claims.waiting_room, name)
    sid = c.session_id
    token = request.app[TOKENS_KEY].mint(sid, Role.PATIENT, name or WALK_IN_NAME, sub=c.patient_ref,
                                         ttl_s=MEDIA_TOKEN_TTL_S, consultation=sid, waiting_room=claims.waiting_room)
    return web.json_response({
        "consultation": consultation_json(c), "queue_entry": queue_entry_json(qe),
        "position": await workflow.service.position(SYSTEM, sid),
        "patient_token": token, "patient_link": f"{_base(request)}/#token={token}",
    }, status=201)


# --- consultations ----------------------------------------------------------------------------


async def create_consultation(request: web.Request) -> web.Response:
    """Book and invite: returns the consultation and the patient's and clinician's join links."""
    actor = staff(request)
    body = await json_body(request)
    department = _text(body, "department", pattern=True)
    room_id = _text(body, "waiting_room", pattern=True)
    patient_ref = _text(body, "patient_ref")
    given_name = _text(body, "patient_name", required=False, max_len=NAME_MAX)
    patient_name = given_name.strip() if given_name else "Patient"
    clinician = _text(body, "clinician", required=False)
    clinician_name = _text(body, "clinician_name", required=False, max_len=NAME_MAX) or (clinician or "")[:NAME_MAX]
    appointment = _appointment_ms(body)
    assert department and room_id and patient_ref
    workflow = request.app[WORKFLOW_KEY]
    service = workflow.service
    # Check the waiting room before anything is written: a refused booking changes nothing.
    room = await service.waiting_room(actor, room_id)
    if room.department != department:
        raise InvalidInput(f'waiting room "{room_id}" belongs to department "{room.department}", not "{department}"')
    now = now_ms()
    booked = await workflow.record(await service.book(actor, department=department, clinician=clinician,
                                                      patient_ref=patient_ref, appointment_ms=appointment, now_ms=now,
                                                      patient_name=given_name))
    c = await workflow.record(await service.invite(actor, booked.session_id, now_ms=now))
    out = _patient_link(request, c, room_id, patient_name)
    out.update(clinician_link=None, clinician_token=None)
    if clinician is not None:
        nbf, exp = out["links_valid_from_ms"] // 1000, out["links_valid_until_ms"] // 1000
        clinician_token = request.app[TOKENS_KEY].mint(
            c.session_id, Role.CLINICIAN, clinician_name, sub=clinician, not_before=nbf, expires=exp,
            departments=(department,), consultation=c.session_id)
        out.update(clinician_link=f"{_base(request)}/#token={clinician_token}", clinician_token=clinician_token)
    return web.json_response(out, status=201)


def _base(request: web.Request) -> str:
    return request.app[CONFIG_KEY].workflow.public_url.rstrip("/") or str(request.url.origin())


def _patient_link(request: web.Request, c: Consultation, room_id: str, patient_name: str) -> dict[str, Any]:
    """The patient's join link for an invited consultation: valid around the appointment."""
    if c.appointment_ms is None:
        raise InvalidState("a walk-in consultation has no join link")
    settings = request.app[CONFIG_KEY].workflow
    nbf = (c.appointment_ms - settings.link_valid_before_min * 60_000) // 1000
    exp = (c.appointment_ms + settings.link_valid_after_min * 60_000) // 1000
    sid = c.session_id
    patient_token = request.app[TOKENS_KEY].mint(
        sid, Role.PATIENT, patient_name, sub=c.patient_ref, not_before=nbf, expires=exp,
        consultation=sid, waiting_room=room_id, link=c.link_token or "")
    return {
        "consultation": consultation_json(c), "waiting_room": room_id,
        "links_valid_from_ms": nbf * 1000, "links_valid_until_ms": exp * 1000,
        "patient_link": f"{_base(request)}/#token={patient_token}", "patient_token": patient_token,
    }


async def resend_link(request: web.Request) -> web.Response:
    """A new join link for the patient (the old one stops working at the waiting room door):
    the consultation must be booked or invited, not yet ready or over."""
    actor = staff(request)
    body = await _optional_body(request)
    workflow = request.app[WORKFLOW_KEY]
    service = workflow.service
    sid = SessionId(request.match_info["session_id"])
    c = await service.consultation(actor, sid)
    service.authorize(actor, Action.INVITE, c.department)  # refused before the body is looked at
    room_id = _text(body, "waiting_room", required=False, pattern=True)
    if room_id is None:
        segments = (await service.queue_entry(actor, sid)).segments
        if not segments:
            raise InvalidMessage('"waiting_room" is required: the patient has not been in a waiting room yet')
        room_id = segments[-1].room_id
    patient_name = _text(body, "patient_name", required=False, max_len=NAME_MAX) or c.patient_name or "Patient"
    room = await service.waiting_room(actor, room_id)
    if room.department != c.department:
        raise InvalidInput(f'waiting room "{room_id}" belongs to department "{room.department}", not "{c.department}"')
    if c.appointment_ms is None:
        raise InvalidState("a walk-in consultation has no join link to resend")
    c = await workflow.record(await service.invite(actor, sid, now_ms=now_ms()))
    return web.json_response(_patient_link(request, c, room_id, patient_name), status=201)


async def invite_guest(request: web.Request) -> web.Response:
    """Add a guest (a relative, an interpreter) to the consultation: their own link, role
    ``guest``, for the consultation's call, valid in its window."""
    actor = staff(request)
    body = await json_body(request)
    name = _text(body, "name", max_len=NAME_MAX)
    assert name
    out = await request.app[WORKFLOW_KEY].invite_guest(actor, request.match_info["session_id"], name)
    if not out["guest_link"].startswith("http"):
        out["guest_link"] = f"{_base(request)}{out['guest_link']}"
    return web.json_response(out, status=201)


async def remove_guest(request: web.Request) -> web.Response:
    """Revoke a guest's link; a guest in the call is taken out of it (``forceDisconnected``)."""
    out = await request.app[WORKFLOW_KEY].remove_guest(staff(request), request.match_info["session_id"],
                                                       request.match_info["guest_id"])
    return web.json_response(out)


async def journal(request: web.Request) -> web.Response:
    c = await request.app[WORKFLOW_KEY].step(staff(request), request.match_info["session_id"], "journal")
    return web.json_response({"consultation": consultation_json(c)})


async def get_consultation(request: web.Request) -> web.Response:
    actor = staff(request)
    service = request.app[WORKFLOW_KEY].service
    sid = SessionId(request.match_info["session_id"])
    c = await service.consultation(actor, sid)
    qe = await service.queue_entry(actor, sid)
    return web.json_response({"consultation": consultation_json(c), "queue_entry": queue_entry_json(qe)})


async def cancel_consultation(request: web.Request) -> web.Response:
    c = await request.app[WORKFLOW_KEY].stop(staff(request), request.match_info["session_id"], "cancel")
    return web.json_response({"consultation": consultation_json(c)})


async def no_show(request: web.Request) -> web.Response:
    c = await request.app[WORKFLOW_KEY].stop(staff(request), request.match_info["session_id"], "no_show")
    return web.json_response({"consultation": consultation_json(c)})


# --- a department's view ----------------------------------------------------------------------


async def department_consultations(request: web.Request) -> web.Response:
    """The department's consultations, by appointment time; ``?state=`` filters."""
    actor = staff(request)
    department = request.match_info["department"]
    service = request.app[WORKFLOW_KEY].service
    service.authorize(actor, Action.VIEW_CONSULTATION, department)
    state = request.query.get("state")
    found: list[Consultation] = []
    for key in await service.store.keys(CONSULTATION):
        doc = await service.store.get(CONSULTATION, key)
        if doc is None or doc.body.get("department") != department:
            continue
        c = Consultation.from_doc(doc.body)
        if state is None or c.state.value == state:
            found.append(c)
    found.sort(key=lambda c: (c.appointment_ms is None, c.appointment_ms or c.booked_ms, c.session_id))
    return web.json_response({"department": department, "consultations": [consultation_json(c) for c in found]})


async def department_queue(request: web.Request) -> web.Response:
    """Every waiting room of the department with its live queue."""
    actor = staff(request)
    department = request.match_info["department"]
    service = request.app[WORKFLOW_KEY].service
    service.authorize(actor, Action.VIEW_QUEUE, department)
    now = now_ms()
    rooms = []
    for key in sorted(await service.store.keys(ROOM)):
        doc = await service.store.get(ROOM, key)
        if doc is None or doc.body.get("department") != department:
            continue
        room = WaitingRoom.from_doc(doc.body)
        queue = await service.queue(SYSTEM, room.room_id, now_ms=now)
        rooms.append({"waiting_room": _room_json(room), "queue": [queued_json(q) for q in queue]})
    return web.json_response({"department": department, "waiting_rooms": rooms})


async def retention_job(request: web.Request) -> web.Response:
    """The chat retention sweep: policy, schedule and run history (organisation admins)."""
    bearer_claims(request, JOB_ROLES)
    job = request.app[WORKFLOW_KEY].retention
    assert job is not None
    return web.json_response(job.status())


def add_staff_routes(app: web.Application) -> None:
    app.router.add_post("/api/waiting-rooms", create_waiting_room)
    app.router.add_get("/api/waiting-rooms/{room_id}/queue", room_queue)
    app.router.add_post("/api/waiting-rooms/{room_id}/announcements", post_announcement)
    app.router.add_delete("/api/waiting-rooms/{room_id}/announcements/{announcement_id}", withdraw_announcement)
    app.router.add_post("/api/waiting-rooms/{room_id}/queue/{session_id}/remove", remove_from_queue)
    app.router.add_post("/api/waiting-rooms/{room_id}/walk-in-link", walk_in_link)
    app.router.add_post("/api/walk-in", walk_in)
    app.router.add_post("/api/consultations", create_consultation)
    app.router.add_get("/api/consultations/{session_id}", get_consultation)
    app.router.add_post("/api/consultations/{session_id}/cancel", cancel_consultation)
    app.router.add_post("/api/consultations/{session_id}/no-show", no_show)
    app.router.add_post("/api/consultations/{session_id}/journal", journal)
    app.router.add_post("/api/consultations/{session_id}/resend-link", resend_link)
    app.router.add_post("/api/consultations/{session_id}/guests", invite_guest)
    app.router.add_delete("/api/consultations/{session_id}/guests/{guest_id}", remove_guest)
    app.router.add_get("/api/departments/{department}/consultations", department_consultations)
    app.router.add_get("/api/departments/{department}/queue", department_queue)
    app.router.add_get("/api/jobs/retention", retention_job)
