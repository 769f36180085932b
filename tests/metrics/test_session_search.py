"""The inspector's session search: by room, participant name, session id and time range."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from metrics.eventlog import EventLog
from metrics.events import EventKind, LogEntry


def entry(time_ms: int, session_id: str, kind: EventKind, **payload: object) -> LogEntry:
    return LogEntry(time_ms=time_ms, session_id=session_id, kind=kind, text=f"{kind} {payload}", payload=payload)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EventLog]:
    eventlog = EventLog(tmp_path / "events.sqlite3")
    eventlog.append(entry(1_000, "s_demo1", EventKind.VIDEO_SESSION, room="clinic-7"))
    eventlog.append(entry(1_001, "s_demo1", EventKind.SERVER_DETECTED_CONNECT, name="Anna Berg", role="patient"))
    eventlog.append(entry(1_002, "s_demo1", EventKind.SERVER_DETECTED_CONNECT, name="Dr Who", role="clinician"))
    eventlog.append(entry(5_000, "s_demo2", EventKind.VIDEO_SESSION, room="clinic-8"))
    eventlog.append(entry(5_001, "s_demo2", EventKind.SERVER_DETECTED_CONNECT, name="Bo_100%", role="patient"))
    eventlog.append(entry(9_000, "cons-42", EventKind.CONSULTATION, patient="Anna"))
    eventlog.append(entry(9_001, "cons-42", EventKind.SERVER_DETECTED_CONNECT, name="Anna Berg", role="patient"))
    eventlog.flush_sync()
    yield eventlog
    eventlog.close()


def ids(found: list[dict[str, object]]) -> list[object]:
    return [s["session_id"] for s in found]


def test_by_room(log: EventLog) -> None:
    assert ids(log.sessions_sync(0, 10_000, room="clinic-7")) == ["s_demo1"]
    assert ids(log.sessions_sync(0, 10_000, room="cons-42")) == ["cons-42"]  # a consultation's room is its id
    assert ids(log.sessions_sync(0, 10_000, room="clinic")) == []  # exact, not a substring


def test_by_name_is_a_substring_of_who_joined(log: EventLog) -> None:
    assert ids(log.sessions_sync(0, 10_000, name="anna")) == ["cons-42", "s_demo1"]
    assert ids(log.sessions_sync(0, 10_000, name="100%")) == ["s_demo2"]
    assert ids(log.sessions_sync(0, 10_000, name="_1")) == ["s_demo2"]  # LIKE wildcards are literal
    assert ids(log.sessions_sync(0, 10_000, name="patient")) == []  # a role is not a name


def test_by_session_id_and_date_range_combined(log: EventLog) -> None:
    assert ids(log.sessions_sync(0, 10_000, session_id="demo")) == ["s_demo2", "s_demo1"]
    assert ids(log.sessions_sync(4_000, 10_000, session_id="demo")) == ["s_demo2"]
    assert ids(log.sessions_sync(0, 10_000, name="Anna", room="clinic-7")) == ["s_demo1"]
    assert ids(log.sessions_sync(0, 10_000, name="Anna", session_id="demo2")) == []


async def test_the_api_takes_the_filters_and_refuses_bad_ones(tmp_path: Path) -> None:
    import aiohttp

    from loadtest.client import SignallingClient
    from rooms.model import Role
    from tests.call_helpers import authority
    from tests.server import start_server

    server = start_server(tmp_path / "server")
    try:
        tokens = authority(server.data_dir)
        client = await SignallingClient(server.ws_url).connect()
        await client.join(tokens.mint("search-room", Role.PATIENT, "Zelda Search"))
        sid = client.joined["session_id"]
        await client.close()
        support = {"Authorization": f"Bearer {tokens.mint('support', Role.SUPPORT, 'Sue')}"}
        async with aiohttp.ClientSession(headers=support) as http:
            async def found(query: str) -> list[str]:
                async with http.get(f"{server.url}/api/sessions?{query}") as response:
                    assert response.status == 200, await response.text()
                    return [s["session_id"] for s in (await response.json())["sessions"]]

            assert await found("room=search-room") == [sid]
            assert await found("name=zelda") == [sid]
            assert await found(f"session_id={sid[2:8]}&name=Zelda") == [sid]
            assert await found("room=search-room&since_ms=0&until_ms=1") == []
            for query, word in (("name=" + "x" * 201, '"name"'), ("room=a%01b", '"room"'),
                                ("since_ms=5&until_ms=4", '"since_ms"')):
                async with http.get(f"{server.url}/api/sessions?{query}") as response:
                    body = await response.json()
                    assert response.status == 400 and body["error"]["code"] == "invalid_message", body
                    assert word in body["error"]["message"], body
    finally:
        server.stop()
