"""The workflow on every store (memory, SQLite, real Redis), and the SQLite restart guarantee."""

from __future__ import annotations

from pathlib import Path

from rooms import chat
from rooms.consultation import State as C
from rooms.model import Role
from rooms.permissions import Actor
from rooms.service import WorkflowService
from rooms.sqlite_store import SqliteStore
from rooms.store import Store
from rooms.waiting_room import Outcome
from tests.rooms.scenario import CLIN, MIN, ORG_ADMIN, SUPPORT, T0, patient_of, rooms, waiting


async def test_workflow_on_every_store(store: Store) -> None:
    svc = WorkflowService(store)
    await rooms(svc)
    s1 = await waiting(svc, "p1")
    s2 = await waiting(svc, "p2")
    cid = chat.consultation_channel_id(s1)
    await svc.send_chat(patient_of(cid), cid, "<img src=x onerror=alert(1)>", now_ms=T0)
    await svc.transfer(CLIN, s2, to_room_id="cardio2", now_ms=T0 + MIN)
    await svc.admit(CLIN, s1, now_ms=T0 + 2 * MIN)
    c = (await svc.end(CLIN, s1, now_ms=T0 + 12 * MIN)).value
    assert c.duration_ms == 10 * MIN
    await svc.complete(CLIN, s1, now_ms=T0 + 13 * MIN)
    assert (await svc.consultation(SUPPORT, s1)).state is C.COMPLETED
    assert [m.text for m in await svc.chat_history(patient_of(cid), cid)] == ["<img src=x onerror=alert(1)>"]
    qe = await svc.queue_entry(ORG_ADMIN, s2)
    assert [(s.room_id, s.outcome) for s in qe.segments] == [("cardio", Outcome.TRANSFERRED), ("cardio2", None)]
    assert await svc.position(Actor(Role.PATIENT, "p2"), s2) == 1


async def test_sqlite_restart_keeps_queues_positions_and_chat(tmp_path: Path) -> None:
    path = tmp_path / "openconsult.db"
    store = SqliteStore(path)
    svc = WorkflowService(store)
    await rooms(svc)
    sessions = [await waiting(svc, f"p{i}") for i in range(1, 5)]
    p1, p2 = Actor(Role.PATIENT, "p1", consultation=sessions[0]), Actor(Role.PATIENT, "p3")
    await svc.transfer(CLIN, sessions[1], to_room_id="cardio2", now_ms=T0)
    cid = chat.consultation_channel_id(sessions[0])
    for i, text in enumerate(["hello", "<script>x</script>", "æøå"]):
        await svc.send_chat(p1 if i % 2 == 0 else CLIN, cid, text, now_ms=T0 + i)
    ann = await svc.post_announcement(CLIN, "cardio", text="10 min late", expires_ms=T0 + 30 * MIN, now_ms=T0)
    before_queue = await svc.queue(CLIN, "cardio", now_ms=T0 + MIN)
    before_chat = await svc.chat_history(CLIN, cid)
    await store.close()

    reopened = WorkflowService(SqliteStore(path))
    assert await reopened.queue(CLIN, "cardio", now_ms=T0 + MIN) == before_queue
    assert [q.session_id for q in before_queue] == [sessions[0], sessions[2], sessions[3]]
    assert [await reopened.position(Actor(Role.PATIENT, f"p{i + 1}"), sessions[i]) for i in range(4)] == [1, 1, 2, 3]
    assert await reopened.chat_history(CLIN, cid) == before_chat
    assert [m.text for m in before_chat] == ["hello", "<script>x</script>", "æøå"]
    assert await reopened.announcements(p1, "cardio", now_ms=T0 + MIN) == [ann.value]
    # And the workflow carries on where it stopped.
    await reopened.admit(CLIN, sessions[0], now_ms=T0 + 2 * MIN)
    assert await reopened.position(p2, sessions[2]) == 1
    await reopened.store.close()
