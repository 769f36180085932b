"""The workflow service: commands from an actor, checked, applied to the machines, persisted.

Each command (book, invite, patient_ready, enter_waiting_room, admit, …) does the same steps:

1. load the records it touches from the :class:`~rooms.store.Store`, with their versions;
2. check the permission table (:mod:`rooms.permissions`) against the loaded resource's department
   and patient — a refused actor gets ``forbidden`` and nothing is written;
3. apply the pure machines (:mod:`rooms.consultation`, :mod:`rooms.waiting_room`,
   :mod:`rooms.chat`, :mod:`rooms.announcement`), which raise ``invalid_state`` on an illegal event;
4. commit every changed record in one compare-and-set batch; if another writer got there first the
   command starts again from step 1 (so of two concurrent admits, the second sees ``admitted``);
5. return the new value plus typed :class:`~rooms.backoffice.BackofficeEntry` items for the
   caller to write to the session's event log. The service never logs and never reads a clock:
   time comes in as ``now_ms``.

Invariant kept by the store layout: a patient is waiting in at most one queue. The ``patient``
index record names the one waiting session of a patient and is written in the same batch as the
queue entry and the room's order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from rooms import chat, waiting_room
from rooms.announcement import Announcement
from rooms.announcement import State as AState
from rooms.backoffice import BackofficeEntry, LogKind, entry, format_time, seconds
from rooms.chat import ChannelKind, ChatChannel, ChatMessage, Retention, RetentionKind
from rooms.consultation import GUEST_STATES, Consultation, Guest
from rooms.consultation import State as CState
from rooms.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    InvalidToken,
    InvalidTransition,
    NotFound,
    RoomsError,
    TooEarly,
    TooLate,
)
from rooms.model import Role, SessionId, new_id
from rooms.permissions import Action, Actor, Resource, check
from rooms.store import Append, Check, Doc, Op, Put, Store, StoreConflict
from rooms.waiting_room import Devices, QueueEntry, WaitingRoom, classify
from rooms.waiting_room import State as QState

T = TypeVar("T")

MINUTE_MS: Final = 60_000
#: Longest patient display name kept with a consultation (the token's ``name`` limit).
PATIENT_NAME_MAX: Final = 80

# Store kinds and logs (no ':' in them; see RedisStore).
CONSULTATION: Final = "consultation"
ENTRY: Final = "entry"
ROOM: Final = "room"
PATIENT: Final = "patient"
CHANNEL: Final = "channel"
CHAT_LOG: Final = "chat"

_ROLE_WORDS: Final[Mapping[Role, str]] = {
    Role.PATIENT: "patient",
    Role.CLINICIAN: "clinician",
    Role.SUPPORT: "support",
    Role.ADMIN: "organisation admin",
    Role.DEPARTMENT_ADMIN: "department admin",
    Role.ORGANISATION_ADMIN: "organisation admin",
    Role.GUEST: "guest",
}


@dataclass(frozen=True, slots=True)
class WorkflowConfig:
    """Organisation settings the workflow needs. Defaults are what we ship."""

    strict_departments: bool = True
    # No-show: patient not arrived by appointment time plus this grace period.
    no_show_grace_ms: int = 15 * MINUTE_MS
    # Arrival within this many ms either side of the appointment counts as on time.
    on_time_window_ms: int = 5 * MINUTE_MS
    # Join links work from one hour before to one hour after the appointment.
    link_valid_before_ms: int = 60 * MINUTE_MS
    link_valid_after_ms: int = 60 * MINUTE_MS
    chat_max_bytes: int = 4096
    announcement_max_chars: int = 500
    announcements_kept: int = 20
    retention: Retention = field(default_factory=Retention)
    # How often a command re-runs after losing a compare-and-set before giving up with `conflict`.
    cas_attempts: int = 20


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """What a command returns: its new value and the back-office entries to write to the log."""

    value: T
    entries: tuple[BackofficeEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class QueuedPatient:
    """One line of a live queue view."""

    position: int
    session_id: SessionId
    patient_ref: str
    arrival: waiting_room.Arrival
    entered_ms: int
    waiting_ms: int
    appointment_ms: int | None
    patient_name: str | None = None
    devices: Devices = Devices()


@dataclass(slots=True)
class _Batch:
    """Records loaded with their versions, and the writes a command wants to commit."""

    ops: list[Op] = field(default_factory=list)

    def put(self, kind: str, key: str, body: Mapping[str, Any], version: int) -> None:
        self.ops.append(Put(kind, key, body, version))


def _role_word(role: Role) -> str:
    return _ROLE_WORDS[role]


def _display_name(name: str | None) -> str | None:
    """A patient's display name, trimmed; None for none or blank; ``invalid_input`` if not text
    or longer than :data:`PATIENT_NAME_MAX` characters."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidInput("patient_name must be a string")
    name = name.strip()
    if len(name) > PATIENT_NAME_MAX:
        raise InvalidInput(f"patient_name is {len(name)} characters, over {PATIENT_NAME_MAX}")
    return name or None


class WorkflowService:
    """``WorkflowService(store, config)``: the clinical workflow over one store."""

    def __init__(self, store: Store, config: WorkflowConfig | None = None) -> None:
        self.store = store
        self.config = config or WorkflowConfig()

    def authorize(self, actor: Actor, action: Action, department: str, patient_ref: str | None = None) -> None:
        """Raise ``forbidden`` unless the table allows it: for checks the edge makes itself
        (e.g. :attr:`Action.VIEW_INSPECTOR` before serving inspector data)."""
        self._check(actor, action, department, patient_ref)

    # -- plumbing ---------------------------------------------------------------------------

    async def _retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        for i in range(self.config.cas_attempts):
            try:
                return await attempt()
            except StoreConflict:
                if i == self.config.cas_attempts - 1:
                    raise
                await asyncio.sleep(0.001 * (i + 1))  # back off a little under contention
        raise AssertionError("unreachable")

    async def _load_doc(self, kind: str, key: str, what: str) -> Doc:
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"{what} id must be a non-empty string")
        doc = await self.store.get(kind, key)
        if doc is None:
            raise NotFound(what, key)
        return doc

    async def _consultation(self, session_id: SessionId) -> tuple[int, Consultation]:
        doc = await self._load_doc(CONSULTATION, session_id, "consultation")
        return doc.version, Consultation.from_doc(doc.body)

    async def _room(self, room_id: str) -> tuple[int, WaitingRoom]:
        doc = await self._load_doc(ROOM, room_id, "waiting room")
        return doc.version, WaitingRoom.from_doc(doc.body)

    async def _entry(self, session_id: SessionId, patient_ref: str) -> tuple[int, QueueEntry]:
        doc = await self.store.get(ENTRY, session_id)
        if doc is None:
            return 0, QueueEntry(session_id, patient_ref)
        return doc.version, QueueEntry.from_doc(doc.body)

    async def _patient_index(self, patient_ref: str) -> tuple[int, SessionId | None, str | None]:
        doc = await self.store.get(PATIENT, patient_ref)
        if doc is None:
            return 0, None, None
        return doc.version, doc.body.get("session_id"), doc.body.get("room_id")

    async def _channel(self, channel_id: str) -> tuple[int, ChatChannel]:
        doc = await self._load_doc(CHANNEL, channel_id, "chat channel")
        return doc.version, ChatChannel.from_doc(doc.body)

    def _check(self, actor: Actor, action: Action, department: str, patient_ref: str | None = None,
               session_id: str | None = None) -> None:
        check(actor, action, Resource(department, patient_ref, session_id), self.config.strict_departments)

    async def _check_chat(self, actor: Actor, action: Action, ch: ChatChannel) -> None:
        """Chat access: the table, then membership. A consultation's chat is a patient's only on a
        token issued for that consultation; a pair chat only on a token for a consultation of that
        patient with that clinician. A clinician reads a pair chat only if it is theirs."""
        session_id = ch.session_id
        if actor.role is Role.PATIENT and ch.kind is ChannelKind.PAIR:
            doc = None if actor.consultation is None else await self.store.get(CONSULTATION, actor.consultation)
            c = None if doc is None else Consultation.from_doc(doc.body)
            if c is None or c.patient_ref != ch.patient_ref or ch.clinician not in (c.admitted_by, c.clinician):
                raise Forbidden(f'patient "{actor.user_id}" may not {action.value} in chat "{ch.channel_id}" '
                                "with this token: it was not issued for a consultation with that clinician")
            session_id = c.session_id
        self._check(actor, action, ch.department, ch.patient_ref, session_id)
        if actor.role is Role.CLINICIAN and ch.kind is ChannelKind.PAIR and ch.clinician != actor.user_id:
            raise Forbidden(f'clinician "{actor.user_id}" is not part of chat "{ch.channel_id}"')

    @staticmethod
    def _check_time(now_ms: int) -> None:
        if not isinstance(now_ms, int) or isinstance(now_ms, bool) or now_ms < 0:
            raise InvalidInput("now_ms must be a non-negative integer")

    async def _dequeue(
        self, batch: _Batch, entries: list[BackofficeEntry], c: Consultation, actor: Actor, now_ms: int
    ) -> None:
        """If the consultation's patient is waiting, take them out of the queue (removed)."""
        ev, qe = await self._entry(c.session_id, c.patient_ref)
        if qe.state is not QState.WAITING or qe.room_id is None:
            return
        rv, room = await self._room(qe.room_id)
        pv, _, _ = await self._patient_index(c.patient_ref)
        qe = qe.remove(actor.user_id, now_ms)
        batch.put(ENTRY, c.session_id, qe.to_doc(), ev)
        batch.put(ROOM, room.room_id, room.discard(c.session_id).to_doc(), rv)
        batch.put(PATIENT, c.patient_ref, {"session_id": None, "room_id": None}, pv)
        entries.append(
            entry(LogKind.QUEUE, f"Patient was taken out of the queue {room.name} because the "
                  f"consultation ended without video.", c.session_id, now_ms, room_id=room.room_id)
        )

    async def _close_consultation_channel(
        self, batch: _Batch, c: Consultation, event: chat.Event
    ) -> bool:
        """Move the consultation's channel; returns True if its messages must now be deleted."""
        cid = chat.consultation_channel_id(c.session_id)
        doc = await self.store.get(CHANNEL, cid)
        if doc is None:
            return False
        ch = ChatChannel.from_doc(doc.body)
        if ch.state is chat.State.CLOSED:
            return False
        delete = self.config.retention.kind is RetentionKind.DELETE_ON_CALL_END
        if event is chat.Event.CALL_ENDED and ch.state is chat.State.IN_CALL:
            ch = ch.move(event)
            if delete:
                ch = ch.move(chat.Event.CLOSE)
        elif event is chat.Event.CLOSE or ch.state is chat.State.BEFORE_CALL:
            ch = ch.move(chat.Event.CLOSE)
        batch.put(CHANNEL, cid, ch.to_doc(), doc.version)
        return delete

    async def _after_commit_purge(self, session_id: SessionId, purge: bool) -> None:
        if purge:
            await self.store.trim_log(CHAT_LOG, chat.consultation_channel_id(session_id), None)

    # -- waiting rooms --------------------------------------------------------------------------

    async def create_waiting_room(
        self, actor: Actor, *, room_id: str, name: str, department: str, clinician: str | None = None,
        now_ms: int,
    ) -> Result[WaitingRoom]:
        """A department's waiting room (clinician None) or one clinician's own queue."""
        self._check_time(now_ms)
        for label, value in (("room_id", room_id), ("name", name), ("department", department)):
            if not isinstance(value, str) or not value.strip():
                raise InvalidInput(f"{label} must be a non-empty string")
        self._check(actor, Action.MANAGE_WAITING_ROOMS, department)
        room = WaitingRoom(room_id, name, department, clinician)
        try:
            await self.store.commit([Put(ROOM, room_id, room.to_doc(), 0)])
        except StoreConflict:
            raise Conflict(f'waiting room "{room_id}" already exists') from None
        text = f"Waiting room {name} was opened by {_role_word(actor.role)}."
        return Result(room, (entry(LogKind.QUEUE, text, None, now_ms, room_id=room_id, department=department),))

    async def waiting_room(self, actor: Actor, room_id: str) -> WaitingRoom:
        _, room = await self._room(room_id)
        self._check(actor, Action.VIEW_QUEUE, room.department)
        return room

    async def queue(self, actor: Actor, room_id: str, *, now_ms: int) -> list[QueuedPatient]:
        """The live queue of one room, in order (position 1 first)."""
        _, room = await self._room(room_id)
        self._check(actor, Action.VIEW_QUEUE, room.department)
        out: list[QueuedPatient] = []
        for pos, sid in enumerate(room.waiting, start=1):
            _, qe = await self._entry(sid, "")
            _, c = await self._consultation(sid)
            seg = qe.current
            out.append(
                QueuedPatient(pos, sid, qe.patient_ref, seg.arrival, seg.entered_ms,
                              max(0, now_ms - seg.entered_ms), c.appointment_ms, c.patient_name, qe.devices)
            )
        return out

    # -- consultations --------------------------------------------------------------------------

    async def book(
        self, actor: Actor, *, department: str, clinician: str | None, patient_ref: str,
        appointment_ms: int, now_ms: int, session_id: SessionId | None = None, patient_name: str | None = None,
    ) -> Result[Consultation]:
        """Book a consultation; its chat channel opens with it (for the waiting room). ``patient_name``
        is the patient's display name, kept with the consultation for staff (the queue shows it)."""
        self._check_time(now_ms)
        if not isinstance(department, str) or not department.strip():
            raise InvalidInput("department must be a non-empty string")
        if not isinstance(patient_ref, str) or not patient_ref.strip():
            raise InvalidInput("patient_ref must be a non-empty string")
        if not isinstance(appointment_ms, int) or isinstance(appointment_ms, bool) or appointment_ms < 0:
            raise InvalidInput("appointment_ms must be a non-negative integer")
        patient_name = _display_name(patient_name)
        self._check(actor, Action.BOOK, department, patient_ref)
        sid = session_id or SessionId(new_id("s"))
        c = Consultation(sid, department, clinician, patient_ref, appointment_ms, CState.BOOKED, now_ms,
                         patient_name=patient_name)
        await self._create_consultation(c, now_ms)
        text = f"Booked a consultation at {format_time(appointment_ms)}."
        return Result(c, (entry(LogKind.CONSULTATION, text, sid, now_ms, appointment_ms=appointment_ms,
                                department=department, clinician=clinician, patient=patient_ref,
                                by=actor.user_id),))

    async def _create_consultation(self, c: Consultation, now_ms: int) -> None:
        ch = ChatChannel(chat.consultation_channel_id(c.session_id), ChannelKind.CONSULTATION, c.department,
                         c.patient_ref, c.clinician, now_ms, c.session_id)
        try:
            await self.store.commit([Put(CONSULTATION, c.session_id, c.to_doc(), 0),
                                     Put(CHANNEL, ch.channel_id, ch.to_doc(), 0)])
        except StoreConflict:
            raise Conflict(f'consultation "{c.session_id}" already exists') from None

    async def consultation(self, actor: Actor, session_id: SessionId) -> Consultation:
        _, c = await self._consultation(session_id)
        self._check(actor, Action.VIEW_CONSULTATION, c.department, c.patient_ref)
        return c

    async def invite(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[Consultation]:
        """Issue (or re-issue) the join link's token."""
        self._check_time(now_ms)

        async def attempt() -> Result[Consultation]:
            v, c = await self._consultation(session_id)
            self._check(actor, Action.INVITE, c.department, c.patient_ref)
            token = secrets.token_urlsafe(16)
            c = c.invite(token, now_ms)
            await self.store.commit([Put(CONSULTATION, session_id, c.to_doc(), v)])
            text = (f"Join link sent to patient {c.patient_ref} with token {token[:6]}… "
                    f"to start the consultation.")
            return Result(c, (entry(LogKind.CONSULTATION, text, session_id, now_ms, patient=c.patient_ref),))

        return await self._retry(attempt)

    def guest_window(self, c: Consultation, now_ms: int, call_ms: int) -> tuple[int, int]:
        """When a guest link added now works (UTC ms): the consultation's link window around its
        appointment; once the call is on (or for a walk-in) from now for ``call_ms``. ``too_late``
        if that window is over."""
        if c.appointment_ms is None or c.state is CState.IN_PROGRESS:
            return now_ms, now_ms + call_ms
        opens = c.appointment_ms - self.config.link_valid_before_ms
        closes = c.appointment_ms + self.config.link_valid_after_ms
        if closes <= now_ms:
            raise TooLate(f"the consultation's link window closed at {format_time(closes)}")
        return min(opens, now_ms), closes

    async def invite_guest(
        self, actor: Actor, session_id: SessionId, *, name: str, now_ms: int
    ) -> Result[tuple[Consultation, Guest]]:
        """Add a guest (a relative, an interpreter) to the consultation: a new guest id for their
        link's token. The edge mints the token (role ``guest``, the consultation's room)."""
        self._check_time(now_ms)
        shown = _display_name(name)
        if shown is None:
            raise InvalidInput("the guest's name must not be blank")

        async def attempt() -> Result[tuple[Consultation, Guest]]:
            v, c = await self._consultation(session_id)
            self._check(actor, Action.INVITE_GUEST, c.department, c.patient_ref)
            guest = Guest(new_id("g"), shown, actor.user_id, now_ms)
            c = c.add_guest(guest)
            await self.store.commit([Put(CONSULTATION, session_id, c.to_doc(), v)])
            text = f"Guest {guest.name} ({guest.guest_id}) was added by {_role_word(actor.role)} {actor.user_id}."
            return Result((c, guest), (entry(LogKind.CONSULTATION, text, session_id, now_ms, guest_id=guest.guest_id,
                                             guest_name=guest.name, by=actor.user_id),))

        return await self._retry(attempt)

    async def remove_guest(
        self, actor: Actor, session_id: SessionId, guest_id: str, *, now_ms: int
    ) -> Result[tuple[Consultation, Guest]]:
        """Revoke a guest's link (the edge also ends their connection to the call)."""
        self._check_time(now_ms)

        async def attempt() -> Result[tuple[Consultation, Guest]]:
            v, c = await self._consultation(session_id)
            self._check(actor, Action.REMOVE_GUEST, c.department, c.patient_ref)
            c = c.remove_guest(guest_id, actor.user_id, now_ms)
            guest = c.guest(guest_id)
            assert guest is not None
            await self.store.commit([Put(CONSULTATION, session_id, c.to_doc(), v)])
            text = f"Guest {guest.name} ({guest_id}) was removed by {_role_word(actor.role)} {actor.user_id}."
            return Result((c, guest), (entry(LogKind.CONSULTATION, text, session_id, now_ms, guest_id=guest_id,
                                             guest_name=guest.name, by=actor.user_id),))

        return await self._retry(attempt)

    async def check_guest(self, session_id: SessionId, guest_id: str) -> Guest:
        """A guest link at the door of the call: ``forbidden`` unless the guest was added to this
        consultation and not removed, and the consultation can still have a call."""
        doc = await self.store.get(CONSULTATION, session_id)
        c = None if doc is None else Consultation.from_doc(doc.body)
        guest = None if c is None else c.guest(guest_id)
        if c is None or guest is None:
            raise Forbidden(f'guest link "{guest_id}" was not issued for consultation "{session_id}"')
        if not guest.active:
            raise Forbidden(f'guest link "{guest_id}" was revoked at {format_time(guest.removed_ms or 0)}')
        if c.state not in GUEST_STATES:
            raise Forbidden(f'consultation "{session_id}" is {c.state}: its guest links no longer work')
        return guest

    async def patient_ready(
        self, actor: Actor, session_id: SessionId, *, token: str, now_ms: int, device_check_passed: bool = True,
    ) -> Result[Consultation]:
        """The patient opened the link inside its time window. The device check only advises
        (``device_check_passed`` is kept for older clients and ignored): a patient without a
        camera, or who denied it, still comes in; what it found travels with the queue entry."""
        self._check_time(now_ms)

        async def attempt() -> Result[Consultation]:
            v, c = await self._consultation(session_id)
            self._check(actor, Action.PATIENT_READY, c.department, c.patient_ref)
            ready = c.patient_ready(now_ms)  # invalid_state unless invited (or already ready)
            if c.link_token is not None and (
                not isinstance(token, str)
                or not secrets.compare_digest(token.encode(), c.link_token.encode())
            ):
                raise InvalidToken(f'the token is not valid for consultation "{session_id}"')
            if c.appointment_ms is not None:
                opens = c.appointment_ms - self.config.link_valid_before_ms
                closes = c.appointment_ms + self.config.link_valid_after_ms
                if now_ms < opens:
                    raise TooEarly(f"the link opens at {format_time(opens)}")
                if now_ms > closes:
                    raise TooLate(f"the link closed at {format_time(closes)}")
            c = ready
            await self.store.commit([Put(CONSULTATION, session_id, c.to_doc(), v)])
            return Result(c, (
                entry(LogKind.CONSULTATION, "Patient logged in via link.", session_id, now_ms),
                entry(LogKind.CONSULTATION, "Patient is ready. The patient has clicked the link and is now logged in.",
                      session_id, now_ms, patient=c.patient_ref),
            ))

        return await self._retry(attempt)

    async def walk_in(
        self, actor: Actor, *, room_id: str, now_ms: int, patient_ref: str | None = None,
        session_id: SessionId | None = None, patient_name: str | None = None,
    ) -> Result[QueueEntry]:
        """A patient without a booking queues in a waiting room (yellow corner); ``patient_name``
        is the name they gave, kept with the consultation for staff."""
        self._check_time(now_ms)
        patient_name = _display_name(patient_name)
        ref = actor.user_id if actor.role is Role.PATIENT else patient_ref
        if not isinstance(ref, str) or not ref.strip():
            raise InvalidInput("patient_ref must be a non-empty string")
        _, room = await self._room(room_id)
        self._check(actor, Action.ENTER_WAITING_ROOM, room.department, ref)
        _, waiting_sid, _ = await self._patient_index(ref)
        if waiting_sid is not None:
            raise Conflict(f'patient "{ref}" is already waiting (session "{waiting_sid}")')
        sid = session_id or SessionId(new_id("s"))
        c = Consultation(sid, room.department, room.clinician, ref, None, CState.PATIENT_READY, now_ms,
                         ready_ms=now_ms, patient_name=patient_name)
        await self._create_consultation(c, now_ms)
        try:
            return await self.enter_waiting_room(actor, sid, room_id=room_id, now_ms=now_ms)
        except RoomsError:
            # Nothing may remain of a walk-in that never reached the queue.
            v, c2 = await self._consultation(sid)
            if c2.state is CState.PATIENT_READY:
                await self.store.commit([Put(CONSULTATION, sid, c2.cancel(now_ms).to_doc(), v)])
            raise

    async def enter_waiting_room(
        self, actor: Actor, session_id: SessionId, *, room_id: str, now_ms: int, devices: Devices | None = None,
    ) -> Result[QueueEntry]:
        """Put a ready patient in line; arrival is classified against the booking; ``devices`` is
        what the patient's device check found (kept for the clinician's queue)."""
        self._check_time(now_ms)

        async def attempt() -> Result[QueueEntry]:
            cv, c = await self._consultation(session_id)
            rv, room = await self._room(room_id)
            self._check(actor, Action.ENTER_WAITING_ROOM, room.department, c.patient_ref)
            if actor.role is not Role.PATIENT:
                self._check(actor, Action.ENTER_WAITING_ROOM, c.department, c.patient_ref)
            ev, qe = await self._entry(session_id, c.patient_ref)
            pv, waiting_sid, _ = await self._patient_index(c.patient_ref)
            if c.state is not CState.PATIENT_READY:
                raise InvalidTransition(c.state, waiting_room.Event.ENTER, session_id)
            if waiting_sid is not None and waiting_sid != session_id:
                raise Conflict(f'patient "{c.patient_ref}" is already waiting (session "{waiting_sid}")')
            arrival = classify(c.appointment_ms, now_ms, self.config.on_time_window_ms)
            qe = qe.enter(room, arrival, actor.user_id, now_ms, devices)
            room = room.add(session_id)
            await self.store.commit([
                Check(CONSULTATION, session_id, cv),
                Put(ENTRY, session_id, qe.to_doc(), ev),
                Put(ROOM, room_id, room.to_doc(), rv),
                Put(PATIENT, c.patient_ref, {"session_id": session_id, "room_id": room_id}, pv),
            ])
            queue_word = "the queue" if room.clinician is None else f"{room.clinician}'s queue"
            who = _role_word(actor.role)
            if arrival is waiting_room.Arrival.WALK_IN:
                text = f"Patient was added to {queue_word} by {who} (walk-in)."
            else:
                when = arrival.value.replace("_", " ")
                text = f"Patient was added to {queue_word} by {who}. Booked consultation ({when})."
            if qe.devices.problems:
                text += f" Device check: {', '.join(qe.devices.problems)}."
            return Result(qe, (entry(LogKind.QUEUE, text, session_id, now_ms, room_id=room_id,
                                     arrival=arrival.value, position=room.position(session_id),
                                     by=actor.user_id, devices=qe.devices.to_doc()),))

        return await self._retry(attempt)

    async def report_devices(
        self, actor: Actor, session_id: SessionId, devices: Devices, *, now_ms: int
    ) -> Result[QueueEntry]:
        """A waiting patient's device check ran again (a reload, a newly allowed camera): the
        queue shows the new result. No entry when nothing changed."""
        self._check_time(now_ms)

        async def attempt() -> Result[QueueEntry]:
            _, c = await self._consultation(session_id)
            ev, qe = await self._entry(session_id, c.patient_ref)
            self._check(actor, Action.ENTER_WAITING_ROOM, c.department, c.patient_ref)
            if qe.state is not QState.WAITING or qe.devices == devices:
                return Result(qe, ())
            qe = qe.with_devices(devices)
            await self.store.commit([Put(ENTRY, session_id, qe.to_doc(), ev)])
            found = ", ".join(qe.devices.problems) or "camera and microphone working"
            return Result(qe, (entry(LogKind.QUEUE, f"Patient's device check again: {found}.", session_id, now_ms,
                                     room_id=qe.room_id, devices=qe.devices.to_doc()),))

        return await self._retry(attempt)

    async def queue_entry(self, actor: Actor, session_id: SessionId) -> QueueEntry:
        _, c = await self._consultation(session_id)
        self._check(actor, Action.VIEW_CONSULTATION, c.department, c.patient_ref)
        return (await self._entry(session_id, c.patient_ref))[1]

    async def position(self, actor: Actor, session_id: SessionId) -> int | None:
        """The patient's live place in line (1 = next), or None if not waiting."""
        qe = await self.queue_entry(actor, session_id)
        if qe.state is not QState.WAITING or qe.room_id is None:
            return None
        _, room = await self._room(qe.room_id)
        return room.position(session_id)

    async def _leave_queue(
        self, actor: Actor, session_id: SessionId, action: Action, now_ms: int,
        move: Callable[[QueueEntry], QueueEntry], describe: Callable[[QueueEntry, WaitingRoom], str],
    ) -> Result[QueueEntry]:
        """Shared by abandon and remove: the patient leaves before admission."""
        self._check_time(now_ms)

        async def attempt() -> Result[QueueEntry]:
            cv, c = await self._consultation(session_id)
            ev, qe = await self._entry(session_id, c.patient_ref)
            if qe.room_id is None:
                self._check(actor, action, c.department, c.patient_ref)
                move(qe)  # raises the machine's invalid_state
                raise AssertionError("unreachable")
            rv, room = await self._room(qe.room_id)
            self._check(actor, action, room.department, c.patient_ref)
            pv, _, _ = await self._patient_index(c.patient_ref)
            qe = move(qe)
            # A walk-in who leaves is over; a booked patient may come back through the link.
            c = c.cancel(now_ms) if c.walk_in else c.patient_left()
            batch = _Batch()
            batch.put(ENTRY, session_id, qe.to_doc(), ev)
            batch.put(ROOM, room.room_id, room.discard(session_id).to_doc(), rv)
            batch.put(PATIENT, c.patient_ref, {"session_id": None, "room_id": None}, pv)
            batch.put(CONSULTATION, session_id, c.to_doc(), cv)
            purge = False
            if c.state is CState.CANCELLED:
                purge = await self._close_consultation_channel(batch, c, chat.Event.CLOSE)
            await self.store.commit(batch.ops)
            await self._after_commit_purge(session_id, purge)
            seg = qe.current
            return Result(qe, (entry(LogKind.QUEUE, describe(qe, room), session_id, now_ms, room_id=room.room_id,
                                     waited_ms=seg.waited_ms, left_ms=seg.left_ms, outcome=str(seg.outcome)),))

        return await self._retry(attempt)

    async def abandon(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[QueueEntry]:
        """The patient left the waiting room before being admitted (abandon time and wait kept)."""
        return await self._leave_queue(
            actor, session_id, Action.ABANDON, now_ms, lambda qe: qe.abandon(now_ms),
            lambda qe, room: (f"Patient left the queue {room.name} before being admitted, "
                              f"after waiting {seconds(qe.current.waited_ms or 0)} seconds."),
        )

    async def remove(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[QueueEntry]:
        """Staff take a patient out of the queue."""
        return await self._leave_queue(
            actor, session_id, Action.REMOVE_FROM_QUEUE, now_ms, lambda qe: qe.remove(actor.user_id, now_ms),
            lambda qe, room: f"Patient was removed from the queue {room.name} by {_role_word(actor.role)}.",
        )

    async def transfer(
        self, actor: Actor, session_id: SessionId, *, to_room_id: str, now_ms: int
    ) -> Result[QueueEntry]:
        """Move a waiting patient to another waiting room; the session id stays, a segment starts."""
        self._check_time(now_ms)

        async def attempt() -> Result[QueueEntry]:
            _, c = await self._consultation(session_id)
            ev, qe = await self._entry(session_id, c.patient_ref)
            tv, target = await self._room(to_room_id)
            if qe.room_id is None:
                self._check(actor, Action.TRANSFER, c.department, c.patient_ref)
                qe.transfer(target, actor.user_id, now_ms)  # raises invalid_state
                raise AssertionError("unreachable")
            sv, source = await self._room(qe.room_id)
            self._check(actor, Action.TRANSFER, source.department, c.patient_ref)
            if source.room_id == target.room_id:
                raise InvalidInput(f'patient is already waiting in "{to_room_id}"')
            pv, _, _ = await self._patient_index(c.patient_ref)
            qe = qe.transfer(target, actor.user_id, now_ms)
            await self.store.commit([
                Put(ENTRY, session_id, qe.to_doc(), ev),
                Put(ROOM, source.room_id, source.discard(session_id).to_doc(), sv),
                Put(ROOM, target.room_id, target.add(session_id).to_doc(), tv),
                Put(PATIENT, c.patient_ref, {"session_id": session_id, "room_id": target.room_id}, pv),
            ])
            text = f"Patient was transferred from {source.name} to {target.name} by {_role_word(actor.role)}."
            return Result(qe, (entry(LogKind.QUEUE, text, session_id, now_ms, from_room=source.room_id,
                                     to_room=target.room_id, to_department=target.department,
                                     segment=len(qe.segments), by=actor.user_id),))

        return await self._retry(attempt)

    async def admit(
        self, actor: Actor, session_id: SessionId, *, now_ms: int, video_session_id: str | None = None
    ) -> Result[Consultation]:
        """A clinician admits a waiting patient: the call starts. Of concurrent admits one wins."""
        self._check_time(now_ms)
        video = video_session_id or new_id("v")

        async def attempt() -> Result[Consultation]:
            cv, c = await self._consultation(session_id)
            ev, qe = await self._entry(session_id, c.patient_ref)
            if qe.room_id is None:
                self._check(actor, Action.ADMIT, c.department, c.patient_ref)
                qe.admit(actor.user_id, now_ms)  # raises invalid_state ("admitted" for the loser)
                raise AssertionError("unreachable")
            rv, room = await self._room(qe.room_id)
            self._check(actor, Action.ADMIT, room.department, c.patient_ref)
            pv, _, _ = await self._patient_index(c.patient_ref)
            qe = qe.admit(actor.user_id, now_ms)
            c = c.admit(actor.user_id, video, now_ms)
            batch = _Batch()
            batch.put(ENTRY, session_id, qe.to_doc(), ev)
            batch.put(ROOM, room.room_id, room.discard(session_id).to_doc(), rv)
            batch.put(PATIENT, c.patient_ref, {"session_id": None, "room_id": None}, pv)
            batch.put(CONSULTATION, session_id, c.to_doc(), cv)
            chv, ch = await self._channel(chat.consultation_channel_id(session_id))
            if ch.state is chat.State.BEFORE_CALL:
                batch.put(CHANNEL, ch.channel_id, ch.move(chat.Event.CALL_STARTED).to_doc(), chv)
            await self.store.commit(batch.ops)
            who = f"patient {c.patient_ref} and clinician {actor.user_id}"
            waited = qe.current.waited_ms or 0
            return Result(c, (
                entry(LogKind.QUEUE, f"Patient was admitted from {room.name} by clinician {actor.user_id} "
                      f"after waiting {seconds(waited)} seconds.", session_id, now_ms,
                      room_id=room.room_id, waited_ms=waited),
                entry(LogKind.VIDEO_SESSION, f"Video session id ({video}) has been created for video "
                      f"consultation between {who}.", session_id, now_ms, video_session_id=video),
                entry(LogKind.CONSULTATION, f"Video consultation is in progress between {who}.",
                      session_id, now_ms, clinician=actor.user_id, patient=c.patient_ref),
                _call_started(qe.current.arrival, c, actor.user_id, now_ms),
            ))

        return await self._retry(attempt)

    async def _open_pair_channel(self, batch: _Batch, c: Consultation, now_ms: int) -> None:
        """After a call, patient and clinician keep one channel for follow-up messages."""
        clinician = c.admitted_by or c.clinician
        if clinician is None or self.config.retention.kind is RetentionKind.DELETE_ON_CALL_END:
            return
        cid = chat.pair_channel_id(c.patient_ref, clinician)
        if await self.store.get(CHANNEL, cid) is None:
            ch = ChatChannel(cid, ChannelKind.PAIR, c.department, c.patient_ref, clinician, now_ms, None,
                             chat.State.AFTER_CALL)
            batch.put(CHANNEL, cid, ch.to_doc(), 0)

    async def end(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[Consultation]:
        """The call ended; its duration is recorded."""
        self._check_time(now_ms)

        async def attempt() -> Result[Consultation]:
            cv, c = await self._consultation(session_id)
            self._check(actor, Action.END, c.department, c.patient_ref)
            c = c.end(now_ms)
            batch = _Batch()
            batch.put(CONSULTATION, session_id, c.to_doc(), cv)
            purge = await self._close_consultation_channel(batch, c, chat.Event.CALL_ENDED)
            await self._open_pair_channel(batch, c, now_ms)
            await self.store.commit(batch.ops)
            await self._after_commit_purge(session_id, purge)
            text = (f"Video consultation between patient and clinician has ended and lasted "
                    f"{seconds(c.duration_ms or 0)} seconds. Patient: {c.patient_ref} Clinician: {c.admitted_by}.")
            ended = (f"Call ended at {format_time(now_ms)} and lasted {seconds(c.duration_ms or 0)} seconds. "
                     f"Patient: {c.patient_ref} Clinician: {c.admitted_by}.")
            return Result(c, (entry(LogKind.CONSULTATION, text, session_id, now_ms, duration_ms=c.duration_ms,
                                    started_ms=c.started_ms, ended_ms=c.ended_ms),
                              entry(LogKind.CALL_ENDED, ended, session_id, now_ms, duration_ms=c.duration_ms,
                                    started_ms=c.started_ms, ended_ms=c.ended_ms, patient=c.patient_ref,
                                    clinician=c.admitted_by)))

        return await self._retry(attempt)

    async def phone_fallback(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[Consultation]:
        """The consultation ended as a phone call, with or without an earlier video session."""
        self._check_time(now_ms)

        async def attempt() -> Result[Consultation]:
            cv, c = await self._consultation(session_id)
            self._check(actor, Action.PHONE_FALLBACK, c.department, c.patient_ref)
            entries: list[BackofficeEntry] = []
            batch = _Batch()
            c = c.phone_fallback(now_ms)
            await self._dequeue(batch, entries, c, actor, now_ms)
            batch.put(CONSULTATION, session_id, c.to_doc(), cv)
            purge = await self._close_consultation_channel(batch, c, chat.Event.CALL_ENDED)
            await self._open_pair_channel(batch, _with_acting_clinician(c, actor), now_ms)
            await self.store.commit(batch.ops)
            await self._after_commit_purge(session_id, purge)
            text = (f"Video consultation ended as phone consultation. Clinician: {actor.user_id} "
                    f"Patient: {c.patient_ref} VideoSessionId: {c.video_session_id or ''}")
            entries.append(entry(LogKind.VIDEO_SESSION, text, session_id, now_ms,
                                 video_session_id=c.video_session_id, video_attempted=c.video_session_id is not None))
            return Result(c, tuple(entries))

        return await self._retry(attempt)

    async def complete(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[Consultation]:
        self._check_time(now_ms)

        async def attempt() -> Result[Consultation]:
            cv, c = await self._consultation(session_id)
            self._check(actor, Action.COMPLETE, c.department, c.patient_ref)
            c = c.complete(now_ms)
            await self.store.commit([Put(CONSULTATION, session_id, c.to_doc(), cv)])
            return Result(c, (entry(LogKind.CONSULTATION, "Consultation completed, waiting for journal.",
                                    session_id, now_ms),))

        return await self._retry(attempt)

    async def journal(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[Consultation]:
        """The journal note is written; the consultation is closed."""
        self._check_time(now_ms)

        async def attempt() -> Result[Consultation]:
            cv, c = await self._consultation(session_id)
            self._check(actor, Action.JOURNAL, c.department, c.patient_ref)
            c = c.journal(now_ms)
            await self.store.commit([Put(CONSULTATION, session_id, c.to_doc(), cv)])
            return Result(c, (entry(LogKind.CONSULTATION, "Journal note written, consultation closed.",
                                    session_id, now_ms),))

        return await self._retry(attempt)

    async def _stop(
        self, actor: Actor, session_id: SessionId, action: Action, now_ms: int,
        move: Callable[[Consultation], Consultation], guard: Callable[[Consultation], None], text: str,
    ) -> Result[Consultation]:
        """Shared by cancel and no-show: the consultation stops before any call."""
        self._check_time(now_ms)

        async def attempt() -> Result[Consultation]:
            cv, c = await self._consultation(session_id)
            self._check(actor, action, c.department, c.patient_ref)
            c = move(c)
            guard(c)
            entries: list[BackofficeEntry] = []
            batch = _Batch()
            await self._dequeue(batch, entries, c, actor, now_ms)
            batch.put(CONSULTATION, session_id, c.to_doc(), cv)
            purge = await self._close_consultation_channel(batch, c, chat.Event.CLOSE)
            await self.store.commit(batch.ops)
            await self._after_commit_purge(session_id, purge)
            entries.append(entry(LogKind.CONSULTATION, text, session_id, now_ms, by=actor.user_id))
            return Result(c, tuple(entries))

        return await self._retry(attempt)

    async def cancel(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[Consultation]:
        return await self._stop(actor, session_id, Action.CANCEL, now_ms, lambda c: c.cancel(now_ms),
                                lambda c: None, f"Consultation was cancelled by {_role_word(actor.role)}.")

    async def no_show(self, actor: Actor, session_id: SessionId, *, now_ms: int) -> Result[Consultation]:
        """The patient did not arrive by the appointment time plus the grace period."""

        def guard(c: Consultation) -> None:
            if c.appointment_ms is None:
                raise InvalidInput("a walk-in cannot be a no-show")
            deadline = c.appointment_ms + self.config.no_show_grace_ms
            if now_ms < deadline:
                raise TooEarly(f"the patient may still arrive until {format_time(deadline)}")

        return await self._stop(actor, session_id, Action.MARK_NO_SHOW, now_ms, lambda c: c.no_show(now_ms),
                                guard, "Patient did not show up for the consultation (no-show).")

    # -- chat -----------------------------------------------------------------------------------

    async def send_chat(self, actor: Actor, channel_id: str, text: object, *, now_ms: int) -> Result[ChatMessage]:
        """Post a message; text is stored verbatim (HTML stays text). The entry omits the text."""
        self._check_time(now_ms)

        async def attempt() -> Result[ChatMessage]:
            v, ch = await self._channel(channel_id)
            await self._check_chat(actor, Action.SEND_CHAT, ch)
            ch.move(chat.Event.SEND)  # closed channels refuse
            body = chat.validate_text(text, self.config.chat_max_bytes)
            msg = ChatMessage(new_id("m"), channel_id, actor.user_id, actor.role.value, body, now_ms, ch.state)
            await self.store.commit([Check(CHANNEL, channel_id, v), Append(CHAT_LOG, channel_id, msg.to_doc())])
            phase = {chat.State.BEFORE_CALL: "before the call", chat.State.IN_CALL: "during the call",
                     chat.State.AFTER_CALL: "after the call"}[ch.state]
            note = f"Chat message sent by {_role_word(actor.role)} {phase} ({len(body)} characters)."
            return Result(msg, (entry(LogKind.CHAT, note, ch.session_id, now_ms, channel_id=channel_id,
                                      message_id=msg.message_id, sender=actor.user_id, chars=len(body)),))

        return await self._retry(attempt)

    async def chat_history(self, actor: Actor, channel_id: str) -> list[ChatMessage]:
        """All kept messages of a channel, oldest first (support may not read chat content)."""
        _, ch = await self._channel(channel_id)
        await self._check_chat(actor, Action.READ_CHAT, ch)
        return [ChatMessage.from_doc(d) for d in await self.store.read_log(CHAT_LOG, channel_id)]

    async def chat_channel(self, actor: Actor, channel_id: str) -> ChatChannel:
        """Channel metadata (state, department); support may see it, not the messages."""
        _, ch = await self._channel(channel_id)
        await self._check_chat(actor, Action.VIEW_CONSULTATION, ch)
        return ch

    async def purge_chat(self, actor: Actor, *, now_ms: int) -> Result[int]:
        """The retention sweep for ``delete_after_days``: drop messages older than N days."""
        self._check_time(now_ms)
        self._check(actor, Action.PURGE_CHAT, "")
        cutoff = self.config.retention.cutoff_ms(now_ms)
        if cutoff is None:
            return Result(0)
        removed = 0
        entries: list[BackofficeEntry] = []
        for cid in await self.store.keys(CHANNEL):
            n = await self.store.trim_log(CHAT_LOG, cid, cutoff)
            if n:
                removed += n
                doc = await self.store.get(CHANNEL, cid)
                sid = None if doc is None else doc.body.get("session_id")
                entries.append(entry(LogKind.CHAT, f"{n} chat messages older than {self.config.retention.days} "
                                     f"days were deleted (retention policy).", sid, now_ms, channel_id=cid, removed=n))
        return Result(removed, tuple(entries))

    # -- announcements --------------------------------------------------------------------------

    async def post_announcement(
        self, actor: Actor, room_id: str, *, text: str, expires_ms: int, now_ms: int
    ) -> Result[Announcement]:
        """A service announcement shown to patients waiting in ``room_id`` until ``expires_ms``."""
        self._check_time(now_ms)
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("announcement text is empty")
        if len(text) > self.config.announcement_max_chars:
            raise InvalidInput(f"announcement is {len(text)} characters, over {self.config.announcement_max_chars}")
        if not isinstance(expires_ms, int) or expires_ms <= now_ms:
            raise InvalidInput("an announcement must expire in the future")

        async def attempt() -> Result[Announcement]:
            v, room = await self._room(room_id)
            self._check(actor, Action.POST_ANNOUNCEMENT, room.department)
            ann = Announcement(new_id("a"), room_id, text, actor.user_id, now_ms, expires_ms)
            # Expire what has run out, keep the newest few, add the new one.
            kept = [a.expire() if a.state is AState.ACTIVE and not a.visible(now_ms) else a
                    for a in room.announcements][-(self.config.announcements_kept - 1):]
            room = room.with_announcements((*kept, ann))
            await self.store.commit([Put(ROOM, room_id, room.to_doc(), v)])
            return Result(ann, (entry(LogKind.QUEUE, f"Service announcement posted in {room.name} until "
                                      f"{format_time(expires_ms)}: {text}", None, now_ms, room_id=room_id,
                                      announcement_id=ann.announcement_id),))

        return await self._retry(attempt)

    async def withdraw_announcement(
        self, actor: Actor, room_id: str, announcement_id: str, *, now_ms: int
    ) -> Result[Announcement]:
        self._check_time(now_ms)

        async def attempt() -> Result[Announcement]:
            v, room = await self._room(room_id)
            self._check(actor, Action.POST_ANNOUNCEMENT, room.department)
            found = [a for a in room.announcements if a.announcement_id == announcement_id]
            if not found:
                raise NotFound("announcement", announcement_id)
            new = found[0].withdraw()
            room = room.with_announcements(tuple(new if a.announcement_id == announcement_id else a
                                                 for a in room.announcements))
            await self.store.commit([Put(ROOM, room_id, room.to_doc(), v)])
            return Result(new, (entry(LogKind.QUEUE, f"Service announcement withdrawn in {room.name}.", None,
                                      now_ms, room_id=room_id, announcement_id=announcement_id),))

        return await self._retry(attempt)

    async def announcements(self, actor: Actor, room_id: str, *, now_ms: int) -> list[Announcement]:
        """What patients waiting in the room see now (patients only for the room they wait in)."""
        _, room = await self._room(room_id)
        patient_ref: str | None = None
        if actor.role is Role.PATIENT:
            _, _, waiting_room_id = await self._patient_index(actor.user_id)
            patient_ref = actor.user_id if waiting_room_id == room_id else None
        self._check(actor, Action.VIEW_ANNOUNCEMENTS, room.department, patient_ref)
        return [a for a in room.announcements if a.visible(now_ms)]


def _with_acting_clinician(c: Consultation, actor: Actor) -> Consultation:
    """The consultation as seen by the pair channel: the acting clinician if none was admitted."""
    if c.admitted_by is None and c.clinician is None and actor.role is Role.CLINICIAN:
        return dataclasses.replace(c, clinician=actor.user_id)
    return c


def _call_started(arrival: waiting_room.Arrival, c: Consultation, clinician: str, now_ms: int) -> BackofficeEntry:
    """Who started the call being admitted: a walk-in patient called the clinic (answered now);
    otherwise the clinician called the booked patient in."""
    if arrival is waiting_room.Arrival.WALK_IN:
        return entry(LogKind.PATIENT_TO_DOCTOR_CALL, f"Patient {c.patient_ref} called without a booking and was "
                     f"answered by clinician {clinician}.", c.session_id, now_ms, patient=c.patient_ref,
                     clinician=clinician)
    return entry(LogKind.DOCTOR_TO_PATIENT_CALL, f"Clinician {clinician} called patient {c.patient_ref} into the "
                 f"video consultation.", c.session_id, now_ms, patient=c.patient_ref, clinician=clinician)
