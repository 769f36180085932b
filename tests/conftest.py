"""Suite-wide checks: every frame a server sends to the test wire client must match the
outbound schemas (signalling/schemas/_response.json and _event.json), so the schemas
and docs/protocol.md stay the whole contract."""

from __future__ import annotations

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
