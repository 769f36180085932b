"""The workflow service end to end on the memory store: states, entries, bad input."""

from __future__ import annotations

import pytest

from rooms import chat
from rooms.backoffice import BackofficeEntry, LogKind
from rooms.chat import Retention, RetentionKind
from rooms.consultation import State as C
from rooms.errors import RoomsError
from rooms.model import Role, SessionId
from rooms.permissions import Actor
from rooms.service import WorkflowConfig, WorkflowService
from rooms.store import MemoryStore
from rooms.waiting_room import Arrival, Outcome
from rooms.waiting_room import State as Q
from tests.rooms.scenario import (
    CARDIO,
    CLIN,
    CLIN2,
    MIN,
    ORG_ADMIN,
    PAT,
    PAT2,
    SUPPORT,
    T0,
    patient_of,
    rooms,
    waiting,
)


@pytest.fixture
async def svc() -> WorkflowService:
    s = WorkflowService(MemoryStore())
    await rooms(s)
    return s


def texts(result: object) -> list[str]:
    return [e.text for e in result.entries]  # type: ignore[attr-defined]


async def test_whole_booked_consultation(svc: WorkflowService) -> None:
    log: list[BackofficeEntry] = []
    r = await svc.book(CLIN, department=CARDIO, clinician="dr_hansen", patient_ref="p1",
                       appointment_ms=T0, now_ms=T0 - 86_400_000)
    sid = r.value.session_id
    log += r.entries
    r = await svc.invite(CLIN, sid, now_ms=T0 - 3_600_000)
    token = r.value.link_token
    assert token
    log += r.entries
    log += (await svc.patient_ready(PAT, sid, token=token, device_check_passed=True, now_ms=T0 - 3 * MIN)).entries
    log += (await svc.enter_waiting_room(PAT, sid, room_id="q_hansen", now_ms=T0 - 2 * MIN)).entries
    assert await svc.position(PAT, sid) == 1
    r2 = await svc.admit(CLIN, sid, now_ms=T0, video_session_id="v_1")
    log += r2.entries
    assert r2.value.state is C.IN_PROGRESS and r2.value.video_session_id == "v_1"
    r3 = await svc.end(CLIN, sid, now_ms=T0 + 65_080)
    log += r3.entries
    assert r3.value.duration_ms == 65_080
    log += (await svc.complete(CLIN, sid, now_ms=T0 + 70_000)).entries
    r4 = await svc.journal(CLIN, sid, now_ms=T0 + 80_000)
    log += r4.entries
    assert r4.value.state is C.JOURNAL_DONE
    assert all(e.session_id == sid for e in log)
    assert [e.kind for e in log] == [
        LogKind.CONSULTATION, LogKind.CONSULTATION, LogKind.CONSULTATION, LogKind.CONSULTATION,
        LogKind.QUEUE, LogKind.QUEUE, LogKind.VIDEO_SESSION, LogKind.CONSULTATION, LogKind.DOCTOR_TO_PATIENT_CALL,
        LogKind.CONSULTATION, LogKind.CALL_ENDED, LogKind.CONSULTATION, LogKind.CONSULTATION,
    ]
    t = [e.text for e in log]
    assert t[0] == "Booked a consultation at 2022-06-29 09:15:00 UTC."
    assert t[1].startswith("Join link sent to patient p1 with token ")
    assert t[3] == "Patient is ready. The patient has clicked the link and is now logged in."
    assert t[4] == "Patient was added to dr_hansen's queue by patient. Booked consultation (on time)."
    assert t[6] == ("Video session id (v_1) has been created for video consultation between "
                    "patient p1 and clinician dr_hansen.")
    assert t[7] == "Video consultation is in progress between patient p1 and clinician dr_hansen."
    assert t[8] == "Clinician dr_hansen called patient p1 into the video consultation."
    assert t[9].startswith("Video consultation between patient and clinician has ended and lasted 65.08 seconds.")
    assert t[10] == ("Call ended at 2022-06-29 09:16:05 UTC and lasted 65.08 seconds. "
                     "Patient: p1 Clinician: dr_hansen.")
    assert t[11] == "Consultation completed, waiting for journal."
    assert log[9].payload["duration_ms"] == log[10].payload["duration_ms"] == 65_080


async def test_walk_in_and_announcements(svc: WorkflowService) -> None:
    r = await svc.walk_in(PAT, room_id="cardio", now_ms=T0)
    assert texts(r) == ["Patient was added to the queue by patient (walk-in)."]
    assert r.value.current.arrival is Arrival.WALK_IN
    ann = (await svc.post_announcement(CLIN, "cardio", text="Running 10 minutes late", expires_ms=T0 + 10 * MIN,
                                       now_ms=T0)).value
    assert [a.text for a in await svc.announcements(PAT, "cardio", now_ms=T0 + MIN)] == ["Running 10 minutes late"]
    assert await svc.announcements(PAT, "cardio", now_ms=T0 + 10 * MIN) == []
    with pytest.raises(RoomsError) as err:  # p2 is not waiting in cardio
        await svc.announcements(PAT2, "cardio", now_ms=T0)
    assert err.value.code == "forbidden"
    await svc.withdraw_announcement(CLIN, "cardio", ann.announcement_id, now_ms=T0 + MIN)
    assert await svc.announcements(PAT, "cardio", now_ms=T0 + 2 * MIN) == []


async def test_patient_names_are_kept_with_the_consultation_and_shown_in_the_queue(svc: WorkflowService) -> None:
    booked = (await svc.book(CLIN, department=CARDIO, clinician=None, patient_ref="p1", appointment_ms=T0,
                             now_ms=T0 - MIN, patient_name="  Anna Berg ")).value
    assert booked.patient_name == "Anna Berg"  # trimmed
    token = (await svc.invite(CLIN, booked.session_id, now_ms=T0 - MIN)).value.link_token
    assert token
    await svc.patient_ready(PAT, booked.session_id, token=token, device_check_passed=True, now_ms=T0)
    await svc.enter_waiting_room(PAT, booked.session_id, room_id="cardio", now_ms=T0)
    await svc.walk_in(PAT2, room_id="cardio", now_ms=T0, patient_name="Eva")
    await svc.walk_in(Actor(Role.PATIENT, "p3"), room_id="cardio", now_ms=T0)  # gave no name
    queue = await svc.queue(CLIN, "cardio", now_ms=T0)
    assert [(q.patient_ref, q.patient_name) for q in queue] == [("p1", "Anna Berg"), ("p2", "Eva"), ("p3", None)]
    # The name survives every later write of the record.
    done = (await svc.admit(CLIN, booked.session_id, now_ms=T0 + MIN)).value
    assert done.patient_name == "Anna Berg"
    assert (await svc.consultation(ORG_ADMIN, booked.session_id)).patient_name == "Anna Berg"
    for bad in ("x" * 81, 42):
        with pytest.raises(RoomsError) as err:
            await svc.book(CLIN, department=CARDIO, clinician=None, patient_ref="p9", appointment_ms=T0,
                           now_ms=T0, patient_name=bad)  # type: ignore[arg-type]
        assert err.value.code == "invalid_input"


async def test_arrival_classification(svc: WorkflowService) -> None:
    from tests.rooms.scenario import ready

    for patient, at, expected in [("e", T0 - 20 * MIN, Arrival.EARLY), ("o", T0 + 4 * MIN, Arrival.ON_TIME),
                                  ("l", T0 + 30 * MIN, Arrival.LATE)]:
        sid = await ready(svc, patient)
        qe = (await svc.enter_waiting_room(Actor(Role.PATIENT, patient), sid, room_id="cardio", now_ms=at)).value
        assert qe.current.arrival is expected
    assert [q.patient_ref for q in await svc.queue(CLIN, "cardio", now_ms=T0)] == ["e", "o", "l"]
    assert [q.position for q in await svc.queue(SUPPORT, "cardio", now_ms=T0)] == [1, 2, 3]


async def test_abandon_records_wait_and_positions_move(svc: WorkflowService) -> None:
    s1 = await waiting(svc, "p1")
    s2 = await waiting(svc, "p2")
    assert await svc.position(PAT2, s2) == 2
    r = await svc.abandon(PAT, s1, now_ms=T0 + 4 * MIN)
    assert r.value.state is Q.ABANDONED and r.value.abandoned_ms == T0 + 4 * MIN
    assert r.value.current.waited_ms == 5 * MIN
    assert "after waiting 300.00 seconds" in r.entries[0].text
    assert await svc.position(PAT2, s2) == 1
    assert (await svc.consultation(PAT, s1)).state is C.INVITED
    # The patient comes back through the link and queues again: a new segment.
    c = await svc.consultation(PAT, s1)
    assert c.link_token
    await svc.patient_ready(PAT, s1, token=c.link_token, device_check_passed=True, now_ms=T0 + 5 * MIN)
    qe = (await svc.enter_waiting_room(PAT, s1, room_id="cardio", now_ms=T0 + 5 * MIN)).value
    assert [s.outcome for s in qe.segments] == [Outcome.ABANDONED, None]
    assert await svc.position(PAT, s1) == 2


async def test_transfer_keeps_session_and_records_segments(svc: WorkflowService) -> None:
    sid = await waiting(svc, "p1")
    r = await svc.transfer(CLIN, sid, to_room_id="derma", now_ms=T0 + MIN)
    assert r.value.session_id == sid and r.value.room_id == "derma"
    assert [(s.room_id, s.department, s.outcome) for s in r.value.segments] == [
        ("cardio", CARDIO, Outcome.TRANSFERRED), ("derma", "dermatology", None)]
    assert r.entries[0].text == "Patient was transferred from Cardiology to Dermatology by clinician."
    assert (await svc.waiting_room(ORG_ADMIN, "cardio")).waiting == ()
    assert (await svc.waiting_room(ORG_ADMIN, "derma")).waiting == (sid,)


async def test_remove_and_no_show_and_cancel(svc: WorkflowService) -> None:
    sid = await waiting(svc, "p1")
    r = await svc.remove(CLIN, sid, now_ms=T0)
    assert r.value.state is Q.REMOVED
    assert r.entries[0].text == "Patient was removed from the queue Cardiology by clinician."
    b = (await svc.book(CLIN, department=CARDIO, clinician=None, patient_ref="p9", appointment_ms=T0, now_ms=T0 - MIN)).value
    with pytest.raises(RoomsError) as err:
        await svc.no_show(CLIN, b.session_id, now_ms=T0 + 14 * MIN)
    assert err.value.code == "too_early"
    assert (await svc.no_show(CLIN, b.session_id, now_ms=T0 + 15 * MIN)).value.state is C.NO_SHOW
    ch = await svc.chat_channel(CLIN, chat.consultation_channel_id(b.session_id))
    assert ch.state is chat.State.CLOSED
    b2 = (await svc.book(CLIN, department=CARDIO, clinician=None, patient_ref="p8", appointment_ms=T0, now_ms=T0)).value
    assert (await svc.cancel(Actor(Role.PATIENT, "p8"), b2.session_id, now_ms=T0)).value.state is C.CANCELLED


async def test_phone_fallback_with_and_without_video(svc: WorkflowService) -> None:
    s1 = await waiting(svc, "p1")
    r = await svc.phone_fallback(CLIN, s1, now_ms=T0)
    assert r.entries[-1].text == "Video consultation ended as phone consultation. Clinician: dr_hansen Patient: p1 VideoSessionId: "
    assert r.entries[-1].kind is LogKind.VIDEO_SESSION
    assert (await svc.waiting_room(CLIN, "cardio")).waiting == ()  # taken out of the queue too
    s2 = await waiting(svc, "p2")
    await svc.admit(CLIN, s2, now_ms=T0, video_session_id="v_9")
    r = await svc.phone_fallback(CLIN, s2, now_ms=T0 + 30_000)
    assert r.value.video_session_id == "v_9" and r.value.duration_ms == 30_000
    assert r.entries[-1].text.endswith("VideoSessionId: v_9")
    c = (await svc.complete(CLIN, s2, now_ms=T0 + MIN)).value
    assert c.state is C.COMPLETED and c.ended_ms is not None


async def test_chat_before_during_after_and_verbatim_html(svc: WorkflowService) -> None:
    sid = await waiting(svc, "p1")
    cid = chat.consultation_channel_id(sid)
    evil = "<script>alert('x')</script><b>hi</b> &amp;"
    r = await svc.send_chat(patient_of(cid), cid, evil, now_ms=T0)
    assert r.entries[0].kind is LogKind.CHAT and evil not in r.entries[0].text
    assert "text" not in r.entries[0].payload
    await svc.admit(CLIN, sid, now_ms=T0 + MIN)
    await svc.send_chat(CLIN, cid, "during", now_ms=T0 + 2 * MIN)
    await svc.end(CLIN, sid, now_ms=T0 + 3 * MIN)
    await svc.send_chat(patient_of(cid), cid, "after", now_ms=T0 + 4 * MIN)
    hist = await svc.chat_history(CLIN, cid)
    assert [(m.text, m.phase) for m in hist] == [
        (evil, chat.State.BEFORE_CALL), ("during", chat.State.IN_CALL), ("after", chat.State.AFTER_CALL)]
    pair = chat.pair_channel_id("p1", "dr_hansen")
    await svc.send_chat(patient_of(cid), pair, "follow-up question", now_ms=T0 + 86_400_000)
    assert [m.text for m in await svc.chat_history(CLIN, pair)] == ["follow-up question"]
    with pytest.raises(RoomsError) as err:
        await svc.chat_history(CLIN2, pair)  # another clinician of the department
    assert err.value.code == "forbidden"
    with pytest.raises(RoomsError) as err:
        await svc.chat_history(SUPPORT, cid)
    assert err.value.code == "forbidden"


async def test_retention_delete_on_call_end() -> None:
    svc = WorkflowService(MemoryStore(), WorkflowConfig(retention=Retention(RetentionKind.DELETE_ON_CALL_END)))
    await rooms(svc)
    sid = await waiting(svc, "p1")
    cid = chat.consultation_channel_id(sid)
    await svc.send_chat(patient_of(cid), cid, "hello", now_ms=T0)
    await svc.admit(CLIN, sid, now_ms=T0)
    await svc.end(CLIN, sid, now_ms=T0 + MIN)
    assert await svc.chat_history(CLIN, cid) == []
    with pytest.raises(RoomsError) as err:
        await svc.send_chat(patient_of(cid), cid, "late", now_ms=T0 + 2 * MIN)
    assert err.value.code == "invalid_state"


async def test_retention_delete_after_days() -> None:
    svc = WorkflowService(MemoryStore(), WorkflowConfig(retention=Retention(RetentionKind.DELETE_AFTER_DAYS, 2)))
    await rooms(svc)
    sid = await waiting(svc, "p1")
    cid = chat.consultation_channel_id(sid)
    await svc.send_chat(patient_of(cid), cid, "old", now_ms=T0)
    await svc.send_chat(patient_of(cid), cid, "new", now_ms=T0 + 2 * 86_400_000)
    with pytest.raises(RoomsError):
        await svc.purge_chat(CLIN, now_ms=T0)
    r = await svc.purge_chat(ORG_ADMIN, now_ms=T0 + 2 * 86_400_000 + 1)
    assert r.value == 1 and r.entries[0].session_id == sid
    assert [m.text for m in await svc.chat_history(patient_of(cid), cid)] == ["new"]


async def test_link_window_token_and_device_check(svc: WorkflowService) -> None:
    b = (await svc.book(CLIN, department=CARDIO, clinician=None, patient_ref="p1", appointment_ms=T0, now_ms=T0)).value
    with pytest.raises(RoomsError) as err:
        await svc.patient_ready(PAT, b.session_id, token="x", device_check_passed=True, now_ms=T0)
    assert err.value.code == "invalid_state" and 'in state "booked"' in str(err.value)
    tok = (await svc.invite(CLIN, b.session_id, now_ms=T0)).value.link_token
    assert tok
    cases = [("wrong", True, T0, "invalid_token"), (tok, True, T0 - 61 * MIN, "too_early"),
             (tok, True, T0 + 61 * MIN, "too_late")]
    for token, device, at, code in cases:
        with pytest.raises(RoomsError) as err:
            await svc.patient_ready(PAT, b.session_id, token=token, device_check_passed=device, now_ms=at)
        assert err.value.code == code
    assert (await svc.consultation(PAT, b.session_id)).state is C.INVITED
    # The device check advises, never blocks: a failed check still lets the patient in.
    ready = await svc.patient_ready(PAT, b.session_id, token=tok, device_check_passed=False, now_ms=T0)
    assert ready.value.state is C.PATIENT_READY


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("unknown_consultation", "not_found"),
        ("unknown_room", "not_found"),
        ("empty_id", "invalid_input"),
        ("wrong_state_end", "invalid_state"),
        ("duplicate_admit", "invalid_state"),
        ("second_queue", "conflict"),
        ("chat_too_big", "invalid_input"),
        ("chat_empty", "invalid_input"),
        ("chat_not_text", "invalid_input"),
        ("chat_control_char", "invalid_input"),
        ("duplicate_room", "conflict"),
        ("negative_time", "invalid_input"),
        ("transfer_same_room", "invalid_input"),
        ("announcement_in_past", "invalid_input"),
    ],
)
async def test_bad_input_is_coded_and_changes_nothing(svc: WorkflowService, case: str, code: str) -> None:
    sid = await waiting(svc, "p1")
    other = await waiting(svc, "p2")
    await svc.admit(CLIN, other, now_ms=T0)
    cid = chat.consultation_channel_id(sid)
    store = svc.store
    assert isinstance(store, MemoryStore)
    before = store.snapshot()
    calls = {
        "unknown_consultation": lambda: svc.admit(CLIN, SessionId("s_nope"), now_ms=T0),
        "unknown_room": lambda: svc.transfer(CLIN, sid, to_room_id="nope", now_ms=T0),
        "empty_id": lambda: svc.end(CLIN, SessionId(""), now_ms=T0),
        "wrong_state_end": lambda: svc.end(CLIN, sid, now_ms=T0),
        "duplicate_admit": lambda: svc.admit(CLIN2, other, now_ms=T0 + 1),
        "second_queue": lambda: svc.walk_in(PAT, room_id="cardio2", now_ms=T0),
        "chat_too_big": lambda: svc.send_chat(patient_of(cid), cid, "x" * 4097, now_ms=T0),
        "chat_empty": lambda: svc.send_chat(patient_of(cid), cid, "   ", now_ms=T0),
        "chat_not_text": lambda: svc.send_chat(patient_of(cid), cid, b"bytes", now_ms=T0),
        "chat_control_char": lambda: svc.send_chat(patient_of(cid), cid, "a\x00b", now_ms=T0),
        "duplicate_room": lambda: svc.create_waiting_room(ORG_ADMIN, room_id="cardio", name="x", department=CARDIO, now_ms=T0),
        "negative_time": lambda: svc.admit(CLIN, sid, now_ms=-1),
        "transfer_same_room": lambda: svc.transfer(CLIN, sid, to_room_id="cardio", now_ms=T0),
        "announcement_in_past": lambda: svc.post_announcement(CLIN, "cardio", text="x", expires_ms=T0 - 1, now_ms=T0),
    }
    with pytest.raises(RoomsError) as err:
        await calls[case]()
    assert err.value.code == code, str(err.value)
    assert store.snapshot() == before


async def test_chat_size_limit_is_utf8_bytes(svc: WorkflowService) -> None:
    sid = await waiting(svc, "p1")
    cid = chat.consultation_channel_id(sid)
    await svc.send_chat(patient_of(cid), cid, "x" * 4096, now_ms=T0)
    with pytest.raises(RoomsError):
        await svc.send_chat(patient_of(cid), cid, "æ" * 2049, now_ms=T0)  # 4098 bytes
