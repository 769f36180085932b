"""Meeting stats, user data, scores and the error log of one session: pure functions over its
event-log entries (quality samples and client stats included), as ``EventLog.events`` returns them.

:func:`session_view` reads the entries once into participants, streams and subscriptions;
:func:`summary` and ``metrics.diagnosis.diagnose`` both work from it. Entries are dicts with
``seq``, ``time_ms``, ``connection_id``, ``stream_id``, ``kind``, ``component``, ``text`` and
``payload`` (a dict); anything a client wrote is read defensively (wrong types are skipped).
"""

from __future__ import annotations

import importlib
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from metrics import scores
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
    """One session read once: who was there, what they sent and received, and the raw entries."""

    session_id: str
    entries: list[Entry]
    participants: dict[str, Participant]
    streams: dict[str, Stream]
    subscriptions: dict[str, Subscription]
    #: qualitySample payloads (with ``seq`` and ``connection_id``), oldest first.
    samples: list[dict[str, Any]]
    #: clientStats payloads (with ``seq``, ``connection_id`` and ``time_ms``), oldest first.
    client_stats: list[dict[str, Any]]
    started_ms: int | None
    ended_ms: int | None

    def by_kind(self, *kinds: str) -> list[Entry]:
        return [e for e in self.entries if e.get("kind") in kinds]

    def client_events(self, *names: str) -> list[Entry]:
        return [e for e in self.entries if e.get("kind") == EventKind.CLIENT_EVENT
                and _payload(e).get("event") in names]

    def __post_init__(self) -> None:
        # Indexes built once: a call-hour holds tens of thousands of samples.
        self._by_stream: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._by_peer: dict[str, list[dict[str, Any]]] = {}
        for s in self.samples:
            self._by_stream.setdefault((str(s.get("stream_id")), str(s.get("direction"))), []).append(s)
            self._by_peer.setdefault(str(s.get("peer_id")), []).append(s)

    def stream_samples(self, stream_id: str, direction: str) -> list[dict[str, Any]]:
        return self._by_stream.get((stream_id, direction), [])

    def peer_samples(self, peer_id: str) -> list[dict[str, Any]]:
        return self._by_peer.get(peer_id, [])

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


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def session_view(session_id: str, entries: Iterable[Entry]) -> SessionView:
    """Read a session's entries (any order; sorted here by time, then seq)."""
    ordered = sorted(entries, key=lambda e: (int(e.get("time_ms") or 0), int(e.get("seq") or 0)))
    participants: dict[str, Participant] = {}
    streams: dict[str, Stream] = {}
    subscriptions: dict[str, Subscription] = {}
    samples: list[dict[str, Any]] = []
    client_stats: list[dict[str, Any]] = []
    for e in ordered:
        kind, payload, t = e.get("kind"), _payload(e), int(e.get("time_ms") or 0)
        cid, sid, seq = _str(e.get("connection_id")), _str(e.get("stream_id")), int(e.get("seq") or 0)
        if kind == EventKind.QUALITY_SAMPLE:
            samples.append({**payload, "seq": seq, "connection_id": cid})
            continue
        if kind == EventKind.CLIENT_STATS:
            client_stats.append({**payload, "seq": seq, "connection_id": cid, "time_ms": t})
            continue
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
    times = [int(e.get("time_ms") or 0) for e in ordered]
    return SessionView(session_id, ordered, participants, streams, subscriptions, samples, client_stats,
                       min(times) if times else None, max(times) if times else None)


# --- scores per participant -----------------------------------------------------------------

def first_media_ms(view: SessionView, subscription_id: str) -> int | None:
    for s in view.peer_samples(subscription_id):
        if (s.get("packets") or 0) > 0:
            return int(s.get("time_ms") or 0)
    return None


def participant_scores(view: SessionView, connection_id: str) -> dict[str, Any]:
    """audio_mos (mean over the participant's audio uplink samples), video_level (median level
    of their video uplink), freezes (of the video they received) and time_to_first_media_ms
    (median over their subscriptions). A score with nothing to go on is left out."""
    out: dict[str, Any] = {}
    mine = [s for s in view.streams.values() if s.connection_id == connection_id]
    audio = [s for st in mine for s in view.stream_samples(st.stream_id, "in")
             if s.get("kind") == "audio" and (s.get("packets") or 0) > 0]
    if audio:
        out["audio_mos"] = round(statistics.fmean(scores.audio_mos(
            _num(s.get("loss_pct")) or 0.0, _num(s.get("rtt_ms")), _num(s.get("jitter_ms")),
            _num(s.get("bitrate_kbps"))) for s in audio), 2)
    video = [s for st in mine for s in view.stream_samples(st.stream_id, "in") if s.get("kind") == "video"]
    if video:
        levels = [int(scores.video_level(s.get("width"), s.get("height"), _num(s.get("frame_rate")),
                                         _num(s.get("bitrate_kbps")))) for s in video]
        out["video_level"] = int(statistics.median_low(levels))
    received = [s for s in view.client_stats if s.get("connection_id") == connection_id
                and s.get("direction") == "recv" and s.get("kind") == "video"]
    if received:
        count = 0
        for track in {str(s.get("stream_id")) for s in received}:
            count += scores.freezes_from_client_stats([s for s in received if str(s.get("stream_id")) == track])[0]
        out["freezes"] = count
    ttfm = [t for sub in view.subscriptions.values() if sub.connection_id == connection_id
            if (t := scores.time_to_first_media(sub.attempt_ms, first_media_ms(view, sub.subscription_id)))
            is not None]
    if ttfm:
        out["time_to_first_media_ms"] = int(statistics.median_low(ttfm))
    return out


def quality_over_time(view: SessionView, connection_id: str) -> list[dict[str, Any]]:
    """The participant's connection quality at each sample time: the worst over the tracks it
    sent and received at that time."""
    mine = [s for st in view.streams.values() if st.connection_id == connection_id
            for s in view.stream_samples(st.stream_id, "in")]
    mine += [s for sub in view.subscriptions.values() if sub.connection_id == connection_id
             for s in view.peer_samples(sub.subscription_id)]
    by_time: dict[int, tuple[float, scores.QualityLevel]] = {}
    for s in mine:
        expected = (scores.expected_video_kbps(_height(s)) * 0.5 if s.get("kind") == "video" else None)
        score = scores.connection_quality(_num(s.get("loss_pct")) or 0.0, _num(s.get("rtt_ms")),
                                          _num(s.get("jitter_ms")), _num(s.get("bitrate_kbps")), expected,
                                          s.get("packets") if isinstance(s.get("packets"), int) else None)
        t = int(s.get("time_ms") or 0)
        bucket = t - t % 1000
        if bucket not in by_time or score[0] < by_time[bucket][0]:
            by_time[bucket] = score
    return [{"time_ms": t, "score": sc, "level": str(level)} for t, (sc, level) in sorted(by_time.items())]


def _height(sample: Mapping[str, Any]) -> int | None:
    w, h = sample.get("width"), sample.get("height")
    if isinstance(w, int) and isinstance(h, int):
        return min(w, h)
    return None


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


def summary(session_id: str, entries: Iterable[Entry]) -> dict[str, Any]:
    """The session's meeting stats, participants with their scores and quality over time, and
    its error log (the shape docs/openapi.yaml gives for ``/api/sessions/{id}/summary``)."""
    view = session_view(session_id, entries)
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
