"""Log output: the JSON formatter, the ids bound per task, and a real ``openconsult serve
--log-format json`` whose every output line is a JSON object, the join's carrying its ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.client import SignallingClient
from rooms.model import Role
from signalling import logs
from signalling.auth import TokenAuthority
from signalling.config import Config, ConfigError, ServerConfig
from tests.server import start_server

SECRET = "json-logs-test-secret-0123456789abcdef"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger sent to a buffer as JSON (tests/conftest.py's ``root_logger_restored``
    puts the previous handlers and level back after)."""
    stream = io.StringIO()
    logs.configure("json", logging.DEBUG, stream)
    yield stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """The JSON lines the test logged (asyncio's own debug lines left out)."""
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in parsed if line["logger"] != "asyncio"]


def test_json_line_fields_ids_and_exception(captured: io.StringIO) -> None:
    log = logging.getLogger("openconsult.test")

    async def connection() -> None:
        logs.bind(session_id="s_1", connection_id="c_1")
        log.info("joined %s", "room-a")
        logs.bind(connection_id=None)
        log.info("connection id dropped")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("request failed", extra={"session_id": "s_explicit"})

    asyncio.run(connection())
    log.warning("outside any connection")
    joined, dropped, failed, outside = lines(captured)
    assert joined["message"] == "joined room-a"
    assert joined["level"] == "INFO" and joined["logger"] == "openconsult.test"
    assert joined["time"].endswith("Z") and "T" in joined["time"]
    assert (joined["session_id"], joined["connection_id"]) == ("s_1", "c_1")
    assert dropped["session_id"] == "s_1" and "connection_id" not in dropped
    assert failed["session_id"] == "s_explicit"  # extra= wins over the bound id
    assert failed["exception"].startswith("Traceback") and "ValueError: boom" in failed["exception"]
    # Bound in the task's context only: a line logged elsewhere carries no session.
    assert "session_id" not in outside and "exception" not in outside


def test_ids_bound_in_one_task_stay_in_that_task(captured: io.StringIO) -> None:
    log = logging.getLogger("openconsult.test")

    async def connection(n: int, ready: asyncio.Barrier) -> None:
        logs.bind(session_id=f"s_{n}", connection_id=f"c_{n}")
        await ready.wait()  # both bound before either logs
        log.info("line of %d", n)
        # A task started by this one (its peer connection's work) inherits the ids.
        await asyncio.create_task(asyncio.to_thread(lambda: None))
        await asyncio.create_task(_log_child(log, n))

    async def main() -> None:
        ready = asyncio.Barrier(2)
        await asyncio.gather(connection(1, ready), connection(2, ready))

    asyncio.run(main())
    seen = lines(captured)
    assert len(seen) == 4
    for line in seen:
        n = line["message"].rsplit(" ", 1)[1]
        assert (line["session_id"], line["connection_id"]) == (f"s_{n}", f"c_{n}"), line


async def _log_child(log: logging.Logger, n: int) -> None:
    log.info("child of %d", n)


def test_process_ids_on_every_line(captured: io.StringIO) -> None:
    logs.bind_process(node_id="node_test", worker="3")
    try:
        logging.getLogger("x").info("hello")
    finally:
        logs._process.clear()
    (line,) = lines(captured)
    assert (line["node_id"], line["worker"]) == ("node_test", "3")


def test_text_format_is_unchanged_and_unknown_formats_refused() -> None:
    stream = io.StringIO()
    logs.configure("text", logging.INFO, stream)
    logging.getLogger("signalling.hub").info("plain %s", "line")
    assert stream.getvalue().rstrip().endswith("INFO signalling.hub: plain line")
    with pytest.raises(ValueError, match="log format"):
        logs.configure("xml")


def test_config_log_format_is_validated() -> None:
    assert Config(server=ServerConfig(log_format="json")).validate().server.log_format == "json"
    with pytest.raises(ConfigError, match="server.log_format"):
        Config(server=ServerConfig(log_format="yaml")).validate()


@pytest.mark.slow
async def test_serve_json_logs_carry_the_join_ids(tmp_path: Path) -> None:
    server = start_server(tmp_path, f'[auth]\nsecret = "{SECRET}"\n', args=("--log-format", "json"))
    try:
        token = TokenAuthority("HS256", SECRET, SECRET, leeway_s=30).mint("room-json", Role.PATIENT, "Pat")
        client = await SignallingClient(server.ws_url).connect()
        joined = await client.join(token)
        await client.request("leave")
        await client.close()
    finally:
        server.stop()
    text = server.log_path.read_text(errors="replace")
    parsed = []
    for raw in text.splitlines():
        try:
            parsed.append(json.loads(raw))
        except ValueError:
            raise AssertionError(f"not a JSON line: {raw!r}\n{text[-3000:]}") from None
    assert parsed and all({"time", "level", "logger", "message"} <= line.keys() for line in parsed)
    ids = (joined["session_id"], joined["connection_id"])
    mine = [line for line in parsed if (line.get("session_id"), line.get("connection_id")) == ids]
    messages = [line["message"] for line in mine]
    assert any(m.startswith("connection joined room room-json") for m in messages), text[-3000:]
    assert any(m.startswith("connection left") for m in messages), text[-3000:]
    node_ids = {line["node_id"] for line in parsed if "node_id" in line}
    assert len(node_ids) == 1 and next(iter(node_ids)).startswith("node_")
    assert all("node_id" in line for line in mine)
