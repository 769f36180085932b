"""Shared actors and set-up steps for the workflow tests (two departments, a few people)."""

from __future__ import annotations

from rooms.model import Role, SessionId
from rooms.permissions import Actor
from rooms.service import WorkflowService

T0 = 1_656_494_100_000  # 2022-06-29 09:15:00 UTC
MIN = 60_000

CARDIO, DERMA = "cardiology", "dermatology"
CLIN = Actor(Role.CLINICIAN, "dr_hansen", frozenset({CARDIO}))
CLIN2 = Actor(Role.CLINICIAN, "dr_berg", frozenset({CARDIO}))
CLIN_OTHER = Actor(Role.CLINICIAN, "dr_other", frozenset({DERMA}))
DEPT_ADMIN = Actor(Role.DEPARTMENT_ADMIN, "da_cardio", frozenset({CARDIO}))
DEPT_ADMIN_OTHER = Actor(Role.DEPARTMENT_ADMIN, "da_derma", frozenset({DERMA}))
ORG_ADMIN = Actor(Role.ORGANISATION_ADMIN, "org")
SUPPORT = Actor(Role.SUPPORT, "support1")
PAT = Actor(Role.PATIENT, "p1")
PAT2 = Actor(Role.PATIENT, "p2")


async def rooms(svc: WorkflowService) -> None:
    await svc.create_waiting_room(ORG_ADMIN, room_id="cardio", name="Cardiology", department=CARDIO, now_ms=T0)
    await svc.create_waiting_room(ORG_ADMIN, room_id="cardio2", name="Cardiology 2", department=CARDIO, now_ms=T0)
    await svc.create_waiting_room(ORG_ADMIN, room_id="derma", name="Dermatology", department=DERMA, now_ms=T0)
    await svc.create_waiting_room(
        ORG_ADMIN, room_id="q_hansen", name="Dr Hansen", department=CARDIO, clinician="dr_hansen", now_ms=T0
    )


async def ready(svc: WorkflowService, patient: str = "p1", appointment_ms: int = T0, dept: str = CARDIO) -> SessionId:
    """A consultation booked, invited and with its patient ready."""
    c = (await svc.book(CLIN if dept == CARDIO else CLIN_OTHER, department=dept, clinician=None,
                        patient_ref=patient, appointment_ms=appointment_ms, now_ms=T0 - 60 * MIN)).value
    c = (await svc.invite(ORG_ADMIN, c.session_id, now_ms=T0 - 50 * MIN)).value
    assert c.link_token is not None
    await svc.patient_ready(Actor(Role.PATIENT, patient), c.session_id, token=c.link_token,
                            device_check_passed=True, now_ms=appointment_ms - 2 * MIN)
    return c.session_id


async def waiting(svc: WorkflowService, patient: str = "p1", room: str = "cardio", dept: str = CARDIO) -> SessionId:
    sid = await ready(svc, patient, dept=dept)
    await svc.enter_waiting_room(Actor(Role.PATIENT, patient), sid, room_id=room, now_ms=T0 - MIN)
    return sid


def patient_of(channel_id: str, patient: str = "p1") -> Actor:
    """The patient with a token for the consultation whose chat is ``channel_id`` (chat is bound to it)."""
    return Actor(Role.PATIENT, patient, consultation=channel_id.removeprefix("consultation:"))
