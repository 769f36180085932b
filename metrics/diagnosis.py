"""Why did this call fail? Findings over one session's entries, in words support staff can read
to a clinician, each with who and which direction it concerns, when, the evidence and a next step.

Pure: :func:`diagnose` takes the entries ``EventLog.events`` returns (quality samples, client
events and client stats included), or the entries but the samples together with their stored
roll-ups (``EventLog.analysis``, see metrics.rollup), and returns the findings, problems first. One rule per
finding type in :data:`RULES` (a table, not an if-chain); docs/inspector.md lists them all with
their thresholds. A clean call yields no ``problem``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from metrics.events import EventKind
from metrics import rollup
from metrics.rollup import JITTER_MS, LOSS_PCT, LOW_VIDEO_KBPS, RAMP_UP_SAMPLES, RTT_MS, Mark, SessionRollup
from metrics.summary import Entry, SessionView, Stream, session_view, tracks_of

# Thresholds (docs/inspector.md); the roll-ups keep every sample over one (metrics.rollup).
LOW_AUDIO_KBPS: Final = 12.0
#: Share of a stream's samples under the bitrate floor that makes a finding.
LOW_BITRATE_SHARE: Final = 0.3
#: Samples over a threshold that make a finding (one bad interval is noise).
MIN_BAD_SAMPLES: Final = 2


class Severity(StrEnum):
    PROBLEM = "problem"
    WARNING = "warning"
    INFO = "info"


SEVERITY_ORDER: Final = {Severity.PROBLEM: 0, Severity.WARNING: 1, Severity.INFO: 2}


class FindingType(StrEnum):
    NEVER_OPENED_LINK = "never_opened_link"
    NEVER_JOINED = "never_joined"
    LINK_REFUSED = "link_refused"
    DEVICE_DENIED = "device_denied"
    DEVICE_MISSING = "device_missing"
    AUDIO_ONLY = "audio_only"
    ICE_FAILED = "ice_failed"
    NEVER_PUBLISHED = "never_published"
    ONE_WAY_MEDIA = "one_way_media"
    LOW_BITRATE = "low_bitrate"
    HIGH_LOSS = "high_loss"
    HIGH_JITTER = "high_jitter"
    HIGH_RTT = "high_rtt"
    FROZEN_VIDEO = "frozen_video"
    HUNG_UP = "hung_up"
    NETWORK_LOST = "network_lost"
    SERVER_SHUTDOWN = "server_shutdown"
    NODE_FAILURE = "node_failure"
    PHONE_FALLBACK = "phone_fallback"
    ABANDONED = "abandoned"
    TRANSFERRED = "transferred"
    RECONNECTED = "reconnected"


@dataclass
class Finding:
    type: FindingType
    severity: Severity
    cause: str
    next_step: str
    participant: dict[str, str] | None = None
    direction: str | None = None  # "send" | "recv" | None
    from_ms: int | None = None
    until_ms: int | None = None
    entries: list[int] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"type": str(self.type), "severity": str(self.severity), "cause": self.cause,
                "participant": self.participant, "direction": self.direction, "from_ms": self.from_ms,
                "until_ms": self.until_ms, "evidence": {"entries": self.entries, "samples": self.samples},
                "next_step": self.next_step}


def _payload(entry: Entry) -> Mapping[str, Any]:
    payload = entry.get("payload")
    return payload if isinstance(payload, Mapping) else {}


def _t(entry: Entry) -> int:
    return int(entry.get("time_ms") or 0)


def _seq(entry: Entry) -> int:
    return int(entry.get("seq") or 0)


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _patients(view: SessionView) -> list[str]:
    return [cid for cid, p in view.participants.items() if p.role == "patient"]


# --- the rules ------------------------------------------------------------------------------

def _link_sent(view: SessionView) -> list[Entry]:
    return [e for e in view.by_kind(EventKind.CONSULTATION) if str(e.get("text", "")).startswith("Join link sent")]


def never_opened_link(view: SessionView) -> list[Finding]:
    sent = _link_sent(view)
    if not sent:
        return []
    opened = (view.by_kind(EventKind.TOKEN_REJECTED) or _patients(view)
              or [e for e in view.by_kind(EventKind.CONSULTATION) if "logged in via link" in str(e.get("text", ""))]
              or view.by_kind(EventKind.QUEUE))
    if opened:
        return []
    return [Finding(FindingType.NEVER_OPENED_LINK, Severity.PROBLEM,
                    "The patient never opened the consultation link.",
                    "Call the patient, check the link reached them (e-mail or SMS) and send it again if needed.",
                    from_ms=_t(sent[0]), until_ms=view.ended_ms, entries=[_seq(e) for e in sent])]


def never_joined(view: SessionView) -> list[Finding]:
    """Someone expected in the call never connected: the patient of an admitted consultation,
    or anyone at all besides the first participant of a call."""
    admitted = [e for e in view.by_kind(EventKind.QUEUE) if "admitted" in str(e.get("text", ""))]
    roles = {p.role for p in view.participants.values()}
    if admitted and "patient" not in roles:
        return [Finding(FindingType.NEVER_JOINED, Severity.PROBLEM,
                        "The patient was admitted but never joined the video call.",
                        "Call the patient and ask them to open the link again; offer a phone consultation.",
                        from_ms=_t(admitted[0]), until_ms=view.ended_ms, entries=[_seq(e) for e in admitted])]
    if len(view.participants) == 1 and not view.by_kind(EventKind.TOKEN_REJECTED):
        (p,) = view.participants.values()
        return [Finding(FindingType.NEVER_JOINED, Severity.PROBLEM,
                        f"Only {p.name or p.connection_id} ({p.role}) joined; nobody else ever joined the call.",
                        "Check the other participant had the right link and time; call them.",
                        participant=view.who(p.connection_id), from_ms=p.joined_ms, until_ms=p.left_ms or view.ended_ms,
                        entries=p.seqs[:2])]
    return []


_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")


def link_refused(view: SessionView) -> list[Finding]:
    found = []
    for e in view.by_kind(EventKind.TOKEN_REJECTED):
        payload = _payload(e)
        code, reason = str(payload.get("code", "")), str(payload.get("reason", ""))
        when = _ISO.search(reason)
        at = when.group(0) if when else "an earlier time"
        if code in ("token_expired", "too_late"):
            cause = f"The link was refused because it had expired (it closed at {at})."
            step = "Send the patient a new link, or book a new time."
        elif code in ("token_not_yet_valid", "too_early"):
            cause = f"The link was refused because it was used too early (it opens at {at})."
            step = "Tell the patient when the link opens and to use it again then."
        elif code == "room_mismatch":
            cause = "The link was refused because it is for another consultation."
            step = "Check the patient used the link sent for this consultation; send it again."
        else:
            cause = "The link was refused because it is not valid (damaged or forged)."
            step = "Send the patient a new link; if it happens again, report it to security."
        found.append(Finding(FindingType.LINK_REFUSED, Severity.PROBLEM, cause, step, from_ms=_t(e),
                             until_ms=_t(e), entries=[_seq(e)]))
    return found


_DENIED_ERRORS: Final = {"NotAllowedError", "PermissionDeniedError", "SecurityError"}
_MISSING_ERRORS: Final = {"NotFoundError", "DevicesNotFoundError", "OverconstrainedError"}
_BUSY_ERRORS: Final = {"NotReadableError", "TrackStartError", "AbortError"}


def devices(view: SessionView) -> list[Finding]:
    found = []
    for e in view.client_events("deviceCheck", "getUserMediaFailed"):
        payload, who = _payload(e), view.who(e.get("connection_id"))
        name = view.name(e.get("connection_id"))
        problems: list[tuple[str, str]] = []
        if payload.get("event") == "deviceCheck":
            for device in ("camera", "microphone"):
                problems.append((device, str(payload.get(device, ""))))
        else:
            error = str(payload.get("error_name", ""))
            state = ("denied" if error in _DENIED_ERRORS else "not_found" if error in _MISSING_ERRORS
                     else "in_use" if error in _BUSY_ERRORS else "error")
            problems.append(("camera or microphone", state))
        for device, state in problems:
            if state == "denied":
                found.append(Finding(FindingType.DEVICE_DENIED, Severity.PROBLEM,
                                     f"{name}'s browser was refused access to the {device}.",
                                     f"Ask {name} to allow the {device} for this site in the browser's address bar "
                                     "and reload the page.", participant=who, direction="send", from_ms=_t(e),
                                     until_ms=_t(e), entries=[_seq(e)]))
            elif state in ("not_found", "in_use", "error"):
                what = {"not_found": f"{name} has no {device} the browser can find",
                        "in_use": f"{name}'s {device} is in use by another program",
                        "error": f"{name}'s {device} could not be started"}[state]
                found.append(Finding(FindingType.DEVICE_MISSING, Severity.PROBLEM, f"{what}.",
                                     f"Ask {name} to connect a {device} or close other programs using it, "
                                     "then reload the page.", participant=who, direction="send", from_ms=_t(e),
                                     until_ms=_t(e), entries=[_seq(e)]))
    return found


def audio_only(view: SessionView) -> list[Finding]:
    found = []
    for cid, p in view.participants.items():
        mine = [s for s in view.streams.values() if s.connection_id == cid]
        if mine and not any(s.has_video for s in mine) and any(s.has_audio for s in mine):
            found.append(Finding(FindingType.AUDIO_ONLY, Severity.WARNING,
                                 f"{p.name} joined with audio only: no camera picture was sent.",
                                 f"If video is needed, ask {p.name} to check the camera is allowed and connected.",
                                 participant=view.who(cid), direction="send", from_ms=mine[0].created_ms,
                                 until_ms=mine[0].destroyed_ms, entries=[s.seq for s in mine]))
    return found


def ice_failed(view: SessionView) -> list[Finding]:
    found = []
    for e in view.client_events("iceFailed", "connectionFailed"):
        payload = _payload(e)
        local = {str(t) for t in payload.get("local_candidate_types") or [] if isinstance(t, str)}
        remote = {str(t) for t in payload.get("remote_candidate_types") or [] if isinstance(t, str)}
        servers = payload.get("ice_servers")
        name = view.name(e.get("connection_id"))
        if not local:
            why = "the browser gathered no network address at all"
            step = "Ask the participant to try another network (mobile data) or check the firewall."
        elif "relay" not in local:
            why = ("it had no relay candidate: TURN is not configured" if servers == 0
                   else "it had no relay candidate: the TURN server is not configured or is blocked")
            step = "Check the TURN settings ([media] turn) and that the participant's network allows TURN (443/TCP)."
        elif "srflx" not in local and "host" in local:
            why = "UDP looks blocked on the participant's network (no server-reflexive candidate)"
            step = "Make sure TURN over TCP/TLS on port 443 is offered; ask to try another network."
        else:
            why = "no candidate pair worked even with a relay"
            step = "Check the TURN server is reachable and healthy."
        cause = (f"{name}'s connection could not be set up ({why}); local candidates: "
                 f"{', '.join(sorted(local)) or 'none'}, server candidates: {', '.join(sorted(remote)) or 'none'}.")
        found.append(Finding(FindingType.ICE_FAILED, Severity.PROBLEM, cause, step, participant=view.who(
            e.get("connection_id")), direction=None, from_ms=_t(e), until_ms=_t(e), entries=[_seq(e)]))
    for e in view.by_kind(EventKind.ICE_STATE_CHANGED):
        if _payload(e).get("state") == "failed":
            name = view.name(e.get("connection_id"))
            found.append(Finding(FindingType.ICE_FAILED, Severity.PROBLEM,
                                 f"{name}'s media connection to the server failed (ICE failed).",
                                 "Check the participant's network allows UDP or TURN over TCP/TLS on port 443.",
                                 participant=view.who(e.get("connection_id")), from_ms=_t(e), until_ms=_t(e),
                                 entries=[_seq(e)]))
    for e in view.by_kind(EventKind.PUBLISH_FAILURE):
        error = str(_payload(e).get("error", ""))
        if "not connected" in error or "before its media connected" in error and "left" not in error:
            name = view.name(e.get("connection_id"))
            found.append(Finding(FindingType.ICE_FAILED, Severity.PROBLEM,
                                 f"{name}'s media never connected to the server ({error}).",
                                 "Check the participant's network allows UDP or TURN over TCP/TLS on port 443.",
                                 participant=view.who(e.get("connection_id")), direction="send", from_ms=_t(e),
                                 until_ms=_t(e), entries=[_seq(e)]))
    return found


def never_published(view: SessionView) -> list[Finding]:
    if len(view.participants) < 2 or not view.streams:
        return []
    found = []
    for cid, p in view.participants.items():
        if any(s.connection_id == cid for s in view.streams.values()):
            continue
        attempts = [_seq(e) for e in view.by_kind(EventKind.PUBLISH_ATTEMPT, EventKind.PUBLISH_FAILURE)
                    if e.get("connection_id") == cid]
        tried = " (it tried, but the publish failed)" if attempts else ""
        found.append(Finding(FindingType.NEVER_PUBLISHED, Severity.PROBLEM,
                             f"{p.name} joined but never sent audio or video{tried}.",
                             f"Ask {p.name} to check camera and microphone permissions and reload the page.",
                             participant=view.who(cid), direction="send", from_ms=p.joined_ms,
                             until_ms=p.left_ms or view.ended_ms, entries=p.seqs[:2] + attempts))
    return found


def one_way_media(view: SessionView) -> list[Finding]:
    found = []
    for sub in view.subscriptions.values():
        stream = view.streams.get(sub.stream_id)
        if stream is None:
            continue
        sent = sum(t.n_media for t in tracks_of(view, sub.stream_id, "in"))
        got = tracks_of(view, sub.subscription_id, "out")
        if not sent or any(t.n_media > 0 for t in got):
            continue
        if sub.succeeded_ms is None and not got:
            lasted = (sub.ended_ms or view.ended_ms or sub.attempt_ms) - sub.attempt_ms
            if lasted < 10_000:
                continue  # an attempt that ended quickly (stream gone, participant left) is not one-way media
        first = sorted((m for t in got for m in view.rollup.track_marks(t.track, "out", t.kind)),
                       key=lambda m: (m.time_ms, m.seq))[:5]
        name, publisher = view.name(sub.connection_id), view.name(stream.connection_id)
        found.append(Finding(FindingType.ONE_WAY_MEDIA, Severity.PROBLEM,
                             f"{name} never received {publisher}'s {_what(stream)} although the server received it.",
                             f"Ask {name} to reload the page; if it persists, check {name}'s network allows "
                             "incoming UDP or TURN.", participant=view.who(sub.connection_id), direction="recv",
                             from_ms=sub.attempt_ms, until_ms=sub.ended_ms or view.ended_ms, entries=[sub.seq],
                             samples=[_mark_ref(m, "packets") for m in first]))
    return found


def _what(stream: Stream) -> str:
    return "audio and video" if stream.has_audio and stream.has_video else "video" if stream.has_video else "audio"


def _mark_ref(m: Mark, *keys: str) -> dict[str, Any]:
    """A sample named as evidence: its seq, time and the figures ``keys``."""
    return {"seq": m.seq, "time_ms": m.time_ms, **{k: _figure(m, k) for k in keys}}


def _figure(m: Mark, key: str) -> Any:
    value = getattr(m, key)
    return int(value) if key == "packets" and float(value).is_integer() else value


def _evidence(marks: Iterable[Mark], bad_type: str, *keys: str) -> list[dict[str, Any]]:
    """The first 10 of ``marks`` (oldest first) that count for ``bad_type``, as evidence."""
    return [_mark_ref(m, *keys) for m in marks if bad_type in rollup.bad_types(m)][:10]


def low_bitrate(view: SessionView) -> list[Finding]:
    found = []
    rolled = view.rollup
    for stream in view.streams.values():
        if not stream.has_video:
            continue
        ins = sum(t.n for t in tracks_of(view, stream.stream_id, "in", "video")) - RAMP_UP_SAMPLES
        low_in = rolled.tallies.get((stream.stream_id, "in", "video", rollup.LOW_BITRATE))
        publisher = view.name(stream.connection_id)
        if low_in and ins > 0 and low_in.count >= MIN_BAD_SAMPLES and low_in.count / ins >= LOW_BITRATE_SHARE:
            median = rollup.median_low([low_in])
            found.append(Finding(
                FindingType.LOW_BITRATE, Severity.PROBLEM,
                f"{publisher}'s video arrived at the server at only {median:.0f} kbps (under {LOW_VIDEO_KBPS:.0f} kbps "
                f"for {100 * low_in.count / ins:.0f}% of the call): {publisher}'s uplink is too slow.",
                f"Ask {publisher} to move closer to the Wi-Fi router, close other programs using the network, "
                "or switch to audio only.", participant=view.who(stream.connection_id), direction="send",
                from_ms=low_in.first_ms, until_ms=low_in.last_ms,
                samples=_evidence(rolled.track_marks(stream.stream_id, "in", "video"), rollup.LOW_BITRATE,
                                  "bitrate_kbps")))
            continue
        for sub in view.subscriptions.values():
            if sub.stream_id != stream.stream_id:
                continue
            outs = sum(t.n for t in tracks_of(view, sub.subscription_id, "out", "video")) - RAMP_UP_SAMPLES
            low_out = rolled.tallies.get((sub.subscription_id, "out", "video", rollup.LOW_BITRATE))
            if low_out and outs > 0 and low_out.count >= MIN_BAD_SAMPLES and low_out.count / outs >= LOW_BITRATE_SHARE:
                viewer = view.name(sub.connection_id)
                median = rollup.median_low([low_out])
                found.append(Finding(
                    FindingType.LOW_BITRATE, Severity.PROBLEM,
                    f"{viewer} received {publisher}'s video at only {median:.0f} kbps for "
                    f"{100 * low_out.count / outs:.0f}% of the call although it was sent well: "
                    f"{viewer}'s downlink is too slow.",
                    f"Ask {viewer} to move closer to the Wi-Fi router or close other programs using the network.",
                    participant=view.who(sub.connection_id), direction="recv", from_ms=low_out.first_ms,
                    until_ms=low_out.last_ms,
                    samples=_evidence(rolled.track_marks(sub.subscription_id, "out", "video"), rollup.LOW_BITRATE,
                                      "bitrate_kbps")))
    return found


@dataclass(frozen=True)
class _Impairment:
    type: FindingType
    bad_type: str  # metrics.rollup's name for it
    field: str
    threshold: float
    unit: str
    words: str


_IMPAIRMENTS: Final = (
    _Impairment(FindingType.HIGH_LOSS, rollup.HIGH_LOSS, "loss_pct", LOSS_PCT, "%", "lost {v:.1f}% of packets"),
    _Impairment(FindingType.HIGH_JITTER, rollup.HIGH_JITTER, "jitter_ms", JITTER_MS, " ms",
                "had {v:.0f} ms of jitter"),
    _Impairment(FindingType.HIGH_RTT, rollup.HIGH_RTT, "rtt_ms", RTT_MS, " ms", "had a round trip of {v:.0f} ms"),
)


def network_impairments(view: SessionView) -> list[Finding]:
    """Loss, jitter or RTT over the threshold on one leg: a publisher's uplink (samples "in")
    or a subscriber's downlink (samples "out"). A subscriber leg is judged on what it added: its
    loss and jitter include what the publisher's uplink already lost (the server forwards gaps
    as they came), so the stream's upstream figure just before is taken off (metrics.rollup)."""
    found = []
    legs: dict[tuple[str, str], list[rollup.Track]] = {}
    for t in view.rollup.tracks.values():
        if t.direction == "in":
            stream = view.streams.get(t.stream_id)
            legs.setdefault((stream.connection_id if stream else t.connection_id, "send"), []).append(t)
        elif t.direction == "out":
            legs.setdefault((t.connection_id, "recv"), []).append(t)
    marks_of = view.rollup.track_marks
    # Legs in the order of their first sample.
    for (cid, direction), tracks in sorted(legs.items(), key=lambda item: min((t.first_ms, t.first_seq)
                                                                              for t in item[1])):
        total = sum(t.n for t in tracks)
        name = view.name(cid)
        leg_name = "uplink (what they send)" if direction == "send" else "downlink (what they receive)"
        for imp in _IMPAIRMENTS:
            tallies = [tally for t in tracks
                       if (tally := view.rollup.tallies.get((t.track, t.direction, t.kind, imp.bad_type)))]
            count = sum(tally.count for tally in tallies)
            if count < MIN_BAD_SAMPLES:
                continue
            worst = rollup.median_low(tallies)
            marks = sorted((m for t in tracks for m in marks_of(t.track, t.direction, t.kind)),
                           key=lambda m: (m.time_ms, m.seq))
            found.append(Finding(
                imp.type, Severity.PROBLEM,
                f"{name}'s {leg_name} " + imp.words.format(v=worst)
                + f" (over {imp.threshold:g}{imp.unit} in {count} of {total} samples).",
                f"Ask {name} to use a wired or stronger connection, or to stop other traffic on their network.",
                participant=view.who(cid), direction=direction,
                from_ms=min((tally.first_ms, tally.first_seq) for tally in tallies)[0],
                until_ms=max((tally.last_ms, tally.last_seq) for tally in tallies)[0],
                samples=_evidence(marks, imp.bad_type, imp.field, "stream_id", "kind")))
    return found


def frozen_video(view: SessionView) -> list[Finding]:
    found = []
    for track in view.rollup.freezes:
        count, frozen_s = track.count, round(track.frozen_s, 3)
        if count:
            stream = view.streams.get(track.stream_id)
            publisher = view.name(stream.connection_id) if stream else "the other participant"
            cid = track.connection_id
            name = view.name(cid)
            found.append(Finding(FindingType.FROZEN_VIDEO, Severity.PROBLEM if frozen_s >= 5 else Severity.WARNING,
                                 f"{publisher}'s video froze {count} time(s) on {name}'s screen "
                                 f"({frozen_s:.1f} s in all).",
                                 "Look at the loss and bitrate findings for the leg at fault; ask for a stronger "
                                 "connection.", participant=view.who(cid), direction="recv", from_ms=track.first_ms,
                                 until_ms=track.last_ms, samples=list(track.evidence)))
    for e in view.by_kind(EventKind.QUALITY_ALERT):
        payload = _payload(e)
        if payload.get("metric") == "media_flow" and payload.get("media") == "video" and payload.get("flowing") is False:
            name = view.name(e.get("connection_id"))
            found.append(Finding(FindingType.FROZEN_VIDEO, Severity.WARNING,
                                 f"The server received no video from {name} for "
                                 f"{_num(payload.get('idle_s')) or 0:.0f} seconds: everyone saw a frozen picture.",
                                 f"Ask {name} whether the camera was covered, turned off or the network dropped.",
                                 participant=view.who(e.get("connection_id")), direction="send", from_ms=_t(e),
                                 until_ms=_t(e), entries=[_seq(e)]))
    return found


def endings(view: SessionView) -> list[Finding]:
    found = []
    for e in view.by_kind(EventKind.DISCONNECT):
        reason = str(_payload(e).get("reason", ""))
        cid = e.get("connection_id")
        name = view.name(cid)
        if reason == "clientDisconnected":
            f = Finding(FindingType.HUNG_UP, Severity.INFO, f"{name} left the call (hung up or closed the page).",
                        "Nothing to do unless they did not mean to leave.")
        elif reason in ("networkDisconnected", "slowConsumer"):
            f = Finding(FindingType.NETWORK_LOST, Severity.PROBLEM,
                        f"{name} lost the network: the server stopped hearing from them"
                        + (" (their connection could not keep up)." if reason == "slowConsumer" else "."),
                        f"Ask {name} to use a stronger connection; the link still works to rejoin.")
        elif reason == "serverShutdown":
            f = Finding(FindingType.SERVER_SHUTDOWN, Severity.PROBLEM,
                        f"The server shut down (or its node failed) while {name} was in the call.",
                        "Check the server's logs and restarts at that time; the participants can rejoin with their links.")
        else:
            continue
        f.participant, f.from_ms, f.until_ms, f.entries = view.who(cid), _t(e), _t(e), [_seq(e)]
        found.append(f)
    return found


def node_failure(view: SessionView) -> list[Finding]:
    """A server node holding the call stopped (``nodeFailure`` entries and disconnects): who was
    cut off, and whether and how soon each rejoined (through another node, same user)."""
    lost: dict[str, dict[str, Any]] = {}  # node -> {"stop": ms, "cids": [...], "seqs": [...]}

    def record(node: str, at: int, seq: int, cids: Iterable[str]) -> None:
        item = lost.setdefault(node, {"stop": at, "cids": [], "seqs": []})
        item["stop"] = min(item["stop"], at)
        item["cids"].extend(c for c in cids if c not in item["cids"])
        item["seqs"].append(seq)

    for e in view.by_kind(EventKind.NODE_FAILURE):
        p = _payload(e)
        seen = _num(p.get("last_seen_ms"))
        cids = [str(c) for c in p.get("connections") or () if isinstance(c, str)]
        record(str(p.get("node") or "?"), int(seen) if seen and seen > 0 else _t(e), _seq(e), cids)
    for e in view.by_kind(EventKind.DISCONNECT):
        p = _payload(e)
        if p.get("reason") == "nodeFailure":
            record(str(p.get("node") or "?"), _t(e), _seq(e), [str(e.get("connection_id") or "")])
    found = []
    for node, item in lost.items():
        stop = int(item["stop"])
        came_back: list[tuple[str, int | None]] = []
        missing: list[tuple[str, int | None]] = []
        for cid in item["cids"]:
            gone = view.participants.get(cid)
            who = (gone.user or gone.name) if gone is not None else ""
            again = sorted((q.joined_ms for q in view.participants.values()
                            if who and q.connection_id != cid and (q.user or q.name) == who
                            and q.joined_ms is not None and q.joined_ms >= stop))
            (came_back if again else missing).append((view.name(cid), again[0] if again else None))
        if not came_back and not missing:
            continue
        names = [n for n, _ in came_back]
        who_back = ("both participants" if len(names) == 2 and not missing
                    else "all participants" if len(names) > 2 and not missing else " and ".join(names))
        cause = f"The server node holding this call ({node}) stopped"
        until = max([stop, *(t for _, t in came_back if t is not None)])
        if came_back:
            cause += f"; {who_back} rejoined through another node after {_duration(until - stop)}"
        if missing:
            cause += f"; {' and '.join(n for n, _ in missing)} did not rejoin"
        found.append(Finding(
            FindingType.NODE_FAILURE, Severity.PROBLEM if missing else Severity.WARNING, cause + ".",
            (f"Call {' and '.join(n for n, _ in missing)} back; their link still works. " if missing else "")
            + f"Check why node {node} stopped (its logs and host at that time).",
            from_ms=stop, until_ms=until, entries=sorted(item["seqs"])))
    return found


def workflow_outcomes(view: SessionView) -> list[Finding]:
    found = []
    for e in view.entries:
        kind, payload = e.get("kind"), _payload(e)
        if kind == EventKind.VIDEO_SESSION and "video_attempted" in payload:
            tried = payload.get("video_attempted") is True
            found.append(Finding(FindingType.PHONE_FALLBACK, Severity.WARNING if tried else Severity.INFO,
                                 "The consultation ended as a phone consultation "
                                 + ("after a video call was tried." if tried else "without a video call."),
                                 "Look at the other findings for why video did not work." if tried
                                 else "Nothing to do: video was not attempted.",
                                 from_ms=_t(e), until_ms=_t(e), entries=[_seq(e)]))
        elif kind == EventKind.QUEUE and payload.get("outcome") == "abandoned":
            waited = _num(payload.get("waited_ms")) or 0.0
            found.append(Finding(FindingType.ABANDONED, Severity.PROBLEM,
                                 f"The patient left the waiting room after {_duration(waited)} without being "
                                 "admitted.",
                                 "Call the patient back; check the waiting room was watched by a clinician.",
                                 from_ms=_t(e) - int(waited), until_ms=_t(e), entries=[_seq(e)]))
        elif kind == EventKind.QUEUE and "from_room" in payload and "to_room" in payload:
            found.append(Finding(FindingType.TRANSFERRED, Severity.INFO,
                                 f"The patient was transferred from waiting room {payload.get('from_room')} to "
                                 f"{payload.get('to_room')}.", "Nothing to do: the session continued.",
                                 from_ms=_t(e), until_ms=_t(e), entries=[_seq(e)]))
    return found


def _duration(ms: float) -> str:
    """``7 minutes`` or, under a minute, ``42 seconds``."""
    if ms >= 60_000:
        minutes = round(ms / 60_000)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    seconds = round(ms / 1000)
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def reconnected(view: SessionView) -> list[Finding]:
    found = []
    by_conn: dict[str, list[Entry]] = {}
    for e in view.client_events("reconnected"):
        by_conn.setdefault(str(e.get("connection_id")), []).append(e)
    # A user who joined again after losing the network reconnected too (the server's view).
    by_user: dict[str, list[Entry]] = {}
    lost = {str(e.get("connection_id")) for e in view.by_kind(EventKind.DISCONNECT)
            if _payload(e).get("reason") == "networkDisconnected"}
    for p in view.participants.values():
        if p.user:
            by_user.setdefault(p.user, [])
    for cid, events in by_conn.items():
        name = view.name(cid)
        found.append(_reconnect_finding(view, cid, name, len(events), [_seq(e) for e in events],
                                        _t(events[0]), _t(events[-1])))
    for user in by_user:
        conns = sorted((p for p in view.participants.values() if p.user == user), key=lambda p: p.joined_ms or 0)
        rejoined = [p for prev, p in zip(conns, conns[1:], strict=False) if prev.connection_id in lost]
        if rejoined and not any(p.connection_id in by_conn for p in conns):
            found.append(_reconnect_finding(view, rejoined[-1].connection_id, rejoined[-1].name, len(rejoined),
                                            [s for p in rejoined for s in p.seqs[:1]], rejoined[0].joined_ms,
                                            rejoined[-1].joined_ms))
    return found


def _reconnect_finding(view: SessionView, cid: str, name: str, n: int, seqs: list[int], start: int | None,
                       end: int | None) -> Finding:
    return Finding(FindingType.RECONNECTED, Severity.WARNING if n >= 2 else Severity.INFO,
                   f"{name} reconnected {n} time(s) during the call.",
                   f"If it happens often, ask {name} for a more stable connection.", participant=view.who(cid),
                   from_ms=start, until_ms=end, entries=seqs)


#: Every rule, in the order its findings are listed within one severity.
RULES: Final[Sequence[Callable[[SessionView], list[Finding]]]] = (
    never_opened_link, link_refused, never_joined, devices, ice_failed, never_published, one_way_media,
    audio_only, low_bitrate, network_impairments, frozen_video, endings, node_failure, workflow_outcomes,
    reconnected,
)


def findings(view: SessionView) -> list[Finding]:
    out = [f for rule in RULES for f in rule(view)]
    out.sort(key=lambda f: SEVERITY_ORDER[f.severity])  # stable: rule order within a severity
    return out


def diagnose(session_id: str, entries: Iterable[Entry], rolled: SessionRollup | None = None,
             span: tuple[int | None, int | None] | None = None) -> dict[str, Any]:
    """The findings for one session (the shape of ``GET /api/sessions/{id}/diagnosis``).
    ``rolled`` and ``span``: see :func:`metrics.summary.session_view`."""
    view = session_view(session_id, entries, rolled, span)
    return {"session_id": session_id, "findings": [f.to_json() for f in findings(view)]}
