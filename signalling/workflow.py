"""The clinical workflow at the edge: wire messages for its live parts, pushed events, and the
back-office entries of every transition written to the session's event log.

``rooms.service.WorkflowService`` decides; this module only wires it:

- the actor comes from the connection's verified token (role, ``sub``, ``departments``; a
  patient's consultation, waiting room and link token come from their join link's claims);
- time is read here (the service never reads a clock);
- every command's :class:`~rooms.backoffice.BackofficeEntry` items are written to the event log,
  under the consultation's session id (or ``room:<waiting room>`` for entries about a room);
- after a change, the people concerned are told: clinicians watching a waiting room get
  ``queueUpdated``, waiting patients ``positionChanged`` / ``announcement`` / ``admitted``,
  everyone in a consultation's media room ``consultationChanged``, a chat's members ``chatMessage``.

Guests (a relative, an interpreter; role ``guest``) are added by the clinician over the wire
(``consultation.invite_guest``) or by the booking API: each gets a link of their own for the
consultation's room, valid in the consultation's window. They join the call and nothing else: every
workflow message is refused to them and no workflow push reaches them. Removing a guest revokes the
link and takes them out of the call (``forceDisconnected``).

A consultation's session id doubles as the name of its media room: the patient's link token is
for that room, so the patient joins it at once and waits there (nobody else is in it); on admit the
clinician gets a token for the same room. The HTTP API (``signalling.staff_api``) calls the same
methods, so a change made over HTTP is pushed the same way.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any, Final, TypeVar

from metrics.audit import DAY_MS, AuditLog
from metrics.eventlog import EventStore
from metrics.events import LogEntry, room_session_id
from metrics.recorder import Recorder
from rooms.announcement import Announcement
from rooms.backoffice import BackofficeEntry, LogKind, format_time
from rooms.backoffice import entry as backoffice_entry
from rooms.chat import (
    ChannelKind,
    ChatChannel,
    ChatMessage,
    Retention,
    RetentionKind,
    consultation_channel_id,
)
from rooms.consultation import Consultation, Guest
from rooms.directory import LocalDirectory, Notice, RoomDirectory
from rooms.consultation import State as CState
from rooms.errors import InvalidToken, NotFound, RoomsError, TooEarly, TooLate
from rooms.model import Role, SessionId, new_id
from rooms.permissions import Actor
from rooms.service import (
    CHANNEL,
    MINUTE_MS,
    QueuedPatient,
    Result,
    WorkflowConfig,
    WorkflowService,
)
from rooms.store import Store
from rooms.waiting_room import Devices, DeviceState, QueueEntry
from rooms.waiting_room import State as QState
from signalling.auth import Claims, TokenAuthority
from signalling.codec import event
from signalling.config import RetentionSettings, WorkflowSettings
from signalling.errors import Forbidden, InvalidMessage, InvalidState
from signalling.hub import Client, Hub

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The edge's own reads (queue pushes) act as an organisation admin: they see every room.
SYSTEM: Final = Actor(Role.ORGANISATION_ADMIN, "system")
#: How long the media-room token handed to an admitting clinician is valid.
MEDIA_TOKEN_TTL_S: Final = 4 * 3600
#: The display name of a walk-in patient who gave none.
WALK_IN_NAME: Final = "Walk-in patient"

Handler = Callable[[Client, dict[str, Any]], Awaitable[dict[str, Any]]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def workflow_config(settings: WorkflowSettings) -> WorkflowConfig:
    """The service's config from the ``[workflow]`` table."""
    kind = RetentionKind(settings.chat_retention)
    return WorkflowConfig(
        strict_departments=settings.strict_departments,
        no_show_grace_ms=settings.no_show_grace_min * MINUTE_MS,
        on_time_window_ms=settings.on_time_window_min * MINUTE_MS,
        link_valid_before_ms=settings.link_valid_before_min * MINUTE_MS,
        link_valid_after_ms=settings.link_valid_after_min * MINUTE_MS,
        chat_max_bytes=settings.chat_max_bytes,
        retention=Retention(kind, settings.chat_retention_days if kind is RetentionKind.DELETE_AFTER_DAYS else 0),
    )


def actor_of(claims: Claims) -> Actor:
    """The workflow's actor for a verified token: a patient acts on the consultation their link was
    issued for (its ``consultation`` claim). Demo tokens have no workflow identity: refused."""
    if claims.demo:
        raise Forbidden("a demo token may only join a media room; it may not use the clinical workflow")
    return Actor(claims.role, claims.sub, frozenset(claims.departments), claims.consultation)


# --- wire shapes ------------------------------------------------------------------------------


def consultation_json(c: Consultation) -> dict[str, Any]:
    """A consultation as clients and the API see it: never the link token."""
    doc = c.to_doc()
    doc.pop("link_token", None)
    doc["channel_id"] = consultation_channel_id(c.session_id)
    return doc


def guest_json(g: Guest) -> dict[str, Any]:
    return {"guest_id": g.guest_id, "name": g.name, "invited_by": g.invited_by, "invited_ms": g.invited_ms,
            "removed_ms": g.removed_ms, "removed_by": g.removed_by}


def queued_json(q: QueuedPatient) -> dict[str, Any]:
    return {"position": q.position, "session_id": q.session_id, "patient_ref": q.patient_ref,
            "patient_name": q.patient_name, "arrival": q.arrival.value, "entered_ms": q.entered_ms,
            "waiting_ms": q.waiting_ms, "appointment_ms": q.appointment_ms, "devices": devices_json(q.devices)}


def devices_json(d: Devices) -> dict[str, Any]:
    """The device check as the queue shows it: each device's state, ``media`` (audio_video /
    audio_only / video_only / none / unknown) and ``problems`` in plain words ("camera denied")."""
    return {**d.to_doc(), "media": d.media, "problems": list(d.problems)}


def devices_of(msg: dict[str, Any]) -> Devices | None:
    """``waiting_room.enter``'s ``devices`` (schema-checked: known states only), or None if absent."""
    given = msg.get("devices")
    if not isinstance(given, dict):
        return None
    return Devices(DeviceState(given.get("camera", "unknown")), DeviceState(given.get("microphone", "unknown")))


def queue_entry_json(qe: QueueEntry) -> dict[str, Any]:
    return qe.to_doc()


def announcement_json(a: Announcement) -> dict[str, Any]:
    return {"announcement_id": a.announcement_id, "room_id": a.room_id, "text": a.text, "author": a.author,
            "posted_ms": a.posted_ms, "expires_ms": a.expires_ms, "state": a.state.value}


def message_json(m: ChatMessage) -> dict[str, Any]:
    return m.to_doc()


def log_entry(e: BackofficeEntry) -> LogEntry:
    """A back-office entry as an event-log entry; kind is Consultation/Queue/VideoSession/Chat."""
    room = e.payload.get("room_id")
    session = e.session_id or room_session_id(room if isinstance(room, str) else None)
    return LogEntry(time_ms=e.time_ms, session_id=session, kind=str(e.kind), text=e.text, payload=dict(e.payload))


class Workflow:
    """The workflow service plus who to tell: one per node."""

    def __init__(self, service: WorkflowService, hub: Hub, recorder: Recorder, tokens: TokenAuthority) -> None:
        self.service = service
        self.hub = hub
        self.recorder = recorder
        self.tokens = tokens
        self.watchers: dict[str, weakref.WeakSet[Client]] = {}
        self.handlers: Final[Mapping[str, Handler]] = {
            "waiting_room.enter": self._enter,
            "waiting_room.leave": self._leave,
            "queue.watch": self._watch,
            "queue.unwatch": self._unwatch,
            "consultation.admit": self._admit,
            "consultation.transfer": self._transfer,
            "consultation.end": self._end,
            "consultation.complete": self._complete,
            "consultation.phone_fallback": self._phone_fallback,
            "consultation.journal": self._journal,
            "queue.remove": self._remove,
            "consultation.get": self._get,
            "chat.send": self._chat_send,
            "chat.history": self._chat_history,
            "announcement.post": self._announce,
            "announcement.withdraw": self._withdraw,
            "consultation.invite_guest": self._invite_guest,
            "consultation.remove_guest": self._remove_guest,
        }
        self.retention: RetentionJob | None = None
        self.walk_in_limiter = WalkInLimiter(WorkflowSettings.walk_in_per_link_per_min)
        #: Where pushes go (every node holding a recipient's socket) and the walk-in count lives;
        #: ``signalling.app`` sets the cluster's one when ``redis_url`` is set.
        self.directory: RoomDirectory = LocalDirectory()
        #: The base of the links handed out (``workflow.public_url``); empty: links are relative.
        self.public_url = ""
        hub.guest_check = self.check_guest

    @classmethod
    def from_settings(cls, store: Store, settings: WorkflowSettings, hub: Hub, recorder: Recorder,
                      tokens: TokenAuthority, data: DataRetention | None = None,
                      directory: RoomDirectory | None = None) -> Workflow:
        workflow = cls(WorkflowService(store, workflow_config(settings)), hub, recorder, tokens)
        if directory is not None:
            workflow.directory = directory
        period = settings.retention_sweep_s
        workflow.retention = RetentionJob(
            workflow.service, workflow.record, period, data=data,
            lock=lambda: workflow.directory.job_lock("retention", max(1.0, period * 0.9), release=False))
        workflow.walk_in_limiter = WalkInLimiter(settings.walk_in_per_link_per_min)
        workflow.public_url = settings.public_url.rstrip("/")
        return workflow

    def start(self) -> None:
        """Start the scheduled jobs (the chat retention sweep)."""
        if self.retention is not None:
            self.retention.start()

    async def stop_jobs(self) -> None:
        """Stop the scheduled jobs; a run in progress is let finish (up to a few seconds)."""
        if self.retention is not None:
            await self.retention.stop()

    async def handle(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        """One validated workflow request from a joined connection."""
        if client.claims is None:
            raise InvalidState("join the session first")
        if client.claims.demo:
            raise Forbidden("a demo token may only join a media room; it may not use the clinical workflow")
        if client.claims.role is Role.GUEST:
            raise Forbidden("a guest may only take part in the consultation's call; it may not use the clinical workflow")
        return await self.handlers[msg["type"]](client, msg)

    def forget(self, client: Client) -> None:
        """The connection is gone: it watches nothing any more."""
        for watchers in self.watchers.values():
            watchers.discard(client)

    # --- commands shared by the wire and the HTTP API -------------------------------------------

    async def record(self, result: Result[T], changed: Consultation | None = None) -> T:
        """Write a command's entries to the event log, then tell whoever is concerned."""
        for entry in result.entries:
            self.recorder.entry(log_entry(entry))
        rooms: set[str] = set()
        for entry in result.entries:
            for key in ("room_id", "from_room", "to_room"):
                value = entry.payload.get(key)
                if isinstance(value, str):
                    rooms.add(value)
        await self.push_queues(rooms)
        if changed is not None:
            await self.notify("consultationChanged", {"consultation": consultation_json(changed)},
                              room=changed.session_id)
        return result.value

    async def push_queues(self, room_ids: Iterable[str]) -> None:
        """Send each room's queue to its watchers and each waiting patient their place."""
        now = now_ms()
        for room_id in sorted(room_ids):
            try:
                queue = await self.service.queue(SYSTEM, room_id, now_ms=now)
            except NotFound:
                continue
            lines = [queued_json(q) for q in queue]
            await self.notify("queueUpdated", {"room_id": room_id, "queue": lines}, watchers=room_id)
            for q in queue:
                await self.notify("positionChanged", {"session_id": q.session_id, "room_id": room_id,
                                                      "position": q.position}, patients=[q.session_id])

    async def announce(self, actor: Actor, room_id: str, text: str, expires_in_s: int) -> Announcement:
        now = now_ms()
        ann = await self.record(await self.service.post_announcement(
            actor, room_id, text=text, expires_ms=now + expires_in_s * 1000, now_ms=now))
        room = await self.service.waiting_room(SYSTEM, room_id)
        await self.notify("announcement", {"announcement": announcement_json(ann)}, watchers=room_id,
                          patients=list(room.waiting))
        return ann

    async def stop(self, actor: Actor, session_id: str, how: str) -> Consultation:
        """Cancel or mark as no-show (HTTP); a waiting patient is taken out of the queue."""
        now = now_ms()
        sid = SessionId(session_id)
        if how == "cancel":
            result = await self.service.cancel(actor, sid, now_ms=now)
        else:
            result = await self.service.no_show(actor, sid, now_ms=now)
        return await self.record(result, changed=result.value)

    async def step(self, actor: Actor, session_id: str, name: str) -> Consultation:
        """A consultation step by name (``journal``, ``complete``, ``end``) for the HTTP API."""
        steps: Mapping[str, Callable[..., Awaitable[Result[Consultation]]]] = {
            "journal": self.service.journal, "complete": self.service.complete, "end": self.service.end}
        result = await steps[name](actor, SessionId(session_id), now_ms=now_ms())
        return await self.record(result, changed=result.value)

    async def remove(self, actor: Actor, session_id: str) -> QueueEntry:
        """Staff take a waiting patient out of the queue: watchers get the new queue, the patient
        ``removedFromQueue`` (a booked patient's link still works; a walk-in's consultation ends)."""
        sid = SessionId(session_id)
        result = await self.service.remove(actor, sid, now_ms=now_ms())
        qe = result.value
        changed = await self.service.consultation(SYSTEM, sid)
        await self.record(result, changed=changed)
        seg = qe.current
        await self.notify("removedFromQueue", {"session_id": sid, "room_id": seg.room_id,
                                               "removed_ms": qe.removed_ms or 0}, patients=[sid])
        return qe

    async def withdraw(self, actor: Actor, room_id: str, announcement_id: str) -> Announcement:
        """Withdraw an announcement: waiting patients and watchers get it again with state ``withdrawn``."""
        ann = await self.record(await self.service.withdraw_announcement(actor, room_id, announcement_id,
                                                                         now_ms=now_ms()))
        room = await self.service.waiting_room(SYSTEM, room_id)
        await self.notify("announcement", {"announcement": announcement_json(ann)}, watchers=room_id,
                          patients=list(room.waiting))
        return ann

    async def walk_in(self, room_id: str, patient_name: str | None) -> tuple[Consultation, QueueEntry]:
        """A patient with a walk-in link arrives: a new patient ref, a consultation without a booking
        (``appointment_ms`` null) with the name they gave, and a place in the room's queue (arrival
        ``walk_in``)."""
        now = now_ms()
        patient_ref = new_id("walkin")
        actor = Actor(Role.PATIENT, patient_ref)
        room = await self.service.waiting_room(SYSTEM, room_id)
        result = await self.service.walk_in(actor, room_id=room_id, now_ms=now, patient_ref=patient_ref,
                                            patient_name=patient_name)
        qe = result.value
        c = await self.service.consultation(SYSTEM, qe.session_id)
        created = backoffice_entry(LogKind.CONSULTATION, f"Walk-in consultation (no booking) started by patient {patient_ref} "
                        f"({patient_name or WALK_IN_NAME}) in waiting room {room.name}.", qe.session_id, now,
                        patient=patient_ref, department=c.department, walk_in=True)
        await self.record(Result(qe, (created, *result.entries)))
        return c, qe

    def walk_in_link_issued(self, actor: Actor, room_id: str, room_name: str, token_preview: str,
                            valid_until_ms: int) -> BackofficeEntry:
        """The back-office entry for a walk-in link: who issued it, until when, never the whole token."""
        return backoffice_entry(LogKind.QUEUE, f"Walk-in link for waiting room {room_name} issued by {actor.user_id} "
                     f"with token {token_preview}, valid until {format_time(valid_until_ms)}.", None, now_ms(),
                     room_id=room_id, by=actor.user_id, valid_until_ms=valid_until_ms)

    async def invite_guest(self, actor: Actor, session_id: str, name: str) -> dict[str, Any]:
        """Add a guest: their own link (role ``guest``, the consultation's room and session id),
        valid in the consultation's window. The answer of the wire message and the HTTP route."""
        now = now_ms()
        sid = SessionId(session_id)
        c = await self.service.consultation(actor, sid)
        nbf_ms, exp_ms = self.service.guest_window(c, now, MEDIA_TOKEN_TTL_S * 1000)
        c, guest = await self.record(await self.service.invite_guest(actor, sid, name=name, now_ms=now))
        nbf, exp = nbf_ms // 1000, exp_ms // 1000
        token = self.tokens.mint(sid, Role.GUEST, guest.name, sub=guest.guest_id, not_before=nbf, expires=exp,
                                 consultation=sid, link=guest.guest_id)
        return {"consultation": consultation_json(c), "guest": guest_json(guest), "guest_token": token,
                "guest_link": f"{self.public_url}/#token={token}", "valid_from_ms": nbf * 1000,
                "valid_until_ms": exp * 1000}

    async def remove_guest(self, actor: Actor, session_id: str, guest_id: str) -> dict[str, Any]:
        """Revoke a guest's link and take them out of the call (``forceDisconnected``)."""
        sid = SessionId(session_id)
        c, guest = await self.record(await self.service.remove_guest(actor, sid, guest_id, now_ms=now_ms()))
        for client in list(self.hub.clients.values()):
            claims = client.claims
            if (claims is not None and claims.role is Role.GUEST and claims.consultation == sid
                    and claims.link == guest_id):
                await self.hub.kick(client, f"guest removed by {actor.user_id}")
        return {"consultation": consultation_json(c), "guest": guest_json(guest)}

    async def check_guest(self, claims: Claims) -> Guest:
        """The hub's door check for a guest link (see ``Hub.guest_check``)."""
        assert claims.consultation is not None and claims.link is not None
        return await self.service.check_guest(SessionId(claims.consultation), claims.link)

    # --- wire handlers --------------------------------------------------------------------------

    def _patient_link(self, client: Client) -> tuple[Claims, SessionId]:
        claims = client.claims
        assert claims is not None
        if claims.role is not Role.PATIENT:
            raise Forbidden(f'only a patient enters or leaves a waiting room, not a {claims.role}')
        if claims.consultation is None:
            raise InvalidState("this connection did not join with a consultation link")
        return claims, SessionId(claims.consultation)

    async def _enter(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        """The patient opened their link: ready and in line, or still in line. The device check
        only advises: ``devices`` (what it found) is shown in the clinician's queue."""
        claims, sid = self._patient_link(client)
        devices = devices_of(msg)
        if claims.waiting_room is None:
            raise InvalidState("this consultation link names no waiting room")
        actor = actor_of(claims)
        now = now_ms()
        qe = await self.service.queue_entry(actor, sid)
        c = await self.service.consultation(actor, sid)
        if qe.state is not QState.WAITING:
            if c.state is CState.INVITED:
                try:
                    ready = await self.service.patient_ready(actor, sid, token=claims.link or "", now_ms=now)
                except (TooEarly, TooLate, InvalidToken) as exc:
                    # The consultation's own session shows why its link was refused.
                    self.recorder.link_refused(sid, str(exc.code), exc.message, connection_id=(
                        client.connection.connection_id if client.connection is not None else None))
                    raise
                await self.record(ready, changed=ready.value)
            qe = await self.record(await self.service.enter_waiting_room(actor, sid, room_id=claims.waiting_room,
                                                                         now_ms=now, devices=devices))
        elif devices is not None:
            qe = await self.record(await self.service.report_devices(actor, sid, devices, now_ms=now))
        room_id = qe.room_id or claims.waiting_room
        return {
            "session_id": sid, "room_id": room_id, "channel_id": consultation_channel_id(sid),
            "arrival": qe.current.arrival.value, "entered_ms": qe.current.entered_ms,
            "appointment_ms": c.appointment_ms,
            "position": await self.service.position(actor, sid),
            "announcements": [announcement_json(a) for a in
                              await self.service.announcements(actor, room_id, now_ms=now)],
        }

    async def _leave(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        """The patient gives up before being admitted (abandoned, with the time waited)."""
        claims, sid = self._patient_link(client)
        qe = await self.record(await self.service.abandon(actor_of(claims), sid, now_ms=now_ms()))
        seg = qe.current
        return {"session_id": sid, "abandoned_ms": qe.abandoned_ms, "waited_ms": seg.waited_ms}

    async def _watch(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        assert client.claims is not None
        room_id = msg["room_id"]
        actor, now = actor_of(client.claims), now_ms()
        queue = await self.service.queue(actor, room_id, now_ms=now)
        announcements = await self.service.announcements(actor, room_id, now_ms=now)
        self.watchers.setdefault(room_id, weakref.WeakSet()).add(client)
        return {"room_id": room_id, "queue": [queued_json(q) for q in queue],
                "announcements": [announcement_json(a) for a in announcements]}

    async def _unwatch(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        self.watchers.get(msg["room_id"], weakref.WeakSet()).discard(client)
        return {}

    async def _admit(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        """The clinician admits a waiting patient; both meet in the consultation's media room."""
        claims = client.claims
        assert claims is not None
        sid = SessionId(msg["session_id"])
        result = await self.service.admit(actor_of(claims), sid, now_ms=now_ms(), video_session_id=sid)
        c = await self.record(result, changed=result.value)
        await self.notify("admitted", {"session_id": sid, "room": sid}, patients=[sid])
        token = self.tokens.mint(sid, Role.CLINICIAN, claims.name, sub=claims.sub, ttl_s=MEDIA_TOKEN_TTL_S,
                                 departments=claims.departments, consultation=sid)
        return {"consultation": consultation_json(c), "room": sid, "token": token}

    async def _transfer(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        assert client.claims is not None
        sid = SessionId(msg["session_id"])
        qe = await self.record(await self.service.transfer(actor_of(client.claims), sid, to_room_id=msg["to_room_id"],
                                                           now_ms=now_ms()))
        return {"session_id": sid, "room_id": qe.room_id, "segment": len(qe.segments),
                "position": await self.service.position(SYSTEM, sid)}

    async def _get(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        """A consultation's record (state, appointment, times), e.g. for a page that was reloaded.
        A patient reads only the consultation of their link (its ``consultation`` claim); staff
        read per the permission table. ``session_id`` defaults to the token's consultation."""
        claims = client.claims
        assert claims is not None
        asked = msg.get("session_id")
        sid = asked if asked is not None else claims.consultation
        if sid is None:
            raise InvalidMessage('"session_id" is required: this connection\'s token names no consultation')
        if claims.role is Role.PATIENT and sid != claims.consultation:
            raise Forbidden("a patient may read only the consultation of their own link")
        c = await self.service.consultation(actor_of(claims), SessionId(sid))
        return {"consultation": consultation_json(c)}

    async def _consultation_step(self, client: Client, msg: dict[str, Any],
                                 step: Callable[..., Awaitable[Result[Consultation]]]) -> dict[str, Any]:
        assert client.claims is not None
        result = await step(actor_of(client.claims), SessionId(msg["session_id"]), now_ms=now_ms())
        return {"consultation": consultation_json(await self.record(result, changed=result.value))}

    async def _end(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        return await self._consultation_step(client, msg, self.service.end)

    async def _complete(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        return await self._consultation_step(client, msg, self.service.complete)

    async def _phone_fallback(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        return await self._consultation_step(client, msg, self.service.phone_fallback)

    async def _journal(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        return await self._consultation_step(client, msg, self.service.journal)

    async def _remove(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        assert client.claims is not None
        qe = await self.remove(actor_of(client.claims), msg["session_id"])
        seg = qe.current
        return {"session_id": qe.session_id, "room_id": seg.room_id, "removed_ms": qe.removed_ms,
                "waited_ms": seg.waited_ms}

    async def _invite_guest(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        assert client.claims is not None
        return await self.invite_guest(actor_of(client.claims), msg["session_id"], msg["name"])

    async def _remove_guest(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        assert client.claims is not None
        return await self.remove_guest(actor_of(client.claims), msg["session_id"], msg["guest_id"])

    async def _chat_send(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        """Stored verbatim (HTML stays text); pushed to the channel's connected members."""
        assert client.claims is not None
        channel_id = msg["channel_id"]
        message = await self.record(await self.service.send_chat(actor_of(client.claims), channel_id, msg["text"],
                                                                 now_ms=now_ms()))
        await self._push_chat(channel_id, message, exclude=client)
        return {"message": message_json(message)}

    async def _chat_history(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        assert client.claims is not None
        messages = await self.service.chat_history(actor_of(client.claims), msg["channel_id"])
        return {"channel_id": msg["channel_id"], "messages": [message_json(m) for m in messages]}

    async def _announce(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        assert client.claims is not None
        ann = await self.announce(actor_of(client.claims), msg["room_id"], msg["text"], msg.get("expires_in_s", 3600))
        return {"announcement": announcement_json(ann)}

    async def _withdraw(self, client: Client, msg: dict[str, Any]) -> dict[str, Any]:
        assert client.claims is not None
        ann = await self.withdraw(actor_of(client.claims), msg["room_id"], msg["announcement_id"])
        return {"announcement": announcement_json(ann)}

    # --- who to tell ----------------------------------------------------------------------------

    async def _push_chat(self, channel_id: str, message: ChatMessage, exclude: Client) -> None:
        doc = await self.service.store.get(CHANNEL, channel_id)
        if doc is None:
            return
        ch = ChatChannel.from_doc(doc.body)
        clinicians = {ch.clinician} - {None}
        if ch.kind is ChannelKind.CONSULTATION and ch.session_id is not None:
            try:
                c = await self.service.consultation(SYSTEM, ch.session_id)
                clinicians |= {c.admitted_by} - {None}
            except NotFound:
                pass
        chat = {"session_id": ch.session_id, "patient_ref": ch.patient_ref,
                "clinicians": sorted(c for c in clinicians if c is not None)}
        room = ch.session_id if ch.kind is ChannelKind.CONSULTATION else None
        await self.notify("chatMessage", {"message": message_json(message)}, room=room, chat=chat, exclude=exclude)

    def _chat_targets(self, session_id: str | None, patient_ref: str | None, clinicians: set[str]) -> list[Client]:
        targets: list[Client] = []
        for other in self.hub.clients.values():
            claims = other.claims
            if claims is None:
                continue
            if claims.demo:
                continue
            # A patient hears a consultation's chat only on a token issued for that consultation.
            patient = (claims.role is Role.PATIENT and claims.sub == patient_ref
                       and (session_id is None or claims.consultation == session_id))
            if patient or (claims.role is Role.CLINICIAN and claims.sub in clinicians):
                targets.append(other)
        return targets

    # --- pushes across the cluster --------------------------------------------------------------

    async def notify(self, name: str, data: dict[str, Any], *, watchers: str | None = None,
                     patients: Iterable[str] = (), room: str | None = None, chat: dict[str, Any] | None = None,
                     exclude: Client | None = None) -> None:
        """Push event ``name`` to its recipients on every node: those watching queue ``watchers``,
        the patients joined to the rooms ``patients``, everyone (workflow) in ``room``, and a chat
        channel's members (``chat``: session_id, patient_ref, clinicians).
        This node delivers first (``exclude`` is skipped here); the directory carries the rest."""
        to = {"watchers": watchers, "patients": list(patients), "room": room, "chat": chat}
        notice = Notice(name, {"to": to, "data": data})
        self._deliver(notice, exclude)
        await self.directory.publish(notice)

    def deliver(self, notice: Notice) -> None:
        """Another node's notice: tell the recipients whose sockets this node holds."""
        self._deliver(notice, None)

    def _deliver(self, notice: Notice, exclude: Client | None) -> None:
        to = notice.data.get("to")
        data = notice.data.get("data")
        if not isinstance(to, dict) or not isinstance(data, dict):
            return
        targets: list[Client] = []
        watchers = to.get("watchers")
        if isinstance(watchers, str):
            targets.extend(self.watchers.get(watchers, ()))
        for sid in to.get("patients") or ():
            if isinstance(sid, str):
                targets.extend(self._patients_in_room(sid))
        room = to.get("room")
        if isinstance(room, str):
            targets.extend(self._in_room(room))
        chat = to.get("chat")
        if isinstance(chat, dict):
            sid, ref = chat.get("session_id"), chat.get("patient_ref")
            clinicians = {c for c in chat.get("clinicians") or () if isinstance(c, str)}
            targets.extend(self._chat_targets(sid if isinstance(sid, str) else None,
                                              ref if isinstance(ref, str) else None, clinicians))
        self._push((t for t in targets if t is not exclude), notice.kind, data)

    async def walk_in_wait(self, link_token: str) -> float | None:
        """Count one walk-in on this link (cluster-wide): None if allowed, else seconds to wait."""
        digest = hashlib.sha256(link_token.encode()).hexdigest()
        return await self.directory.rate_limit("walkin:" + digest, self.walk_in_limiter.per_minute)

    def _in_room(self, room: str) -> list[Client]:
        """Every client joined to the live media room ``room`` (a consultation's session id) that
        may hear of the workflow: demo tokens and guests never do."""
        session_id = self.hub.registry.by_room.get(room)
        session = None if session_id is None else self.hub.registry.sessions.get(session_id)
        if session is None:
            return []
        return [c for cid in list(session.connections)
                if (c := self.hub.clients.get(cid)) is not None and c.claims is not None and not c.claims.demo
                and c.claims.role is not Role.GUEST]

    def _patients_in_room(self, room: str) -> list[Client]:
        return [c for c in self._in_room(room) if c.claims is not None and c.claims.role is Role.PATIENT]

    @staticmethod
    def _push(clients: Iterable[Client], name: str, data: dict[str, Any]) -> None:
        message = event(name, data)
        seen: set[int] = set()
        for client in list(clients):
            if id(client) in seen:
                continue
            seen.add(id(client))
            client.send(message)


# --- walk-in rate limit ----------------------------------------------------------------------


class WalkInLimiter:
    """At most ``per_minute`` walk-ins per walk-in link in any 60 seconds (a sliding window).

    A shared link is published, so anyone holding it could fill a queue; this caps how fast. Links
    are told apart by a digest of their token (the token itself is not kept). ``clock`` gives
    monotonic seconds. The server counts through the room directory (``Workflow.walk_in_wait``:
    the same window, shared by every node with ``redis_url``); this class holds ``per_minute``.
    """

    WINDOW_S: Final = 60.0

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic, max_links: int = 10_000) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_links = max_links
        self._seen: dict[bytes, collections.deque[float]] = {}

    def acquire(self, link_token: str) -> float | None:
        """Count one walk-in for this link: None if allowed, else the seconds until the next is."""
        now = self.clock()
        key = hashlib.sha256(link_token.encode()).digest()
        times = self._seen.get(key)
        if times is None:
            if len(self._seen) >= self.max_links:
                self._prune(now)
            times = self._seen[key] = collections.deque()
        while times and times[0] <= now - self.WINDOW_S:
            times.popleft()
        if len(times) >= self.per_minute:
            return max(0.0, times[0] + self.WINDOW_S - now)
        times.append(now)
        return None

    def _prune(self, now: float) -> None:
        """Forget links without a walk-in inside the window (keeps the map bounded)."""
        for key in [k for k, t in self._seen.items() if not t or t[-1] <= now - self.WINDOW_S]:
            del self._seen[key]


# --- scheduled jobs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRun:
    """One run of a scheduled job, as its history shows it (success or failure per run)."""

    started_ms: int
    finished_ms: int
    duration_ms: float
    ok: bool
    deleted: int  # chat messages
    error: str | None = None
    #: The event-log and audit-log parts of the run (None when their policy keeps everything):
    #: ``{"policy", "before_ms", "deleted" | "anonymised"}``.
    eventlog: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DataRetention:
    """The ``[retention]`` policy for the event log (events, quality timeline, client stats:
    deleted or anonymised after ``eventlog_days``) and the audit log (deleted after
    ``audit_days``). A part whose days are 0 keeps everything."""

    eventlog: EventStore
    audit: AuditLog
    settings: RetentionSettings

    @property
    def enabled(self) -> bool:
        return self.settings.eventlog_days > 0 or self.settings.audit_days > 0

    def policy(self) -> dict[str, Any]:
        s = self.settings
        return {"eventlog_days": s.eventlog_days, "eventlog_policy": s.eventlog_policy, "audit_days": s.audit_days}

    async def run(self, now_ms: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """One run: what each part did, or None for a part that keeps everything."""
        s = self.settings
        events: dict[str, Any] | None = None
        audit: dict[str, Any] | None = None
        if s.eventlog_days > 0:
            before = now_ms - s.eventlog_days * DAY_MS
            await self.eventlog.flush(timeout=5)
            if s.eventlog_policy == "anonymise":
                events = {"policy": "anonymise", "before_ms": before,
                          "anonymised": await self.eventlog.anonymise_before(before)}
            else:
                events = {"policy": "delete", "before_ms": before, "deleted": await self.eventlog.delete_before(before)}
        if s.audit_days > 0:
            before = now_ms - s.audit_days * DAY_MS
            audit = {"policy": "delete", "before_ms": before,
                     "deleted": await asyncio.to_thread(self.audit.purge_sync, before, now_ms)}
        return events, audit


class RetentionJob:
    """The retention sweep, every ``period_s``: the chat's (``delete_after_days``: ``purge_chat``)
    and, when ``data`` is given and its policy is on, the event log's and the audit log's
    (:class:`DataRetention`).

    One task runs the sweeps one after another (a run starts ``period_s`` after the previous one
    ended, so runs never overlap; a lock also keeps a manual :meth:`run_once` from overlapping the
    loop). Each run is logged (deleted count and duration, or the error) and kept in a bounded
    history; its back-office entries go to the event log through ``record``. It only runs while
    the organisation's chat policy is ``delete_after_days`` or ``data`` is enabled. ``clock`` gives
    the time in UTC ms.
    """

    def __init__(self, service: WorkflowService, record: Callable[[Result[int]], Awaitable[object]],
                 period_s: float, *, clock: Callable[[], int] = now_ms, history: int = 100,
                 data: DataRetention | None = None,
                 lock: Callable[[], AbstractAsyncContextManager[int | None]] | None = None) -> None:
        self.service = service
        #: The cluster's run slot for a scheduled run (once per cluster per period); None: no cluster.
        self.lock = lock
        self.data = data
        self.record = record
        self.period_s = period_s
        self.clock = clock
        self.runs: collections.deque[JobRun] = collections.deque(maxlen=history)
        self.running = False
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def chat_enabled(self) -> bool:
        return self.service.config.retention.kind is RetentionKind.DELETE_AFTER_DAYS

    @property
    def enabled(self) -> bool:
        return self.chat_enabled or (self.data is not None and self.data.enabled)

    async def run_once(self) -> JobRun:
        async with self._lock:
            self.running = True
            started = self.clock()
            t0 = time.perf_counter()
            try:
                deleted = 0
                if self.chat_enabled:
                    result = await self.service.purge_chat(SYSTEM, now_ms=started)
                    await self.record(result)
                    deleted = result.value
                events, audit = (None, None) if self.data is None else await self.data.run(started)
            except Exception as exc:  # a failed run is recorded, the job goes on
                duration = (time.perf_counter() - t0) * 1000
                run = JobRun(started, self.clock(), round(duration, 3), False, 0, f"{type(exc).__name__}: {exc}")
                logger.exception("retention sweep failed after %.1f ms: %s", duration, run.error)
            else:
                duration = (time.perf_counter() - t0) * 1000
                run = JobRun(started, self.clock(), round(duration, 3), True, deleted, eventlog=events, audit=audit)
                if self.chat_enabled:
                    logger.info("chat retention sweep: deleted %d chat messages in %.1f ms", deleted, duration)
                if events is not None or audit is not None:
                    logger.info("event/audit log retention: event log %s, audit log %s (%.1f ms)", events, audit,
                                duration)
            finally:
                self.running = False
            self.runs.append(run)
            return run

    def start(self) -> None:
        """Run now, then every ``period_s``; does nothing unless the policy deletes after N days."""
        if self.enabled and self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="retention-sweep")

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            await self._scheduled_run()
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.period_s)
            except TimeoutError:
                pass

    async def _scheduled_run(self) -> None:
        """One scheduled run, unless another node of the cluster took this period's slot."""
        if self.lock is None:
            await self.run_once()
            return
        try:
            async with self.lock() as token:
                if token is None:
                    logger.debug("retention sweep: another node runs this period's")
                    return
                logger.info("retention sweep: this node runs it (fencing token %d)", token)
                await self.run_once()
        except RoomsError as exc:  # the cluster is unreachable: skip, the next period retries
            logger.warning("retention sweep skipped: %s", exc)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop after the run in progress (cancelled if it takes longer than ``timeout``)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(task, timeout=timeout)
        except TimeoutError:
            logger.warning("chat retention sweep did not stop within %.1f s; cancelled", timeout)

    def status(self) -> dict[str, Any]:
        """What ``GET /api/jobs/retention`` shows: the policy, the schedule and the runs, newest first."""
        retention = self.service.config.retention
        return {"job": "chat_retention", "enabled": self.enabled, "running": self.running,
                "period_s": self.period_s, "policy": {"kind": retention.kind.value, "days": retention.days},
                "data_policy": None if self.data is None else self.data.policy(),
                "runs": [r.to_json() for r in reversed(self.runs)]}
