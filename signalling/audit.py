"""Audit at the edge: every staff look-up is a LookUp entry, every staff sign-in a Login entry,
both committed to the audit log (``metrics.audit``) before the reply goes out.

Route handlers call :func:`audit_lookup` once, after ``bearer_claims`` accepted the token and
before they answer: ``await audit_lookup(request, claims, "session", session_id)``.

What counts as a sign-in: OpenConsult has no password form; a staff member signs in by using the
token their identity provider (or ``openconsult token``) gave them. So a staff token's first
request to this node is a sign-in, and so is its first request after it went unused for
``audit.sign_in_window_min`` minutes — over HTTP (any route that accepts the token) or as a
WebSocket ``join`` (a clinician's desk). Tokens are told apart by a SHA-256 digest (the token itself
is not kept); the table of digests is bounded and per node (after a restart, or on another node,
the next request signs in again — an extra Login entry, never a missing one). Patient tokens are
not staff: their use is logged in the session's event log, not here.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from metrics.audit import AuditEntry, AuditKind, AuditLog
from metrics.events import now_ms
from rooms.model import Role
from signalling.auth import Claims

AUDIT_KEY = web.AppKey("audit", AuditLog)
#: The verified claims of the request's bearer token (set by ``signalling.api.bearer_claims``).
CLAIMS_KEY = web.RequestKey("claims", Claims)
#: The request's bearer token digest, for the sign-in tracker.
TOKEN_DIGEST_KEY = web.RequestKey("token_digest", bytes)
STAFF: Final = frozenset({Role.CLINICIAN, Role.DEPARTMENT_ADMIN, Role.ORGANISATION_ADMIN, Role.SUPPORT, Role.ADMIN})


class SignIns:
    """Which staff tokens were used lately: :meth:`first_use` says whether a use is a sign-in.

    Bounded (``max_tokens`` digests, the least recently used forgotten first); ``clock`` gives
    monotonic seconds."""

    def __init__(self, window_s: float, *, max_tokens: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_tokens = max_tokens
        self.clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def first_use(self, digest: bytes) -> bool:
        now = self.clock()
        last = self._seen.pop(digest, None)
        self._seen[digest] = now
        while len(self._seen) > self.max_tokens:
            self._seen.popitem(last=False)
        return last is None or now - last >= self.window_s


SIGN_INS_KEY = web.AppKey("sign_ins", SignIns)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def client_ip(request: web.Request) -> str:
    """The address the request came from (the peer; see docs/operations.md on proxies)."""
    return request.remote or ""


def _entry(request: web.Request, claims: Claims, kind: AuditKind, what: str, target: str) -> AuditEntry:
    return AuditEntry(time_ms=now_ms(), kind=kind, sub=claims.sub, name=claims.name, role=str(claims.role),
                      what=what, target=target, ip=client_ip(request))


async def sign_in(request: web.Request, claims: Claims) -> None:
    """Write a Login entry if this request is the staff token's sign-in (see the module docstring)."""
    digest = request.get(TOKEN_DIGEST_KEY)
    if digest is None or claims.role not in STAFF or claims.demo:
        return
    if request.app[SIGN_INS_KEY].first_use(digest):
        await request.app[AUDIT_KEY].append(_entry(request, claims, AuditKind.LOGIN, "sign-in", ""))


async def join_sign_in(request: web.Request, claims: Claims, token: str) -> None:
    """A staff token joining over the WebSocket signs in the same way as over HTTP (the clinician's
    desk and calls): called once the join succeeded, before its reply."""
    if claims.role in STAFF and not claims.demo and request.app[SIGN_INS_KEY].first_use(token_digest(token)):
        await request.app[AUDIT_KEY].append(_entry(request, claims, AuditKind.LOGIN, "sign-in", ""))


async def audit_lookup(request: web.Request, claims: Claims, what: str, target: str) -> None:
    """Record one staff look-up (``what``: ``session``, ``patient`` or ``query``; ``target``: the
    session id, patient reference or query), committed before this returns. A sign-in by the same
    request is written first."""
    await sign_in(request, claims)
    await request.app[AUDIT_KEY].append(_entry(request, claims, AuditKind.LOOKUP, what, target))


@web.middleware
async def staff_sign_ins(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request whose bearer token was accepted as a staff token may be a sign-in: recorded
    (committed) before the reply, whatever the handler answered."""
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        raise  # the client went away: nothing is answered
    except BaseException:
        await _signed_in(request)
        raise
    await _signed_in(request)
    return response


async def _signed_in(request: web.Request) -> None:
    claims = request.get(CLAIMS_KEY)
    if claims is not None:
        await sign_in(request, claims)
