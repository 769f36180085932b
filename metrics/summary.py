"""Meeting stats, user data, scores and the error log of one session: pure functions over its
event-log entries and the roll-ups of its quality samples and client stats (metrics.rollup).

:func:`session_view` reads the entries once into participants, streams and subscriptions;
:func:`summary` and ``metrics.diagnosis.diagnose`` both work from it. Given only entries (as
``EventLog.events`` returns them, samples included) they fold the samples themselves; the API
passes what ``EventLog.analysis`` read instead (the entries but the samples, the stored
roll-ups and the session's span), with the same result. Entries are dicts with ``seq``,
``time_ms``, ``connection_id``, ``stream_id``, ``kind``, ``component``, ``text`` and ``payload``
(a dict); anything a client wrote is read defensively (wrong types are skipped)."""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from metrics import rollup, scores
from metrics.events import EventKind

Entry = Mapping[str, Any]

#: Kinds that count as a failure in the error log.
FAILURE_KINDS: Final = frozenset({EventKind.TOKEN_REJECTED, EventKind.PUBLISH_FAILURE, EventKind.SUBSCRIBE_FAILURE,
                                  EventKind.QUALITY_ALERT})
#: Client events that are failures.
CLIENT_FAILURES: Final = frozenset({"getUserMediaFailed", "iceFailed", "connectionFailed"})


@dataclass
class Participant:
    connection_id: str
    name: str = ""
    role: str = ""
    user: str = ""
    joined_ms: int | None = None
    left_ms: int | None = None
    reason: str | None = None
    user_agent: str = ""
    ip: str = ""
    sdk_version: str = ""
    #: seq of the entries that say who this is (evidence)
    seqs: list[int] = field(default_factory=list)


@dataclass
class Stream:
    stream_id: str
    connection_id: str
    name: str = ""
    has_audio: bool = False
    has_video: bool = False
    created_ms: int | None = None
    destroyed_ms: int | None = None
    reason: str | None = None
    seq: int = 0


@dataclass
class Subscription:
    subscription_id: str
    connection_id: str
    stream_id: str
    attempt_ms: int
    succeeded_ms: int | None = None
    ended_ms: int | None = None
    seq: int = 0


@dataclass
class SessionView:
    """One session read once: who was there, what they sent and received, and its entries
    (every kind but the samples, which are read as roll-ups)."""

    session_id: str
    entries: list[Entry]
    participants: dict[str, Participant]
    streams: dict[str, Stream]
    subscriptions: dict[str, Subscription]
    #: The quality samples and client stats rolled up (metrics.rollup).
    rollup: rollup.SessionRollup
    started_ms: int | None
    ended_ms: int | None

    def by_kind(self, *kinds: str) -> list[Entry]:
        return [e for e in self.entries if e.get("kind") in kinds]

    def client_events(self, *names: str) -> list[Entry]:
        return [e for e in self.entries if e.get("kind") == EventKind.CLIENT_EVENT
                and _payload(e).get("event") in names]

    def who(self, connection_id: str | None) -> dict[str, str] | None:
        p = self.participants.get(connection_id or "")
        if p is None:
            return None
        return {"connection_id": p.connection_id, "name": p.name, "role": p.role}

    def name(self, connection_id: str | None) -> str:
        p = self.participants.get(connection_id or "")
        return p.name if p is not None and p.name else (connection_id or "someone")


def _payload(entry: Entry) -> Mapping[str, Any]:
    payload = entry.get("payload")
    return payload if isinstance(payload, Mapping) else {}


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


#: Kinds rolled up (metrics.rollup) rather than read one by one.
SAMPLE_KINDS: Final = frozenset({EventKind.QUALITY_SAMPLE, EventKind.CLIENT_STATS})


def session_view(session_id: str, entries: Iterable[Entry], rolled: rollup.SessionRollup | None = None,
                 span: tuple[int | None, int | None] | None = None) -> SessionView:
    """Read a session's entries (any order; sorted here by time, then seq).

    ``rolled`` and ``span`` are the session's stored roll-ups and (first, last) entry times
    (``EventLog.analysis``): then ``entries`` need not hold the samples. Without them both are
    computed from ``entries``, exactly as the event log's writer computes them."""
    ordered = sorted(entries, key=lambda e: (int(e.get("time_ms") or 0), int(e.get("seq") or 0)))
    if rolled is None:
        rolled = rollup.from_entries(ordered)
    participants: dict[str, Participant] = {}
    streams: dict[str, Stream] = {}
    subscriptions: dict[str, Subscription] = {}
    kept: list[Entry] = []
    for e in ordered:
        kind, payload, t = e.get("kind"), _payload(e), int(e.get("time_ms") or 0)
        if kind in SAMPLE_KINDS:
            continue
        kept.append(e)
        cid, sid, seq = _str(e.get("connection_id")), _str(e.get("stream_id")), int(e.get("seq") or 0)
        if cid and kind in (EventKind.CONNECT_ATTEMPT, EventKind.SERVER_DETECTED_CONNECT):
            p = participants.setdefault(cid, Participant(cid))
            p.seqs.append(seq)
            p.name = _str(payload.get("name")) or p.name
            p.role = _str(payload.get("role")) or p.role
            p.user = _str(payload.get("user")) or p.user
            p.user_agent = _str(payload.get("user_agent")) or p.user_agent
            p.ip = _str(payload.get("ip")) or p.ip
            p.sdk_version = _str(payload.get("sdk_version")) or p.sdk_version
            if p.joined_ms is None:
                p.joined_ms = t
        elif kind == EventKind.DISCONNECT and cid in participants:
            participants[cid].left_ms = t
            participants[cid].reason = _str(payload.get("reason")) or None
        elif kind == EventKind.CLIENT_EVENT and cid in participants and payload.get("sdk_version"):
            participants[cid].sdk_version = _str(payload.get("sdk_version"))
        elif kind == EventKind.STREAM_CREATED and sid:
            streams[sid] = Stream(sid, cid, _str(payload.get("name")), payload.get("has_audio") is True,
                                  payload.get("has_video") is True, t, seq=seq)
        elif kind == EventKind.STREAM_DESTROYED and sid in streams:
            streams[sid].destroyed_ms = t
            streams[sid].reason = _str(payload.get("reason")) or None
        elif kind == EventKind.SUBSCRIBE_ATTEMPT and _str(payload.get("subscription_id")):
            sub_id = _str(payload.get("subscription_id"))
            subscriptions[sub_id] = Subscription(sub_id, cid, sid, t, seq=seq)
        elif kind == EventKind.SUBSCRIBE_SUCCESS and _str(payload.get("subscription_id")) in subscriptions:
            subscriptions[_str(payload.get("subscription_id"))].succeeded_ms = t
        elif kind == EventKind.UNSUBSCRIBED and _str(payload.get("subscription_id")) in subscriptions:
            subscriptions[_str(payload.get("subscription_id"))].ended_ms = t
    if span is None:
        span = ((int(ordered[0].get("time_ms") or 0), int(ordered[-1].get("time_ms") or 0)) if ordered
                else (None, None))
    return SessionView(session_id, kept, participants, streams, subscriptions, rolled, span[0], span[1])


# --- scores per participant -----------------------------------------------------------------

def tracks_of(view: SessionView, track: str, direction: str, kind: str | None = None) -> list[rollup.Track]:
    """The rolled-up tracks of a stream upstream (``in``) or a subscription downstream (``out``)."""
    kinds = ("audio", "video") if kind is None else (kind,)
    return [t for k in kinds if (t := view.rollup.tracks.get((track, direction, k))) is not None]


def first_media_ms(view: SessionView, subscription_id: str) -> int | None:
    times = [t.first_media_ms for t in tracks_of(view, subscription_id, "out") if t.first_media_ms is not None]
    return min(times) if times else None


def participant_scores(view: SessionView, connection_id: str) -> dict[str, Any]:
    """audio_mos (mean over the participant's audio uplink samples), video_level (median level
    of their video uplink), freezes (of the video they received) and time_to_first_media_ms
    (median over their subscriptions). A score with nothing to go on is left out."""
    out: dict[str, Any] = {}
    mine = [s for s in view.streams.values() if s.connection_id == connection_id]
    mos = rollup.mean_mos(t for st in mine for t in tracks_of(view, st.stream_id, "in", "audio"))
    if mos is not None:
        out["audio_mos"] = mos
    level = rollup.median_level(t for st in mine for t in tracks_of(view, st.stream_id, "in", "video"))
    if level is not None:
        out["video_level"] = level
    received = [f for f in view.rollup.freezes if f.connection_id == connection_id]
    if received:
        out["freezes"] = sum(f.count for f in received)
    ttfm = [t for sub in view.subscriptions.values() if sub.connection_id == connection_id
            if (t := scores.time_to_first_media(sub.attempt_ms, first_media_ms(view, sub.subscription_id)))
            is not None]
    if ttfm:
        out["time_to_first_media_ms"] = int(statistics.median_low(ttfm))
    return out


def quality_over_time(view: SessionView, connection_id: str) -> list[dict[str, Any]]:
    """The participant's connection quality at each second with samples (metrics.rollup.QUALITY_MS):
    the worst score of the tracks it sent and received (the samples its connection reported)."""
    return [{"time_ms": t, "score": score, "level": rollup.quality_level(score)}
            for cid, t, score in view.rollup.quality if cid == connection_id]


# --- the summary ----------------------------------------------------------------------------

def _user_agent_parser() -> Callable[[str], Mapping[str, str]] | None:
    try:
        module = importlib.import_module("metrics.useragent")
    except ImportError:
        return None
    parse = getattr(module, "parse", None)
    return parse if callable(parse) else None


def _device(user_agent: str) -> dict[str, str]:
    parse = _user_agent_parser()
    if parse is None or not user_agent:
        return {"browser": "", "os": "", "device": ""}
    try:
        parsed = parse(user_agent)
    except Exception:
        return {"browser": "", "os": "", "device": ""}
    return {k: _str(parsed.get(k)) for k in ("browser", "os", "device")}


def _rate(entries: Sequence[Entry], attempts: Iterable[str], failures: Iterable[str]) -> dict[str, int]:
    a, f = set(attempts), set(failures)
    return {"attempts": sum(1 for e in entries if e.get("kind") in a),
            "failures": sum(1 for e in entries if e.get("kind") in f)}


def summary(session_id: str, entries: Iterable[Entry], rolled: rollup.SessionRollup | None = None,
            span: tuple[int | None, int | None] | None = None) -> dict[str, Any]:
    """The session's meeting stats, participants with their scores and quality over time, and
    its error log (the shape docs/openapi.yaml gives for ``/api/sessions/{id}/summary``).
    ``rolled`` and ``span``: see :func:`session_view`."""
    view = session_view(session_id, entries, rolled, span)
    end = view.ended_ms or 0
    streamed_ms = sum(max(0, (st.destroyed_ms or end) - (st.created_ms or end)) for st in view.streams.values())
    meeting = {
        "users": len({p.user or p.connection_id for p in view.participants.values()}),
        "connections": len(view.participants),
        "streams": len(view.streams),
        "subscribers": sum(1 for sub in view.subscriptions.values() if sub.succeeded_ms is not None),
        "streamed_minutes": round(streamed_ms / 60_000, 2),
        "started_ms": view.started_ms,
        "ended_ms": view.ended_ms,
    }
    participants = []
    for p in view.participants.values():
        participants.append({
            "connection_id": p.connection_id, "name": p.name, "role": p.role, "user": p.user,
            "joined_ms": p.joined_ms, "left_ms": p.left_ms, "reason": p.reason, "user_agent": p.user_agent,
            **_device(p.user_agent), "ip": p.ip, "sdk_version": p.sdk_version,
            "scores": participant_scores(view, p.connection_id),
            "quality": quality_over_time(view, p.connection_id),
        })
    entries_list = view.entries
    log = [e for e in entries_list if e.get("kind") in FAILURE_KINDS
           or (e.get("kind") == EventKind.CLIENT_EVENT and _payload(e).get("event") in CLIENT_FAILURES)]
    errors = {
        "connect": {"attempts": sum(1 for e in entries_list if e.get("kind") in (EventKind.CONNECT_ATTEMPT,
                                                                                 EventKind.TOKEN_REJECTED)),
                    "failures": sum(1 for e in entries_list if e.get("kind") == EventKind.TOKEN_REJECTED)},
        "publish": _rate(entries_list, [EventKind.PUBLISH_ATTEMPT], [EventKind.PUBLISH_FAILURE]),
        "subscribe": _rate(entries_list, [EventKind.SUBSCRIBE_ATTEMPT], [EventKind.SUBSCRIBE_FAILURE]),
        "log": log,
    }
    return {"session_id": session_id, "meeting": meeting, "participants": participants, "errors": errors}
