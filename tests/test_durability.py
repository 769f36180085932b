"""Nothing a client was told succeeded is lost, whatever strangers send and however the
server stops. Against a real ``openconsult serve``:

- poison joins: hostile tokens (a lone surrogate in the header or claims, control
  characters, garbage, the largest token the schema allows) joined at a high rate from a few
  sockets beside a normal session's joins, publishes, chat and leaves. Before the event log
  made entries safe, one such entry failed its whole batch and erased everyone's entries.
- ``kill -9`` (and SIGTERM) in the middle of a busy call: every request a client got an ok
  reply for has its event-log entries (and its chat message) after a restart on the same
  data dir, because replies wait for the group commit of what their request logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sqlite3
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCSessionDescription

from loadtest.client import RequestFailed, SignallingClient
from metrics.prometheus import EventLogDropReason
from rooms.model import Role
from signalling.auth import TokenAuthority
from tests.helpers import wait_until
from tests.media.peers import publisher_offer
from tests.server import ServerProcess, start_server
from tests.workflow.helpers import MINUTE_MS, Clinic, now_ms

# What a dying server does to a client mid-request.
GONE = (ConnectionError, RequestFailed, asyncio.TimeoutError, aiohttp.ClientError, OSError)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: str, claims: str) -> str:
    """A token from raw JSON text (``\\ud800`` escapes decode to lone surrogates)."""
    return f"{_b64(header.encode())}.{_b64(claims.encode())}.{_b64(b'not-a-signature')}"


HOSTILE_TOKENS = [
    _unsigned('{"alg":"\\ud800","typ":"JWT"}', "{}"),  # the token that erased the log
    _unsigned('{"alg":"HS256"}', '{"room":"\\udfff","name":"\\ud800\\u0000","sub":"\\u001b[31m"}'),
    _unsigned('{"alg":"\\u0000\\r\\n\\u0085","kid":"\\udbff\\udc00\\udc00"}', '{"exp":"\\ud800"}'),
    "garbage",
    "x" * 8_000,  # as long as the schema lets a token be
    "e30." + "A" * 7_000 + ".e30",
]


@dataclass
class Acknowledged:
    """Every request a client got an ok (or coded error) reply for."""

    joins: list[tuple[str, str]] = field(default_factory=list)  # (session_id, connection_id)
    leaves: list[tuple[str, str]] = field(default_factory=list)
    streams: list[tuple[str, str, str]] = field(default_factory=list)  # (session_id, stream_id, kind|kind…)
    chats: list[tuple[str, str]] = field(default_factory=list)  # (session_id, message_id)
    refusals: int = 0

    @property
    def count(self) -> int:
        return len(self.joins) + len(self.leaves) + len(self.streams) + len(self.chats) + self.refusals


async def join_leave_loop(server: ServerProcess, tokens: TokenAuthority, room: str, name: str,
                          ack: Acknowledged, stop: asyncio.Event) -> None:
    """Join and leave ``room`` again and again until ``stop`` or the server is gone."""
    while not stop.is_set():
        client = SignallingClient(server.ws_url)
        try:
            await client.connect()
            joined = await client.join(tokens.mint(room, Role.PATIENT, name), timeout=10)
            ack.joins.append((joined["session_id"], joined["connection_id"]))
            await client.request("leave", timeout=10)
            ack.leaves.append((joined["session_id"], joined["connection_id"]))
        except GONE:
            if stop.is_set() or server.proc.poll() is not None:
                return
            raise
        finally:
            await client.close()


async def publish_loop(server: ServerProcess, tokens: TokenAuthority, room: str, ack: Acknowledged,
                       stop: asyncio.Event) -> None:
    """One participant publishing a real aiortc stream, unpublishing it, publishing again."""
    client = SignallingClient(server.ws_url)
    try:
        await client.connect()
        session_id = (await client.join(tokens.mint(room, Role.CLINICIAN, "Dr Publisher"), timeout=10))["session_id"]
        while not stop.is_set():
            pc = await publisher_offer()
            try:
                data = await client.request("publish", offer={"type": "offer", "sdp": pc.localDescription.sdp},
                                            timeout=10)
                ack.streams.append((session_id, data["stream_id"], "publishSuccess"))
                await pc.setRemoteDescription(RTCSessionDescription(sdp=data["answer"]["sdp"], type="answer"))
                await client.request("unpublish", stream_id=data["stream_id"], timeout=10)
                # A stream whose media connected ends destroyed; one that had not yet, as a failed publish.
                ack.streams.append((session_id, data["stream_id"], "streamDestroyed|publishFailure"))
            finally:
                await pc.close()
    except GONE:
        if not (stop.is_set() or server.proc.poll() is not None):
            raise
    finally:
        await client.close()


async def chat_loop(server: ServerProcess, patient_token: str, session_id: str, ack: Acknowledged,
                    stop: asyncio.Event) -> None:
    """A waiting patient chatting in their consultation's channel."""
    client = SignallingClient(server.ws_url)
    try:
        await client.connect()
        await client.join(patient_token, timeout=10)
        await client.request("waiting_room.enter", timeout=10)
        i = 0
        while not stop.is_set():
            sent = await client.request("chat.send", channel_id=f"consultation:{session_id}", text=f"message {i}",
                                        timeout=10)
            ack.chats.append((session_id, sent["message"]["message_id"]))
            i += 1
    except GONE:
        if not (stop.is_set() or server.proc.poll() is not None):
            raise
    finally:
        await client.close()


async def hostile_loop(server: ServerProcess, worker: int, ack: Acknowledged, stop: asyncio.Event) -> None:
    """Join with hostile tokens as fast as refusals come back, one socket after another."""
    i = worker
    while not stop.is_set():
        client = SignallingClient(server.ws_url)
        try:
            await client.connect()
            await client.join(HOSTILE_TOKENS[i % len(HOSTILE_TOKENS)], timeout=10)
            raise AssertionError(f"hostile token {i % len(HOSTILE_TOKENS)} was accepted")
        except RequestFailed:
            ack.refusals += 1  # every hostile join gets its coded refusal before the close
        except GONE:
            if stop.is_set() or server.proc.poll() is not None:
                return
            raise
        finally:
            await client.close()
        i += 1


async def book(clinic: Clinic, patient: str) -> tuple[str, str]:
    """A booked consultation: (patient token, session id)."""
    admin = clinic.staff(Role.DEPARTMENT_ADMIN, "dana", "cardio")
    await clinic.waiting_room(admin, f"wr-{patient}", "Cardiology", "cardio")
    booking = await clinic.book(admin, department="cardio", room_id=f"wr-{patient}", patient=patient,
                                clinician="dr-who", appointment_ms=now_ms() + 10 * MINUTE_MS)
    return booking["patient_token"], booking["consultation"]["session_id"]


def events(server: ServerProcess, tokens: TokenAuthority, session_id: str) -> list[dict[str, Any]]:
    support = tokens.mint("support", Role.SUPPORT, "Support")
    request = urllib.request.Request(f"{server.url}/api/sessions/{session_id}/events?limit=10000",
                                     headers={"Authorization": f"Bearer {support}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        found: list[dict[str, Any]] = json.loads(response.read())["events"]
    assert len(found) < 10_000, "the session outgrew one page of the events API"
    return found


def missing_entries(server: ServerProcess, tokens: TokenAuthority, ack: Acknowledged) -> list[str]:
    """Every acknowledged request whose entries the event log does not hold."""
    sessions = {s for s, _ in ack.joins} | {s for s, _, _ in ack.streams} | {s for s, _ in ack.chats}
    logged: set[tuple[str, ...]] = set()
    for session_id in sessions:
        for e in events(server, tokens, session_id):
            logged.add((session_id, e["kind"], e["connection_id"] or "", e["stream_id"] or "",
                        str(e["payload"].get("message_id", "")), str(e["payload"].get("reason", ""))))
    missing = []
    for s, c in ack.joins:
        for kind in ("connectAttempt", "serverDetectedConnect", "successfullyJoined"):
            if (s, kind, c, "", "", "") not in logged:
                missing.append(f"{kind} {s} {c}")
    for s, c in ack.leaves:
        if (s, "disconnect", c, "", "", "clientDisconnected") not in logged:
            missing.append(f"disconnect {s} {c}")
    logged_streams = {(s, kind, stream) for s, kind, _, stream, _, _ in logged}
    for s, stream, kind in ack.streams:
        if not any((s, one, stream) in logged_streams for one in kind.split("|")):
            missing.append(f"{kind} {s} {stream}")
    logged_chats = {(s, message) for s, kind, _, _, message, _ in logged if kind == "Chat"}
    missing.extend(f"Chat {s} {m}" for s, m in ack.chats if (s, m) not in logged_chats)
    return missing


def dropped_entries(server: ServerProcess) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        body = response.read().decode()
    total, seen = 0.0, set()
    for line in body.splitlines():
        if line.startswith("openconsult_eventlog_entries_dropped_total{"):
            seen.add(line.split('reason="')[1].split('"')[0])
            total += float(line.rsplit(" ", 1)[1])
    assert seen == {r.value for r in EventLogDropReason}, body
    return total


@pytest.mark.slow
async def test_poison_joins_cost_no_one_else_an_entry(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    clinic = Clinic.open(server)
    try:
        tokens = clinic.tokens
        patient_token, consultation = await book(clinic, "p-poison")
        room = f"r-{uuid.uuid4().hex[:8]}"
        ack, hostile, stop = Acknowledged(), Acknowledged(), asyncio.Event()
        tasks = [asyncio.create_task(hostile_loop(server, w, hostile, stop)) for w in range(3)]
        tasks += [asyncio.create_task(join_leave_loop(server, tokens, room, f"P{n}", ack, stop)) for n in range(2)]
        tasks += [asyncio.create_task(chat_loop(server, patient_token, consultation, ack, stop)),
                  asyncio.create_task(publish_loop(server, tokens, room, ack, stop))]
        # Run until a few hundred hostile joins went by (the erasing attack took 18 a second).
        await wait_until(lambda: hostile.refusals >= 300 and len(ack.leaves) >= 20 and len(ack.chats) >= 20
                         and len(ack.streams) >= 2 or any(t.done() for t in tasks),
                         timeout=180, interval=0.1, message="hostile and normal traffic")
        stop.set()
        await asyncio.gather(*tasks)  # re-raises what failed in a loop

        assert missing_entries(server, tokens, ack) == []
        assert dropped_entries(server) == 0
        server.stop()
        # Every refusal was logged, made safe.
        with sqlite3.connect(server.data_dir / "events.sqlite3") as db:
            rejected = [row[0] for row in db.execute("SELECT text FROM events WHERE kind = 'tokenRejected'")]
        assert len(rejected) >= hostile.refusals
        # The hostile header is quoted, escaped or replaced, never raw.
        assert any("\\ud800" in text or "\ufffd" in text for text in rejected)
        for text in rejected:
            text.encode("utf-8")
            assert "\x00" not in text and "\x1b" not in text
    finally:
        await clinic.close()
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_every_acknowledged_entry_survives_a_stop_in_a_busy_call(tmp_path: Path, stop_signal: int) -> None:
    server = start_server(tmp_path)
    clinic = Clinic.open(server)
    try:
        tokens = clinic.tokens
        patient_token, consultation = await book(clinic, "p-busy")
        room = f"r-{uuid.uuid4().hex[:8]}"
        # Two who stay in the room until the end, to see how it ends.
        staying, watching = SignallingClient(server.ws_url), SignallingClient(server.ws_url)
        await staying.connect()
        stayed = await staying.join(tokens.mint(room, Role.CLINICIAN, "Dr Stays"))
        await watching.connect()
        watched = await watching.join(tokens.mint(room, Role.PATIENT, "Watcher"))
        ack, stop = Acknowledged(), asyncio.Event()
        tasks = [asyncio.create_task(join_leave_loop(server, tokens, room, f"P{n}", ack, stop)) for n in range(3)]
        tasks += [asyncio.create_task(chat_loop(server, patient_token, consultation, ack, stop)),
                  asyncio.create_task(publish_loop(server, tokens, room, ack, stop))]
        await wait_until(lambda: ack.count >= 150 and len(ack.streams) >= 2 or any(t.done() for t in tasks),
                         timeout=180, interval=0.05, message="a busy call")
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        # Stop while every loop is mid-request (they start no new round once stop is set).
        stop.set()
        await asyncio.to_thread(server.stop, stop_signal)
        for client in (staying, watching):
            await asyncio.wait_for(client.closed.wait(), 30)
            await client.close()
        await asyncio.gather(*tasks)
        if stop_signal == signal.SIGTERM:
            # Those still in the call are told: 1001 server shutdown, and who left and why.
            assert (staying.close_code, watching.close_code) == (aiohttp.WSCloseCode.GOING_AWAY,) * 2
            # The first of the two to be disconnected is announced to the other.
            ids = {stayed["connection_id"], watched["connection_id"]}
            ended = [e["data"]["reason"] for c in (staying, watching) for e in c.events
                     if e["event"] == "connectionDestroyed" and e["data"]["connection"]["connection_id"] in ids]
            assert ended == ["serverShutdown"]

        restarted = start_server(tmp_path, data_dir=server.data_dir)
        try:
            assert missing_entries(restarted, tokens, ack) == []
            # The chat messages themselves (the workflow store) are there too.
            again = SignallingClient(restarted.ws_url)
            await again.connect()
            await again.join(patient_token)
            history = await again.request("chat.history", channel_id=f"consultation:{consultation}")
            await again.close()
            assert {m for _, m in ack.chats} <= {m["message_id"] for m in history["messages"]}
            if stop_signal == signal.SIGTERM:
                # A graceful stop logs every connection's end as serverShutdown.
                last = [e for e in events(restarted, tokens, stayed["session_id"])
                        if e["connection_id"] == stayed["connection_id"]][-1]
                assert (last["kind"], last["payload"]["reason"]) == ("disconnect", "serverShutdown")
        finally:
            restarted.stop()
    finally:
        await clinic.close()
        server.stop()
