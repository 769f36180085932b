"""Who may do what: one permission table, role × action → scope.

Scopes: ``none``; ``own`` (a patient acting on their own consultation, queue place, chat; where
the resource belongs to one consultation — a consultation's chat — the patient's token must also
have been issued for that consultation, so a patient reference and a session id are not enough);
``department`` (the resource's department must be one of the actor's — only while the
organisation has strict department separation on; with it off, staff see the whole organisation);
``all``. Organisation admins see everything; support sees inspector data, queues and consultation
metadata but never chat content. Clinical acts (admit, end, complete, journal, phone fallback) are
clinicians' only. ``Role.ADMIN`` (the generic admin of the skeleton) is an organisation admin.
``Role.GUEST`` (a relative or an interpreter added by link) has no scope for any action: a guest
joins the consultation's media room (``signalling.hub`` checks the guest link at join) and reads
nothing of the workflow. Adding and removing guests are staff acts, like sending the join link.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from rooms.errors import Forbidden
from rooms.model import Role


class Action(StrEnum):
    BOOK = "book"
    INVITE = "invite"
    CANCEL = "cancel"
    PATIENT_READY = "patient_ready"
    ENTER_WAITING_ROOM = "enter_waiting_room"
    ABANDON = "abandon"
    VIEW_QUEUE = "view_queue"
    ADMIT = "admit"
    TRANSFER = "transfer"
    REMOVE_FROM_QUEUE = "remove_from_queue"
    END = "end"
    COMPLETE = "complete"
    JOURNAL = "journal"
    PHONE_FALLBACK = "phone_fallback"
    MARK_NO_SHOW = "mark_no_show"
    VIEW_CONSULTATION = "view_consultation"
    SEND_CHAT = "send_chat"
    READ_CHAT = "read_chat"
    POST_ANNOUNCEMENT = "post_announcement"
    VIEW_ANNOUNCEMENTS = "view_announcements"
    MANAGE_WAITING_ROOMS = "manage_waiting_rooms"
    VIEW_INSPECTOR = "view_inspector"
    PURGE_CHAT = "purge_chat"
    INVITE_GUEST = "invite_guest"
    REMOVE_GUEST = "remove_guest"


class Scope(StrEnum):
    NONE = "none"
    OWN = "own"
    DEPARTMENT = "department"
    ALL = "all"


N, O, D, A = Scope.NONE, Scope.OWN, Scope.DEPARTMENT, Scope.ALL

_COLUMNS: Final = (Role.PATIENT, Role.CLINICIAN, Role.DEPARTMENT_ADMIN, Role.ORGANISATION_ADMIN, Role.SUPPORT)
# One row per action; columns: patient, clinician, department admin, organisation admin, support.
_ROWS: Final[Mapping[Action, tuple[Scope, Scope, Scope, Scope, Scope]]] = {
    Action.BOOK:                 (N, D, D, A, N),
    Action.INVITE:               (N, D, D, A, N),
    Action.CANCEL:               (O, D, D, A, N),
    Action.PATIENT_READY:        (O, N, N, N, N),
    Action.ENTER_WAITING_ROOM:   (O, D, D, A, N),
    Action.ABANDON:              (O, N, N, N, N),
    Action.VIEW_QUEUE:           (N, D, D, A, A),
    Action.ADMIT:                (N, D, N, N, N),
    Action.TRANSFER:             (N, D, D, A, N),
    Action.REMOVE_FROM_QUEUE:    (N, D, D, A, N),
    Action.END:                  (N, D, N, N, N),
    Action.COMPLETE:             (N, D, N, N, N),
    Action.JOURNAL:              (N, D, N, N, N),
    Action.PHONE_FALLBACK:       (N, D, N, N, N),
    Action.MARK_NO_SHOW:         (N, D, D, A, N),
    Action.VIEW_CONSULTATION:    (O, D, D, A, A),
    Action.SEND_CHAT:            (O, D, N, N, N),
    Action.READ_CHAT:            (O, D, D, A, N),
    Action.POST_ANNOUNCEMENT:    (N, D, D, A, N),
    Action.VIEW_ANNOUNCEMENTS:   (O, D, D, A, A),
    Action.MANAGE_WAITING_ROOMS: (N, N, D, A, N),
    Action.VIEW_INSPECTOR:       (N, D, D, A, A),
    Action.PURGE_CHAT:           (N, N, N, A, N),
    Action.INVITE_GUEST:         (N, D, D, A, N),
    Action.REMOVE_GUEST:         (N, D, D, A, N),
}  # fmt: skip


def _by_role() -> dict[Role, Mapping[Action, Scope]]:
    table: dict[Role, Mapping[Action, Scope]] = {
        role: {action: row[i] for action, row in _ROWS.items()} for i, role in enumerate(_COLUMNS)
    }
    table[Role.ADMIN] = table[Role.ORGANISATION_ADMIN]
    table[Role.GUEST] = {action: N for action in Action}
    return table


PERMISSIONS: Final[Mapping[Role, Mapping[Action, Scope]]] = _by_role()


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is asking: a role, a user id and the departments the user belongs to."""

    role: Role
    user_id: str
    departments: frozenset[str] = field(default_factory=frozenset)
    #: The consultation the actor's token was issued for (a patient's join link), if any.
    consultation: str | None = None


@dataclass(frozen=True, slots=True)
class Resource:
    """What is acted on: its department, and the patient it belongs to (if any)."""

    department: str
    patient_ref: str | None = None
    #: The one consultation the resource belongs to (a consultation's chat), if it is bound to one.
    session_id: str | None = None


def scope(role: Role, action: Action) -> Scope:
    return PERMISSIONS[role][action]


def allowed(actor: Actor, action: Action, resource: Resource, strict_departments: bool) -> bool:
    granted = scope(actor.role, action)
    if granted is Scope.ALL:
        return True
    if granted is Scope.OWN:
        return (resource.patient_ref is not None and resource.patient_ref == actor.user_id
                and (resource.session_id is None or resource.session_id == actor.consultation))
    if granted is Scope.DEPARTMENT:
        return not strict_departments or resource.department in actor.departments
    return False


def check(actor: Actor, action: Action, resource: Resource, strict_departments: bool) -> None:
    """Raise :class:`Forbidden` unless ``actor`` may do ``action`` on ``resource``."""
    if not allowed(actor, action, resource, strict_departments):
        raise Forbidden(
            f'{actor.role.value} "{actor.user_id}" may not {action.value} '
            f'in department "{resource.department}"'
        )
