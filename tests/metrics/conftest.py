"""The event-log contract suite runs on both backends: the fixture ``logs`` opens event logs on
SQLite (a file in tmp_path) or on a real PostgreSQL (a fresh database in the session's server)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from metrics.eventlog import EventLog, EventStore
from metrics.eventlog_pg import PgEventLog
from tests.postgres_server import PostgresServer, pg_srv

__all__ = ["pg_srv", "BACKENDS", "LogFactory"]

BACKENDS = ["sqlite", "postgresql"]


class LogFactory:
    """Opens event logs of one backend, all on the same store (one SQLite file or one database),
    and closes them after the test."""

    def __init__(self, backend: str, tmp_path: Path, pg: PostgresServer | None) -> None:
        self.backend = backend
        self.path = tmp_path / "events.db"
        self.url = pg.new_database() if pg is not None else ""
        self.opened: list[EventStore] = []
        self._tmp_path, self._pg = tmp_path, pg
        self._siblings: list[LogFactory] = []

    def sibling(self) -> LogFactory:
        """A factory of the same backend on a store of its own, closed with this one."""
        directory = self._tmp_path / f"sibling{len(self._siblings)}"
        directory.mkdir()
        other = LogFactory(self.backend, directory, self._pg)
        self._siblings.append(other)
        return other

    @property
    def where(self) -> str:
        """How the writer's log lines name the store."""
        return str(self.path) if self.backend == "sqlite" else f"postgresql://{self.url.split('@', 1)[1]}"

    def open(self, **kwargs: Any) -> EventStore:
        """An event log on this test's store; ``node_id`` is taken by PostgreSQL only."""
        log: EventStore
        if self.backend == "sqlite":
            kwargs.pop("node_id", None)
            log = EventLog(self.path, **kwargs)
        else:
            log = PgEventLog(self.url, **kwargs)
        self.opened.append(log)
        return log

    def refuse_texts_like(self, pattern: str) -> None:
        """Make the store itself refuse entries whose text is LIKE ``pattern`` (a trigger)."""
        if self.backend == "sqlite":
            lite = sqlite3.connect(self.path)
            lite.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.text LIKE '{pattern}'"
                         " BEGIN SELECT RAISE(ABORT, 'refused by policy'); END")
            lite.close()
            return
        with psycopg.connect(self.url, autocommit=True) as pg:
            pg.execute(f"""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.text LIKE '{pattern}' THEN RAISE EXCEPTION 'refused by policy'; END IF;
                RETURN NEW; END $$""".encode())
            pg.execute(b"CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()")

    def close(self) -> None:
        for log in self.opened:
            log.close()
        for other in self._siblings:
            other.close()


@pytest.fixture(params=BACKENDS)
def logs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LogFactory]:
    pg = request.getfixturevalue("pg_srv") if request.param == "postgresql" else None
    factory = LogFactory(request.param, tmp_path, pg)
    yield factory
    factory.close()
