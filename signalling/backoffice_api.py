"""The back-office log over HTTP: search across sessions and its CSV download, plus its page.

``GET /api/backoffice/log`` and ``GET /api/backoffice/log.csv`` take the same filters — a date
range (``since_ms``/``until_ms``, UTC ms), ``type`` (repeatable or comma-separated: Consultation,
VideoSession, Queue, CallEnded, Login, LookUp, PatientToDoctorCall, DoctorToPatientCall, Chat,
Error; default all), ``q`` (free text: names, patient references, session ids) — and page with
``limit``/``offset`` (bounded). The CSV holds the same rows as the search with the same
parameters (``limit`` up to 100 000 there), its cells safe from formula injection.

Who sees what (rooms/permissions.py): support, admins and organisation admins see every entry;
department admins see the entries of their departments' consultations and waiting rooms only,
while the organisation keeps departments strictly separate, and never the audit entries (Login,
LookUp), which are the organisation's. Chat entries never carry message text; for support any
content key is also removed from the payload. Every search and every download is itself a LookUp
in the audit log (committed before the reply).
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from aiohttp import web

from metrics.audit import (
    CSV_ROWS_MAX,
    SEARCH_LIMIT_MAX,
    SEARCH_OFFSET_MAX,
    LogQuery,
    LogType,
    search,
    to_csv,
)
from metrics.eventlog import EventLog
from rooms.model import Role
from rooms.service import CONSULTATION, ROOM
from signalling.api import STATIC_DIR, TIME_MS_MAX, _int_query, bearer_claims
from signalling.audit import AUDIT_KEY, audit_lookup
from signalling.auth import Claims
from signalling.errors import Forbidden, InvalidMessage
from signalling.keys import CONFIG_KEY, EVENTLOG_KEY, WORKFLOW_KEY

BACKOFFICE_ROLES: Final = (Role.SUPPORT, Role.ADMIN, Role.ORGANISATION_ADMIN, Role.DEPARTMENT_ADMIN)
DEFAULT_DAYS: Final = 7
DEFAULT_LIMIT: Final = 100
Q_MAX: Final = 200


def _types(request: web.Request) -> frozenset[LogType]:
    values = [v.strip() for raw in request.query.getall("type", []) for v in raw.split(",") if v.strip()]
    if not values:
        return frozenset(LogType)
    known = {str(t): t for t in LogType}
    wrong = [v for v in values if v not in known]
    if wrong:
        raise InvalidMessage(f'query parameter "type": {ascii(wrong[0][:40])} is not one of {", ".join(known)}')
    return frozenset(known[v] for v in values)


async def _department_sessions(request: web.Request, claims: Claims) -> frozenset[str]:
    """The session ids a department admin may see: their departments' consultations and rooms."""
    store = request.app[WORKFLOW_KEY].service.store
    departments = set(claims.departments)
    sessions: set[str] = set()
    for kind, prefix in ((CONSULTATION, ""), (ROOM, "room:")):
        for key in await store.keys(kind):
            doc = await store.get(kind, key)
            if doc is not None and doc.body.get("department") in departments:
                sessions.add(prefix + key)
    return frozenset(sessions)


async def _query(request: web.Request, claims: Claims, limit_max: int, default_limit: int) -> LogQuery:
    now = int(time.time() * 1000)
    since = _int_query(request, "since_ms", 0, TIME_MS_MAX)
    until = _int_query(request, "until_ms", 0, TIME_MS_MAX)
    limit = _int_query(request, "limit", 1, limit_max)
    offset = _int_query(request, "offset", 0, SEARCH_OFFSET_MAX)
    text = request.query.get("q") or None
    if text is not None and (len(text) > Q_MAX or not text.isprintable()):
        raise InvalidMessage(f'query parameter "q" must be 1-{Q_MAX} printable characters')
    sessions: frozenset[str] | None = None
    if claims.role is Role.DEPARTMENT_ADMIN and request.app[CONFIG_KEY].workflow.strict_departments:
        if not claims.departments:
            raise Forbidden("a department admin token needs a departments claim to read the back-office log")
        sessions = await _department_sessions(request, claims)
    return LogQuery(
        since_ms=now - DEFAULT_DAYS * 86_400_000 if since is None else since,
        until_ms=now + 1 if until is None else until,  # up to this request, so pages stay put
        types=_types(request), text=text, limit=default_limit if limit is None else limit,
        offset=offset or 0, sessions=sessions, include_audit=claims.role is not Role.DEPARTMENT_ADMIN,
        hide_chat_content=claims.role is Role.SUPPORT)


def _described(query: LogQuery) -> str:
    """What the audit log records as the query looked up."""
    types = ",".join(sorted(query.types)) if len(query.types) < len(LogType) else "all"
    return (f"backoffice log q={query.text or ''} type={types} since_ms={query.since_ms} "
            f"until_ms={query.until_ms} offset={query.offset} limit={query.limit}")


async def _search(request: web.Request, query: LogQuery) -> list[dict[str, object]]:
    eventlog = request.app[EVENTLOG_KEY]
    await eventlog.flush(timeout=5)  # read what was logged up to this request
    audit_db = request.app[AUDIT_KEY].path
    if isinstance(eventlog, EventLog):
        return list(await asyncio.to_thread(search, eventlog.path, audit_db, query))
    from metrics.eventlog_pg import PgEventLog  # the only other backend ([eventlog] url)

    assert isinstance(eventlog, PgEventLog)
    return list(await asyncio.to_thread(eventlog.backoffice_search, audit_db, query))


async def backoffice_log(request: web.Request) -> web.Response:
    claims = bearer_claims(request, BACKOFFICE_ROLES)
    query = await _query(request, claims, SEARCH_LIMIT_MAX, DEFAULT_LIMIT)
    await audit_lookup(request, claims, "query", _described(query))
    rows = await _search(request, query)
    next_offset = query.offset + len(rows) if len(rows) == query.limit else None
    return web.json_response({"entries": rows, "since_ms": query.since_ms, "until_ms": query.until_ms,
                              "offset": query.offset, "limit": query.limit,
                              "next_offset": next_offset if next_offset is None or next_offset <= SEARCH_OFFSET_MAX
                              else None})


async def backoffice_log_csv(request: web.Request) -> web.Response:
    claims = bearer_claims(request, BACKOFFICE_ROLES)
    query = await _query(request, claims, CSV_ROWS_MAX, CSV_ROWS_MAX)
    await audit_lookup(request, claims, "query", "export " + _described(query))
    rows = await _search(request, query)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return web.Response(text=to_csv(rows), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="openconsult-log-{stamp}.csv"',
                                 "Cache-Control": "no-store"})


async def backoffice_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "backoffice.html")


def add_backoffice_routes(app: web.Application) -> None:
    app.router.add_get("/backoffice", backoffice_page)
    app.router.add_get("/api/backoffice/log", backoffice_log)
    app.router.add_get("/api/backoffice/log.csv", backoffice_log_csv)
