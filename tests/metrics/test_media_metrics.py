"""Media counters reach /metrics: the router's drop events folded by the recorder into labelled counters."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from media.events import ForwardDropReason, PacketsDropped
from media.router import Router
from metrics.eventlog import EventLog
from metrics.recorder import Recorder
from signalling.auth import TokenAuthority
from signalling.hub import Hub

SECRET = "s" * 32


def dropped(reason: ForwardDropReason) -> float:
    value = REGISTRY.get_sample_value("openconsult_rtp_packets_dropped_total", {"reason": reason.value})
    assert value is not None, f"{reason} not exported"
    return value


async def test_forward_drops_are_counted_by_reason(tmp_path: Path) -> None:
    router = Router()
    eventlog = EventLog(tmp_path / "events.sqlite3")
    Hub(TokenAuthority("HS256", SECRET, SECRET, 30), router, Recorder(eventlog))
    before = {reason: dropped(reason) for reason in ForwardDropReason}
    try:
        router.emit(PacketsDropped({ForwardDropReason.WAITING_KEYFRAME: 3, ForwardDropReason.TOO_OLD: 0,
                                    ForwardDropReason.NOT_SENT: 2}))
        assert {reason: dropped(reason) - before[reason] for reason in ForwardDropReason} == {
            ForwardDropReason.WAITING_KEYFRAME: 3, ForwardDropReason.TOO_OLD: 0, ForwardDropReason.NOT_SENT: 2}
    finally:
        await eventlog.aclose()
        await router.close()
