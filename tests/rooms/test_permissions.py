"""The permission matrix: every role × action × same/other department, on the table and the service.

The spec below names, per action, the roles that may do it. Scope follows from the role: a patient
only for their own consultation, clinicians and department admins only in their departments
(strict separation on), organisation admins and support everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rooms import chat
from rooms.errors import Forbidden
from rooms.model import Role, SessionId
from rooms.permissions import PERMISSIONS, Action, Actor, Resource, Scope, allowed
from rooms.service import WorkflowConfig, WorkflowService
from rooms.store import MemoryStore
from tests.rooms.scenario import (
    CARDIO,
    CLIN,
    DERMA,
    MIN,
    T0,
    ready,
    rooms,
    waiting,
)

P, CL, DA, OA, SU = "patient", "clinician", "department_admin", "organisation_admin", "support"
SPEC: dict[Action, set[str]] = {
    Action.BOOK: {CL, DA, OA},
    Action.INVITE: {CL, DA, OA},
    Action.CANCEL: {P, CL, DA, OA},
    Action.PATIENT_READY: {P},
    Action.ENTER_WAITING_ROOM: {P, CL, DA, OA},
    Action.ABANDON: {P},
    Action.VIEW_QUEUE: {CL, DA, OA, SU},
    Action.ADMIT: {CL},
    Action.TRANSFER: {CL, DA, OA},
    Action.REMOVE_FROM_QUEUE: {CL, DA, OA},
    Action.END: {CL},
    Action.COMPLETE: {CL},
    Action.JOURNAL: {CL},
    Action.PHONE_FALLBACK: {CL},
    Action.MARK_NO_SHOW: {CL, DA, OA},
    Action.VIEW_CONSULTATION: {P, CL, DA, OA, SU},
    Action.SEND_CHAT: {P, CL},
    Action.READ_CHAT: {P, CL, DA, OA},
    Action.POST_ANNOUNCEMENT: {CL, DA, OA},
    Action.VIEW_ANNOUNCEMENTS: {P, CL, DA, OA, SU},
    Action.MANAGE_WAITING_ROOMS: {DA, OA},
    Action.VIEW_INSPECTOR: {CL, DA, OA, SU},
    Action.PURGE_CHAT: {OA},
    Action.INVITE_GUEST: {CL, DA, OA},
    Action.REMOVE_GUEST: {CL, DA, OA},
}
ROLES = [Role.PATIENT, Role.CLINICIAN, Role.DEPARTMENT_ADMIN, Role.ORGANISATION_ADMIN, Role.SUPPORT, Role.ADMIN,
         Role.GUEST]


def actor(role: Role, same: bool) -> Actor:
    if role in (Role.PATIENT, Role.GUEST):
        return Actor(role, "p1" if same else "p_other")
    return Actor(role, f"{role.value}_x", frozenset({CARDIO if same else DERMA}))


def expected(role: Role, action: Action, same: bool) -> bool:
    name = Role.ORGANISATION_ADMIN.value if role is Role.ADMIN else role.value
    if name not in SPEC[action]:
        return False
    if role in (Role.PATIENT, Role.CLINICIAN, Role.DEPARTMENT_ADMIN):
        return same
    return True


def test_spec_covers_every_action_and_table_every_role() -> None:
    assert set(SPEC) == set(Action)
    assert set(PERMISSIONS) == set(Role)


@pytest.mark.parametrize("role", ROLES, ids=str)
@pytest.mark.parametrize("action", list(Action), ids=str)
@pytest.mark.parametrize("same", [True, False], ids=["same", "other"])
def test_table(role: Role, action: Action, same: bool) -> None:
    res = Resource(CARDIO, "p1")
    assert allowed(actor(role, same), action, res, strict_departments=True) == expected(role, action, same)


def test_without_strict_separation_staff_see_all_departments() -> None:
    res = Resource(CARDIO, "p1")
    assert allowed(Actor(Role.CLINICIAN, "c", frozenset({DERMA})), Action.VIEW_QUEUE, res, False)
    assert allowed(Actor(Role.DEPARTMENT_ADMIN, "d", frozenset()), Action.READ_CHAT, res, False)
    assert not allowed(Actor(Role.SUPPORT, "s"), Action.READ_CHAT, res, False)
    assert not allowed(Actor(Role.PATIENT, "p2"), Action.VIEW_CONSULTATION, res, False)
    assert PERMISSIONS[Role.PATIENT][Action.VIEW_CONSULTATION] is Scope.OWN


Setup = Callable[[WorkflowService], Awaitable[Callable[[Actor], Awaitable[Any]]]]


async def _booked(svc: WorkflowService) -> SessionId:
    return (await svc.book(CLIN, department=CARDIO, clinician=None, patient_ref="p1", appointment_ms=T0,
                           now_ms=T0 - 60 * MIN)).value.session_id


async def _in_progress(svc: WorkflowService) -> SessionId:
    sid = await waiting(svc)
    await svc.admit(CLIN, sid, now_ms=T0)
    return sid


def _for(actor: Actor, sid: SessionId) -> Actor:
    """The actor with a token issued for consultation ``sid`` (what a patient's link carries)."""
    return dataclasses.replace(actor, consultation=sid) if actor.role in (Role.PATIENT, Role.GUEST) else actor


def _setups() -> dict[Action, Setup]:
    async def book(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        return lambda a: svc.book(a, department=CARDIO, clinician=None, patient_ref="p1", appointment_ms=T0, now_ms=T0)

    async def invite(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        return lambda a: svc.invite(a, sid, now_ms=T0)

    async def cancel(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        return lambda a: svc.cancel(a, sid, now_ms=T0)

    async def patient_ready(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        tok = (await svc.invite(CLIN, sid, now_ms=T0)).value.link_token
        return lambda a: svc.patient_ready(a, sid, token=tok or "", device_check_passed=True, now_ms=T0)

    async def enter(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await ready(svc)
        return lambda a: svc.enter_waiting_room(a, sid, room_id="cardio", now_ms=T0)

    def on_waiting(method: str, **kw: Any) -> Setup:
        async def setup(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
            sid = await waiting(svc)
            return lambda a: getattr(svc, method)(a, sid, now_ms=T0, **kw)
        return setup

    def on_progress(method: str, then: tuple[str, ...] = ()) -> Setup:
        async def setup(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
            sid = await _in_progress(svc)
            for step in then:
                await getattr(svc, step)(CLIN, sid, now_ms=T0 + MIN)
            return lambda a: getattr(svc, method)(a, sid, now_ms=T0 + 2 * MIN)
        return setup

    async def no_show(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        return lambda a: svc.no_show(a, sid, now_ms=T0 + 60 * MIN)

    async def view_consultation(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        return lambda a: svc.consultation(a, sid)

    # A patient's chat access is tied to the consultation their token was issued for.
    async def send_chat(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        return lambda a: svc.send_chat(_for(a, sid), chat.consultation_channel_id(sid), "hello", now_ms=T0)

    async def read_chat(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        await svc.send_chat(CLIN, chat.consultation_channel_id(sid), "hello", now_ms=T0)
        return lambda a: svc.chat_history(_for(a, sid), chat.consultation_channel_id(sid))

    async def queue(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        await waiting(svc)
        return lambda a: svc.queue(a, "cardio", now_ms=T0)

    async def post(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        return lambda a: svc.post_announcement(a, "cardio", text="late", expires_ms=T0 + MIN, now_ms=T0)

    async def view_ann(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        await waiting(svc)
        return lambda a: svc.announcements(a, "cardio", now_ms=T0)

    async def manage(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        return lambda a: svc.create_waiting_room(a, room_id="new", name="New", department=CARDIO, now_ms=T0)

    async def inspector(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        async def run(a: Actor) -> None:
            svc.authorize(a, Action.VIEW_INSPECTOR, CARDIO, "p1")
        return run

    async def purge(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        return lambda a: svc.purge_chat(a, now_ms=T0)

    async def invite_guest(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        return lambda a: svc.invite_guest(_for(a, sid), sid, name="Ida", now_ms=T0)

    async def remove_guest(svc: WorkflowService) -> Callable[[Actor], Awaitable[Any]]:
        sid = await _booked(svc)
        (_, guest) = (await svc.invite_guest(CLIN, sid, name="Ida", now_ms=T0)).value
        return lambda a: svc.remove_guest(_for(a, sid), sid, guest.guest_id, now_ms=T0)

    return {
        Action.BOOK: book,
        Action.INVITE: invite,
        Action.CANCEL: cancel,
        Action.PATIENT_READY: patient_ready,
        Action.ENTER_WAITING_ROOM: enter,
        Action.ABANDON: on_waiting("abandon"),
        Action.VIEW_QUEUE: queue,
        Action.ADMIT: on_waiting("admit"),
        Action.TRANSFER: on_waiting("transfer", to_room_id="cardio2"),
        Action.REMOVE_FROM_QUEUE: on_waiting("remove"),
        Action.END: on_progress("end"),
        Action.COMPLETE: on_progress("complete", ("end",)),
        Action.JOURNAL: on_progress("journal", ("end", "complete")),
        Action.PHONE_FALLBACK: on_progress("phone_fallback"),
        Action.MARK_NO_SHOW: no_show,
        Action.VIEW_CONSULTATION: view_consultation,
        Action.SEND_CHAT: send_chat,
        Action.READ_CHAT: read_chat,
        Action.POST_ANNOUNCEMENT: post,
        Action.VIEW_ANNOUNCEMENTS: view_ann,
        Action.MANAGE_WAITING_ROOMS: manage,
        Action.VIEW_INSPECTOR: inspector,
        Action.PURGE_CHAT: purge,
        Action.INVITE_GUEST: invite_guest,
        Action.REMOVE_GUEST: remove_guest,
    }


SETUPS = _setups()


@pytest.mark.parametrize("role", ROLES, ids=str)
@pytest.mark.parametrize("action", list(Action), ids=str)
@pytest.mark.parametrize("same", [True, False], ids=["same", "other"])
async def test_service_enforces_the_matrix(role: Role, action: Action, same: bool) -> None:
    store = MemoryStore()
    svc = WorkflowService(store, WorkflowConfig(strict_departments=True))
    await rooms(svc)
    run = await SETUPS[action](svc)
    before = store.snapshot()
    who = actor(role, same)
    if expected(role, action, same):
        await run(who)
    else:
        with pytest.raises(Exception) as err:
            await run(who)
        assert getattr(err.value, "code", None) == "forbidden", repr(err.value)
        assert store.snapshot() == before


async def test_patient_chat_is_bound_to_the_consultation_of_the_token() -> None:
    """Knowing a patient ref and a session id is not enough: a patient reads and posts in a
    consultation's chat (and the pair chat that follows it) only on a token for that consultation."""
    svc = WorkflowService(MemoryStore(), WorkflowConfig(strict_departments=True))
    await rooms(svc)
    first = await _in_progress(svc)
    await svc.end(CLIN, first, now_ms=T0 + MIN)
    second = await _booked(svc)  # the same patient p1, another consultation
    own, pair = chat.consultation_channel_id(first), chat.pair_channel_id("p1", CLIN.user_id)
    right = Actor(Role.PATIENT, "p1", consultation=first)
    refused = [Actor(Role.PATIENT, "p1"), Actor(Role.PATIENT, "p1", consultation=second),
               Actor(Role.PATIENT, "p1", consultation="s_unknown"), Actor(Role.PATIENT, "p2", consultation=first)]
    await svc.send_chat(right, own, "hello", now_ms=T0 + 2 * MIN)
    await svc.send_chat(right, pair, "after", now_ms=T0 + 2 * MIN)
    assert [m.text for m in await svc.chat_history(right, own)] == ["hello"]
    assert [m.text for m in await svc.chat_history(right, pair)] == ["after"]
    outcomes = []
    for actor in refused:
        for channel in (own, pair):
            for attempt in (lambda: svc.send_chat(actor, channel, "x", now_ms=T0 + 3 * MIN),
                            lambda: svc.chat_history(actor, channel)):
                with pytest.raises(Forbidden):
                    await attempt()
                outcomes.append("forbidden")
    assert outcomes == ["forbidden"] * 16
    # Nothing was written by the refused attempts.
    assert [m.text for m in await svc.chat_history(CLIN, own)] == ["hello"]
    assert [m.text for m in await svc.chat_history(CLIN, pair)] == ["after"]
