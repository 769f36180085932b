"""The one recorder: everything the SFU, the hub and the workflow report goes through here.

Each typed method turns one happening into what it is worth: an event-log entry (the inspector's
timeline), a quality sample (the timeline's figures, on the same batched writer) and Prometheus
figures. The hub and the workflow get a :class:`Recorder` injected (as LiveKit injects its
telemetry service into a room) and never touch the event log or the metrics directly.

:meth:`Recorder.media_event` is the media plane's listener: it only records. What the hub must
*do* about a media event (announce a stream, clean up a failed peer) stays in the hub.

Nothing here awaits or does I/O on the caller's path: the event log queues, Prometheus counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from media.events import (
    DatagramsDropped,
    DimensionsChanged,
    KeyframeRequested,
    MediaEvent,
    MediaFlowChanged,
    PacketsDropped,
    PeerClosedUnconnected,
    PeerStateChanged,
    PeerTimedOut,
    QualitySample,
)
from metrics import prometheus as prom
from metrics.eventlog import EventStore
from metrics.events import EventKind, LogEntry, token_rejected


#: A quality sample's fields, in order: its payload is a flat copy of them (all plain
#: values), cheaper than ``dataclasses.asdict``'s recursive deep copy on the timer path.
_SAMPLE_FIELDS = tuple(f.name for f in fields(QualitySample))


def sample_payload(sample: QualitySample) -> dict[str, Any]:
    """The event-log payload of a quality sample: its fields by name."""
    return {name: getattr(sample, name) for name in _SAMPLE_FIELDS}


@dataclass
class PeerOwner:
    """Who a media peer connection belongs to, for routing media events."""

    session_id: str
    connection_id: str
    stream_id: str
    is_publish: bool


class Recorder:
    """Typed recording methods over one event log and the process's Prometheus metrics."""

    def __init__(self, eventlog: EventStore) -> None:
        self.eventlog = eventlog

    # --- event log --------------------------------------------------------------------------

    def log(self, session_id: str, kind: EventKind, text: str, *, connection_id: str | None = None,
            stream_id: str | None = None, **payload: Any) -> None:
        """One event-log entry stamped now."""
        self.eventlog.append(LogEntry.now(session_id, kind, text, connection_id=connection_id,
                                          stream_id=stream_id, payload=payload))

    def entry(self, entry: LogEntry) -> None:
        """An entry built elsewhere (the workflow's back-office entries)."""
        self.eventlog.append(entry)

    # --- connection lifecycle ---------------------------------------------------------------

    def token_rejected(self, token: str, message: str, code: str, room: str | None,
                       session_id: str | None = None) -> None:
        """A join token was refused: counted by code, logged under ``session_id`` when the token
        names a consultation (so its own session shows the refusal), else under its room."""
        prom.TOKENS_REJECTED.labels(code=code).inc()
        entry = token_rejected(token, message, room, code=code)
        if session_id:
            entry = LogEntry(time_ms=entry.time_ms, session_id=session_id, kind=entry.kind, text=entry.text,
                             payload=entry.payload)
        self.eventlog.append(entry)

    def link_refused(self, session_id: str, code: str, message: str, *, connection_id: str | None = None) -> None:
        """A consultation link was refused by the workflow (too early, too late, not this
        consultation's): logged as a refused token in the consultation's session."""
        prom_code = code if code in set(prom.TokenRejectCode) else None
        if prom_code is not None:
            prom.TOKENS_REJECTED.labels(code=prom_code).inc()
        self.log(session_id, EventKind.TOKEN_REJECTED, f"Consultation link refused: {message}",
                 connection_id=connection_id, reason=message, code=code)

    @staticmethod
    def session_started() -> None:
        prom.SESSIONS_ACTIVE.inc()

    @staticmethod
    def session_ended() -> None:
        prom.SESSIONS_ACTIVE.dec()

    @staticmethod
    def connection_joined() -> None:
        prom.CONNECTIONS_ACTIVE.inc()

    @staticmethod
    def connection_left(reason: str) -> None:
        prom.CONNECTIONS_ACTIVE.dec()
        prom.CONNECTIONS_CLOSED.labels(reason=reason).inc()

    @staticmethod
    def stream_live() -> None:
        prom.STREAMS_ACTIVE.inc()

    @staticmethod
    def stream_ended(reason: str) -> None:
        prom.STREAMS_ACTIVE.dec()
        prom.STREAMS_DESTROYED.labels(reason=reason).inc()

    @staticmethod
    def subscription_started() -> None:
        prom.SUBSCRIPTIONS_ACTIVE.inc()

    @staticmethod
    def subscription_ended() -> None:
        prom.SUBSCRIPTIONS_ACTIVE.dec()

    @staticmethod
    def peer_timed_out() -> None:
        prom.PEER_CONNECTIONS_TIMED_OUT.inc()

    # --- the media plane's listener ---------------------------------------------------------

    def media_event(self, event: MediaEvent, owner: PeerOwner | None, connection_name: str = "") -> None:
        """Record one media event of the peer ``owner`` owns (None: a peer no session owns any
        more; only process-wide figures are kept). ``connection_name`` names the owner's
        connection in the sentences support staff read."""
        if isinstance(event, DatagramsDropped):
            for reason, count in event.counts.items():
                if count:
                    prom.MEDIA_DATAGRAMS_DROPPED.labels(reason=reason.value).inc(count)
            return
        if isinstance(event, PacketsDropped):
            for forward_reason, forward_count in event.counts.items():
                if forward_count:
                    prom.RTP_PACKETS_DROPPED.labels(reason=forward_reason.value).inc(forward_count)
            return
        if isinstance(event, QualitySample):
            if event.direction == "out":
                prom.RTP_PACKETS_FORWARDED.labels(kind=event.kind).inc(event.packets)
                prom.RTP_BYTES_FORWARDED.labels(kind=event.kind).inc(event.octets)
                prom.NACKS_ANSWERED.inc(event.retransmitted)
            if owner is not None:
                # The timeline shares the event log's batched, append-only writer.
                self.eventlog.append(LogEntry(
                    time_ms=event.time_ms, session_id=owner.session_id, connection_id=owner.connection_id,
                    stream_id=event.stream_id, kind=EventKind.QUALITY_SAMPLE,
                    text=f"{event.kind} {event.direction} {event.bitrate_kbps} kbps", payload=sample_payload(event)))
            return
        if owner is None:
            return
        sid, cid = owner.session_id, owner.connection_id
        if isinstance(event, PeerStateChanged):
            what = "Publisher" if owner.is_publish else "Subscriber"
            pair = event.pair
            pair_text = (f" via {pair['local_type']}/{pair['remote_type']} {pair['protocol']}" if pair else "")
            kind = EventKind.ICE_STATE_CHANGED if event.layer == "ice" else EventKind.DTLS_STATE_CHANGED
            offered: dict[str, Any] = {}
            offered_text = ""
            if event.state == "failed":
                offered = {"local_candidates": list(event.local_candidates),
                           "remote_candidates": list(event.remote_candidates)}
                offered_text = ". " + _offered_text(event.local_candidates, event.remote_candidates)
            self.log(sid, kind, f"{what} {event.layer} state: {event.state}{pair_text}{offered_text}",
                     connection_id=cid, stream_id=event.stream_id, peer_id=event.peer_id, layer=event.layer,
                     state=event.state, candidate_pair=pair, **offered)
        elif isinstance(event, (PeerTimedOut, PeerClosedUnconnected)):
            # Not up within the deadline (a failure), or closed by its client before it was up (the
            # client's own report says why): the layer that never finished, with what each side
            # offered. The hub then logs the publish or subscription that ended.
            what = "Publisher" if owner.is_publish else "Subscriber"
            ice_done = event.ice_state in ("completed", "connected")
            layer = "dtls" if ice_done else "ice"
            if isinstance(event, PeerTimedOut):
                why = ("ICE found a candidate pair but DTLS never connected over it" if ice_done
                       else "no candidate pair worked")
                state, detail = "failed", f"failed (not connected within {event.timeout_s:g} s: {why})"
                timing: dict[str, Any] = {"reason": "timeout", "timeout_s": event.timeout_s}
            else:
                why = "ICE had found a candidate pair, DTLS had not connected" if ice_done else f"ICE {event.ice_state}"
                state, detail = "closed", f"closed before connecting ({event.after_s:g} s after it was set up; {why})"
                timing = {"reason": "closed_before_connected", "after_s": event.after_s}
            self.log(sid, EventKind.DTLS_STATE_CHANGED if ice_done else EventKind.ICE_STATE_CHANGED,
                     f"{what} {layer} state: {detail}. "
                     + _offered_text(event.local_candidates, event.remote_candidates),
                     connection_id=cid, stream_id=event.stream_id, peer_id=event.peer_id, layer=layer,
                     state=state, ice_state=event.ice_state, candidate_pair=None,
                     local_candidates=list(event.local_candidates),
                     remote_candidates=list(event.remote_candidates), **timing)
        elif isinstance(event, KeyframeRequested):
            prom.KEYFRAMES_REQUESTED.inc()
            self.log(sid, EventKind.KEYFRAME_REQUESTED, f"Keyframe requested ({event.reason})", connection_id=cid,
                     stream_id=event.stream_id, method="pli", by=event.subscription_id, reason=event.reason)
        elif isinstance(event, DimensionsChanged):
            self.log(sid, EventKind.DIMENSIONS_CHANGED, f"Dimensions changed: {event.width}x{event.height}",
                     connection_id=cid, stream_id=event.stream_id, width=event.width, height=event.height)
        elif isinstance(event, MediaFlowChanged):
            name = connection_name or cid
            if event.flowing:
                text = f"{event.kind.capitalize()} from {name} is flowing again"
            else:
                text = f"No {event.kind} received from {name} for {event.idle_s:.0f} seconds"
            self.log(sid, EventKind.QUALITY_ALERT, text, connection_id=cid, stream_id=event.stream_id,
                     metric="media_flow", media=event.kind, flowing=event.flowing, idle_s=event.idle_s)
        # PeerFailed / PeerTimedOut: the hub cleans up and records what ended.


#: Candidates of one side named in an entry's sentence (all of them are in its payload).
TEXT_CANDIDATES = 6


def _offered_text(local: Sequence[Mapping[str, str]], remote: Sequence[Mapping[str, str]]) -> str:
    """``Server offered host udp 127.0.0.1:40000; client offered none``: for support staff."""

    def side(candidates: Sequence[Mapping[str, str]]) -> str:
        if not candidates:
            return "none"
        named = ", ".join(f"{c.get('type')} {c.get('protocol')} {c.get('address')}"
                          for c in candidates[:TEXT_CANDIDATES])
        more = len(candidates) - TEXT_CANDIDATES
        return named + (f" and {more} more" if more > 0 else "")

    return f"Server offered {side(local)}; client offered {side(remote)}"
