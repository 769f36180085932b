"""A real ``openconsult serve`` with ``[eventlog] url`` set: a call's entries and quality samples
land in PostgreSQL (not in a SQLite file in the data dir), and the inspector (events, quality
timeline and its roll-ups, summary, diagnosis), the session search and the back-office log read
them from there."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest

from metrics.diagnosis import diagnose
from metrics.eventlog_pg import PgEventLog
from metrics.summary import summary
from rooms.model import Role
from tests.call_helpers import Participant, authority, get_json
from tests.helpers import wait_until
from tests.postgres_server import PostgresServer
from tests.server import start_server


@pytest.mark.slow
async def test_a_call_is_logged_in_postgresql_and_the_inspector_reads_it(tmp_path: Path,
                                                                         pg_srv: PostgresServer) -> None:
    url = pg_srv.new_database()
    server = start_server(tmp_path, f'[eventlog]\nurl = "{url}"\nnode_id = "node-1"\n')
    tokens = authority(server.data_dir)
    room = f"room-{uuid.uuid4().hex[:8]}"
    alice, bob = Participant(server.ws_url, "Alice"), Participant(server.ws_url, "Bob")
    left = False
    try:
        joined = await alice.join(tokens, room, Role.CLINICIAN)
        await bob.join(tokens, room, Role.PATIENT)
        session_id = joined["session_id"]
        stream = await alice.publish(audio=False)
        await bob.client.wait_event("streamCreated", stream__stream_id=stream)
        sub = await bob.subscribe(stream)
        await wait_until(lambda: len(sub.received.frames) > 5, timeout=60, message="video frames")

        support = tokens.mint("support", Role.SUPPORT, "Support")
        # Quality samples come on the sampling timer: wait for one, read through the API.
        def sampled() -> bool:
            samples = get_json(f"{server.url}/api/sessions/{session_id}/quality", support)["samples"]
            return any(s["kind"] == "video" and s["packets"] for s in samples)

        await wait_until(sampled, timeout=30, message="a video quality sample in PostgreSQL")
        events = get_json(f"{server.url}/api/sessions/{session_id}/events", support)["events"]
        kinds = [e["kind"] for e in events]
        for kind in ("serverDetectedConnect", "successfullyJoined", "publishSuccess", "subscribeSuccess"):
            assert kind in kinds, kind
        assert kinds.index("publishAttempt") < kinds.index("publishSuccess") < kinds.index("subscribeSuccess")
        found = get_json(f"{server.url}/api/sessions?q=Alice", support)
        assert session_id in [s["session_id"] for s in found["sessions"]]
        log = get_json(f"{server.url}/api/backoffice/log?q={session_id}", support)["entries"]
        assert log and {e["session_id"] for e in log if e["type"] != "LookUp"} == {session_id}

        # The call ends; the summary and the diagnosis the server reads from the roll-ups in
        # PostgreSQL come to equal the same rules over the raw entries, and the quality
        # timeline's roll-ups sum up every sample.
        await alice.close()
        await bob.close()
        left = True
        reader = PgEventLog(url, node_id="reader")
        try:
            def agrees() -> bool:
                raw = reader.events_sync(session_id, limit=1_000_000)
                served_summary = get_json(f"{server.url}/api/sessions/{session_id}/summary", support)
                served_diagnosis = get_json(f"{server.url}/api/sessions/{session_id}/diagnosis", support)
                return (served_summary == json.loads(json.dumps(summary(session_id, raw)))
                        and served_diagnosis == json.loads(json.dumps(diagnose(session_id, raw))))

            await wait_until(agrees, timeout=30, message="summary and diagnosis from the roll-ups in PostgreSQL")
            rolled = get_json(f"{server.url}/api/sessions/{session_id}/quality?resolution=10", support)
            assert rolled["resolution"] == 10
            assert sum(p["samples"] for p in rolled["samples"]) == reader.sample_count_sync(session_id) > 0
            served_summary = get_json(f"{server.url}/api/sessions/{session_id}/summary", support)
            assert {p["name"] for p in served_summary["participants"]} >= {"Alice", "Bob"}
        finally:
            reader.close()
    finally:
        if not left:
            await alice.close()
            await bob.close()
        server.stop()

    # The entries are in PostgreSQL, written by this node, and no SQLite event log was made.
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT DISTINCT node_id FROM events WHERE session_id = %s", (session_id,)).fetchall()
        count = conn.execute("SELECT count(*) FROM events WHERE session_id = %s", (session_id,)).fetchone()
    assert rows == [("node-1",)]
    assert count is not None and count[0] >= len(events)
    assert not (server.data_dir / "events.sqlite3").exists()


def test_a_database_that_cannot_be_reached_stops_start_up_without_showing_the_password(tmp_path: Path) -> None:
    from tests.helpers import free_port

    with pytest.raises(AssertionError, match="server exited") as info:
        start_server(tmp_path, f'[eventlog]\nurl = "postgresql://u:s3cret-pw@127.0.0.1:{free_port()}/x"\n',
                     timeout=60)
    assert "eventlog.url" in str(info.value)
    assert "s3cret-pw" not in str(info.value)


def test_the_eventlog_config_is_checked_and_read_from_the_environment() -> None:
    from signalling.config import ConfigError, load_config

    config = load_config(env={"OPENCONSULT_EVENTLOG__URL": "postgresql://u:pw@db/x",
                              "OPENCONSULT_EVENTLOG__NODE_ID": "node-2"})
    assert (config.eventlog.url, config.eventlog.node_id) == ("postgresql://u:pw@db/x", "node-2")
    assert load_config(env={}).eventlog.url == ""  # default: SQLite in the data dir
    with pytest.raises(ConfigError, match="eventlog.url must be empty") as info:
        load_config(env={"OPENCONSULT_EVENTLOG__URL": "mysql://u:hunter2@db/x"})
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="eventlog.node_id"):
        load_config(env={"OPENCONSULT_EVENTLOG__NODE_ID": "node one\n"})
