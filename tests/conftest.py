"""Suite-wide checks: every frame a server sends to the test wire client must match the
outbound schemas (signalling/schemas/_response.json and _event.json), so the schemas
and docs/protocol.md stay the whole contract; and a test that runs the CLI in-process (which
sets up logging for a server) leaves the root logger as it found it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from loadtest import client as wire_client


@pytest.fixture(autouse=True)
def server_frames_match_their_schemas() -> Iterator[None]:
    """Turn frame checking on for the test; fail it if the server sent a frame off its schema."""
    wire_client.SignallingClient.check_frames = True
    before = len(wire_client.SCHEMA_VIOLATIONS)
    yield
    found = wire_client.SCHEMA_VIOLATIONS[before:]
    del wire_client.SCHEMA_VIOLATIONS[before:]
    if found:
        shown = "\n".join(f"- {error}: {str(frame)[:300]}" for frame, error in found[:10])
        pytest.fail(f"{len(found)} server frame(s) do not match signalling/schemas:\n{shown}", pytrace=False)


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    """``openconsult serve`` configures the root logger (signalling/logs.py), bound to the
    stderr of the moment: run in-process by a test, that is pytest's capture file, closed after
    the test, and every later log line would fail to write."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if list(root.handlers) != handlers:
        logging.captureWarnings(False)  # logs.configure turned it on
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
