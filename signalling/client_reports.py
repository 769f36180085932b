"""What the browser saw: ``client.event`` / ``client.stats`` messages (and the tab-closed beacon)
as event-log entries with component ``client``, and the per-connection limit on how often.

The messages were validated against their schemas (``signalling/schemas/client.*.json``) by the
codec, or by :func:`validate_beacon` for the HTTP beacon, so every field here has its type and
bound; the event log makes every string safe again when it writes. The entries belong to the
sender's session: a client cannot write into a session it did not join.

:class:`ReportLimiter` is a token bucket per connection id (time passed in): ``per_min`` reports a
minute, bursts of a quarter of that; the map is bounded and forgets idle connections.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Final

from metrics.events import Component, EventKind, LogEntry
from signalling.codec import JsonCodec, MessageType
from signalling.errors import InvalidMessage, RateLimited

#: The fields of one stats sample kept in the entry's payload (the schema allows no others).
STATS_FIELDS: Final = (
    "stream_id", "subscription_id", "kind", "direction", "framesDecoded", "framesDropped", "freezeCount",
    "totalFreezesDuration", "jitterBufferDelay", "concealedSamples", "roundTripTime", "availableOutgoingBitrate",
    "qualityLimitationReason", "packetsLost", "packetsReceived", "bytesReceived", "bytesSent", "frameWidth",
    "frameHeight", "framesPerSecond", "candidate_pair",
)


#: A beacon body is small: one event.
BEACON_MAX_BYTES: Final = 8192
_BEACON_CODEC: Final = JsonCodec(BEACON_MAX_BYTES)


class ReportLimiter:
    """At most ``per_min`` reports a minute per key (a token bucket of ``max(4, per_min // 4)``)."""

    def __init__(self, per_min: int, *, max_keys: int = 50_000) -> None:
        self.rate_per_s = per_min / 60.0
        self.burst = float(max(4, per_min // 4))
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def acquire(self, key: str, now: float) -> float | None:
        """Count one report: None if allowed, else the seconds until the next one is."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return None

    def check(self, key: str, now: float) -> None:
        """:meth:`acquire`, raising ``rate_limited`` when over the limit."""
        wait = self.acquire(key, now)
        if wait is not None:
            raise RateLimited(f"too many client reports from this connection (at most "
                              f"{round(self.rate_per_s * 60)} a minute); retry in {wait:.1f} s",
                              retry_after_s=max(1, math.ceil(wait)))

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _prune(self, now: float) -> None:
        """Drop keys whose bucket has refilled (the same as never seen); if none, the oldest half."""
        full = [k for k, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.rate_per_s >= self.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            for key in list(self._buckets)[: self.max_keys // 2]:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def _event_text(name: str, data: Mapping[str, Any]) -> str:
    """The sentence support staff read for one client event."""
    error = f": {data['error_name']}" if data.get("error_name") else ""
    if name == "deviceCheck":
        return (f"Client device check: camera {data.get('camera', '?')}, "
                f"microphone {data.get('microphone', '?')}{error}")
    if name == "getUserMediaFailed":
        return f"Client could not open camera/microphone{error}"
    if name in ("iceFailed", "connectionFailed"):
        local = "/".join(data.get("local_candidate_types") or []) or "none"
        remote = "/".join(data.get("remote_candidate_types") or []) or "none"
        what = "ICE failed" if name == "iceFailed" else "Connection failed"
        return (f"Client {what} on {data.get('peer_id', '?')} (local candidates: {local}; remote: {remote}; "
                f"{data.get('ice_servers', 0)} ICE servers)")
    if name == "precallTest":
        return _precall_text(data)
    if name in ("reconnecting", "reconnected"):
        return f"Client {name} (attempt {data.get('attempt', '?')})"
    words = {"pageHidden": "Client page hidden", "pageVisible": "Client page visible again",
             "tabClosed": "Client tab closed"}
    return words.get(name, f"Client event {name}")


def _precall_text(data: Mapping[str, Any]) -> str:
    """"Client pre-call test: poor (up 420 kbit/s, down 400 kbit/s, loss 9.1%, RTT 35 ms, …)"."""
    parts = []
    for key, label, unit in (("up_kbps", "up", " kbit/s"), ("down_kbps", "down", " kbit/s"),
                             ("down_loss_pct", "loss", "%"), ("rtt_ms", "RTT", " ms"), ("jitter_ms", "jitter", " ms")):
        if isinstance(data.get(key), (int, float)):
            parts.append(f"{label} {data[key]:.0f}{unit}" if unit != "%" else f"{label} {data[key]:.1f}{unit}")
    if data.get("local_candidate_type"):
        pair = f"{data['local_candidate_type']}/{data.get('protocol', '?')}"
        parts.append(f"via {pair}" + (f" (TURN over {data['relay_protocol']})" if data.get("relay_protocol") else ""))
    if data.get("relay_verdict"):
        parts.append(f"relay-only {str(data['relay_verdict']).replace('_', ' ')}")
    verdict = str(data.get("verdict", "?")).replace("_", " ")
    return f"Client pre-call test: {verdict}" + (f" ({', '.join(parts)})" if parts else "")


def event_entry(session_id: str, connection_id: str, message: Mapping[str, Any], now_ms: int) -> LogEntry:
    """The ``clientEvent`` entry of a validated ``client.event`` message."""
    name = str(message["event"])
    data = dict(message.get("data") or {})
    payload = {"event": name, **data}
    return LogEntry(time_ms=now_ms, session_id=session_id, connection_id=connection_id,
                    stream_id=None, kind=EventKind.CLIENT_EVENT, component=Component.CLIENT,
                    text=_event_text(name, data), payload=payload)


def _stats_text(sample: Mapping[str, Any]) -> str:
    kind, direction = sample["kind"], sample["direction"]
    parts = [f"Client {kind} {direction} stats"]
    if kind == "video" and sample.get("frameWidth") and sample.get("frameHeight"):
        parts.append(f"{sample['frameWidth']:.0f}x{sample['frameHeight']:.0f}")
    if sample.get("framesPerSecond") is not None:
        parts.append(f"{sample['framesPerSecond']:.0f} fps")
    if sample.get("roundTripTime") is not None:
        parts.append(f"RTT {sample['roundTripTime'] * 1000:.0f} ms")
    if sample.get("freezeCount"):
        parts.append(f"{sample['freezeCount']:.0f} freezes")
    if sample.get("qualityLimitationReason") not in (None, "none"):
        parts.append(f"limited by {sample['qualityLimitationReason']}")
    return ", ".join(parts)


def stats_entries(session_id: str, connection_id: str, message: Mapping[str, Any], now_ms: int,
                  known_streams: AbstractSet[str]) -> list[LogEntry]:
    """One ``clientStats`` entry per sample of a validated ``client.stats`` message.

    The entry's ``stream_id`` column is set only for a stream the session knows (a client cannot
    attach entries to another session's stream); the payload keeps what the client said.
    """
    entries = []
    for sample in message["samples"]:
        payload = {name: sample[name] for name in STATS_FIELDS if name in sample}
        stream_id = sample["stream_id"]
        entries.append(LogEntry(
            time_ms=now_ms, session_id=session_id, connection_id=connection_id,
            stream_id=stream_id if stream_id in known_streams else None, kind=EventKind.CLIENT_STATS,
            component=Component.CLIENT, text=_stats_text(sample), payload=payload))
    return entries


def validate_beacon(body: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The connection id and the ``client.event`` message of a beacon body
    (``{"connection_id", "event", "data"?, "token"?}``), or ``invalid_message`` naming the field."""
    connection_id = body.get("connection_id")
    if not isinstance(connection_id, str) or not 0 < len(connection_id) <= 64:
        raise InvalidMessage('"connection_id" must be a string of 1-64 characters (join\'s connection_id)')
    message = {k: v for k, v in body.items() if k not in ("token", "connection_id")}
    message["type"], message["id"] = str(MessageType.CLIENT_EVENT), 0
    # The WebSocket's own checks (schema, lone surrogates, control characters), word for word.
    return connection_id, _BEACON_CODEC.decode(json.dumps(message))
