"""The load-test report: built from a ``RunResult``, checked against the script's thresholds,
printed as tables, written as JSON and as a PNG of the key time series; ``compare`` puts two
JSON reports side by side.

The JSON is the contract (docs/loadtest.md describes every key); the table and the PNG are
views of it. Percentiles are linear-interpolated (numpy's default); a figure with no sample is
``null``, and a threshold whose figure is ``null`` is not violated but listed as unmeasured.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from loadtest.runner import RunResult

REPORT_VERSION: Final = 1

#: Thresholds: name -> (the report's figure, "max" or "min", what it means).
THRESHOLDS: Final[dict[str, tuple[str, str, str]]] = {
    "max_loss_pct": ("tracks.loss_pct", "max", "packet loss over all received tracks, %"),
    "max_failed_joins": ("joins.failed", "max", "joins refused or failed"),
    "p95_join_ms": ("join_ms.p95", "max", "join latency p95, ms"),
    "p99_join_ms": ("join_ms.p99", "max", "join latency p99, ms"),
    "p95_first_frame_ms": ("first_frame_ms.p95", "max", "time to first frame p95, ms"),
    "max_freezes_per_min": ("tracks.freezes_per_min", "max", "video freezes per minute per track"),
    "min_chat_delivered_pct": ("chat.delivered_pct", "min", "chat messages delivered, %"),
    "p95_chat_ms": ("chat.latency_ms.p95", "max", "chat delivery latency p95, ms"),
    "p95_admit_ms": ("workflow.steps.admit_ms.p95", "max", "admit request latency p95, ms"),
    "min_workflow_completed_pct": ("workflow.completed_pct", "min", "consultations through every step, %"),
    "max_server_cpu_pct": ("server.cpu_pct.max", "max", "server CPU (100 = one core), %"),
}


def percentiles(values: Iterable[float]) -> dict[str, float | int | None]:
    """``{"count","p50","p95","p99","max"}`` of ``values`` (None when there are none)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}

    def at(q: float) -> float:
        pos = (len(ordered) - 1) * q
        low, high = math.floor(pos), math.ceil(pos)
        return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 1)

    return {"count": len(ordered), "p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 1)}


def _pct(part: float, whole: float) -> float | None:
    return round(100 * part / whole, 3) if whole else None


def build_report(result: RunResult) -> dict[str, Any]:
    """The report as a JSON-ready dict (thresholds evaluated)."""
    script = result.script
    people = [p for w in result.workers for p in w.get("participants", [])]
    join_ms = [ms for p in people for ms in p["join_ms"]]
    join_failures = Counter(code for p in people for code in p.get("join_errors", []))
    other_errors = Counter(code for p in people for code in p["errors"])
    other_errors.subtract(join_failures)

    tracks = []
    for p in people:
        minutes = max(p["active_s"], 1e-9) / 60
        for t in p["tracks"]:
            tracks.append({**{k: v for k, v in t.items() if k not in ("first_packet_at", "first_frame_at")},
                           "participant": p["key"], "role": p["role"], "room": p["room"],
                           "freezes_per_min": round(t["freezes"] / minutes, 2) if t["kind"] == "video" else None})
    recv = [t for t in tracks if t["direction"] == "recv"]
    expected = sum(t["packets_expected"] for t in recv)
    received = sum(t["packets"] for t in recv)
    video_recv = [t for t in recv if t["kind"] == "video"]
    video_minutes = sum(max(p["active_s"], 0) for p in people for t in p["tracks"]
                        if t["kind"] == "video" and t["direction"] == "recv") / 60
    by_kind = {}
    for kind in ("audio", "video"):
        for direction in ("send", "recv"):
            rows = [t for t in tracks if t["kind"] == kind and t["direction"] == direction]
            if rows:
                exp, got = sum(t["packets_expected"] for t in rows), sum(t["packets"] for t in rows)
                by_kind[f"{kind}_{direction}"] = {
                    "tracks": len(rows), "packets_expected": exp, "packets": got,
                    "loss_pct": _pct(exp - got, exp) if direction == "recv" else None,
                    "bitrate_kbps_mean": round(sum(t["bitrate_kbps"] for t in rows) / len(rows), 1),
                    "jitter_ms_mean": round(sum(t["jitter_ms"] for t in rows) / len(rows), 2)}

    # Chat: each message should reach every other participant of its room.
    room_sizes = Counter(p["room"] for p in people)
    sent = [m for w in result.workers for m in w.get("chat_sent", [])]
    received_chat = [m for w in result.workers for m in w.get("chat_received", [])]
    sent_by_id = {m["message_id"]: m for m in sent}
    deliveries: dict[tuple[str, str], float] = {}
    for m in received_chat:
        origin = sent_by_id.get(m["message_id"])
        if origin is not None and m["by"] != origin["by"]:
            key = (m["message_id"], m["by"])
            deliveries[key] = min(deliveries.get(key, math.inf), (m["at"] - origin["at"]) * 1000)
    expected_deliveries = sum(room_sizes[m["room"]] - 1 for m in sent)

    # Workflow: every consultation's steps and their latencies.
    rooms = [r for w in result.workers for r in w.get("rooms", [])]
    step_values: dict[str, list[float]] = defaultdict(list)
    for r in rooms:
        for name, value in r["steps"].items():
            step_values[name].append(value)
    planned = {room.key: [s.do for s in room.workflow.steps] for room in script.rooms if room.workflow is not None}
    completed = sum(1 for r in rooms if r["completed"] == planned.get(r["room"]))

    samples = result.server_samples
    counters = {k: round(v - result.counters_before.get(k, 0.0), 3) for k, v in result.counters_after.items()
                if k.startswith("openconsult_") and "_total" in k and v != result.counters_before.get(k, 0.0)}
    worker_rows = [{"index": w["index"], "cpu_s": w.get("cpu_s"), "wall_s": w.get("wall_s"),
                    "cpu_pct": w.get("cpu_pct"), "failed": bool(w.get("failed"))} for w in result.workers]
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "script": {"name": script.name, "path": script.path, "duration_s": script.duration_s,
                   "rooms": len(script.rooms), "participants": script.participant_count},
        "url": result.url, "started_at": result.started_wall, "elapsed_s": round(result.elapsed_s, 2),
        "partial": result.partial, "stop_reason": result.stop_reason, "errors": result.errors,
        "joins": {"ok": len(join_ms), "failed": sum(join_failures.values()), "failed_by_code": dict(join_failures)},
        "other_errors_by_code": {k: v for k, v in other_errors.items() if v > 0},
        "join_ms": percentiles(join_ms),
        "first_frame_ms": percentiles(ms for p in people for ms in p["first_frame_ms"]),
        "tracks": {"packets_expected": expected, "packets": received,
                   "loss_pct": _pct(expected - received, expected),
                   "freezes": sum(t["freezes"] for t in video_recv),
                   "freezes_per_min": round(sum(t["freezes"] for t in video_recv) / video_minutes, 3)
                   if video_minutes else None,
                   "by_kind": by_kind, "list": tracks},
        "chat": {"sent": len(sent), "expected_deliveries": expected_deliveries, "delivered": len(deliveries),
                 "delivered_pct": _pct(len(deliveries), expected_deliveries),
                 "ack_ms": percentiles(m["ack_ms"] for m in sent),
                 "latency_ms": percentiles(deliveries.values())},
        "workflow": {"consultations": len(rooms), "completed": completed,
                     "completed_pct": _pct(completed, len(rooms)),
                     "failed_by_step": dict(Counter(f"{r['failed']['step']}:{r['failed']['code']}"
                                                    for r in rooms if r["failed"])),
                     "steps": {name: percentiles(values) for name, values in sorted(step_values.items())},
                     "list": rooms},
        "server": {"cpu_pct": percentiles(s["server_cpu_pct"] for s in samples if "server_cpu_pct" in s),
                   "rss_mb": percentiles(s["server_rss_mb"] for s in samples if "server_rss_mb" in s),
                   "samples": samples, "counters_delta": counters},
        "generator": {"processes": len(result.workers), "workers": worker_rows},
        "timeline": result.timeline,
    }
    report["thresholds"] = check_thresholds(report, script.thresholds)
    return report


def figure(report: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of ``report`` (None if absent)."""
    value: Any = report
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def check_thresholds(report: dict[str, Any], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    for name, limit in thresholds.items():
        where, sense, meaning = THRESHOLDS[name]
        value = figure(report, where)
        if value is None:
            ok: bool | None = None
        else:
            ok = value <= limit if sense == "max" else value >= limit
        out.append({"name": name, "limit": limit, "value": value, "ok": ok, "figure": where, "meaning": meaning})
    return out


def violations(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in report["thresholds"] if t["ok"] is False]


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_png(report: dict[str, Any], path: Path) -> None:
    """The key time series: participants, bitrates, server CPU and RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["timeline"]
    t = [s["t"] for s in timeline]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for key in ("joined", "publishing", "receiving", "failed"):
        axes[0].plot(t, [s.get(key, 0) for s in timeline], label=key)
    axes[0].set_ylabel("participants")
    axes[0].legend(loc="upper left")
    axes[1].plot(t, [s.get("send_kbps", 0) / 1000 for s in timeline], label="sent by clients")
    axes[1].plot(t, [s.get("recv_kbps", 0) / 1000 for s in timeline], label="received by clients")
    axes[1].set_ylabel("Mbit/s")
    axes[1].legend(loc="upper left")
    cpu = [(s["t"], s["server_cpu_pct"]) for s in timeline if "server_cpu_pct" in s]
    rss = [(s["t"], s["server_rss_mb"]) for s in timeline if "server_rss_mb" in s]
    axes[2].plot([c[0] for c in cpu], [c[1] for c in cpu], color="tab:red", label="server CPU %")
    axes[2].set_ylabel("server CPU % (100 = 1 core)")
    axes[2].set_xlabel("seconds")
    twin = axes[2].twinx()
    twin.plot([r[0] for r in rss], [r[1] for r in rss], color="tab:purple", label="server RSS MB")
    twin.set_ylabel("server RSS MB")
    fig.suptitle(f"openconsult loadtest {report['script']['name']} against {report['url']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's headline figures as (label, value) rows: the table and ``compare`` use them."""
    rows = [
        ("participants / rooms", f"{report['script']['participants']} / {report['script']['rooms']}"),
        ("elapsed s", _fmt(report["elapsed_s"]) + (" (partial)" if report["partial"] else "")),
        ("joins ok", _fmt(report["joins"]["ok"])),
        ("joins failed", _fmt(report["joins"]["failed"]) + "".join(
            f" {code}={n}" for code, n in report["joins"]["failed_by_code"].items())),
    ]
    for label, key in (("join ms", "join_ms"), ("first frame ms", "first_frame_ms")):
        p = report[key]
        rows.append((f"{label} p50/p95/p99", f"{_fmt(p['p50'])} / {_fmt(p['p95'])} / {_fmt(p['p99'])}"))
    tr = report["tracks"]
    rows += [("packets expected / received", f"{tr['packets_expected']} / {tr['packets']}"),
             ("loss %", _fmt(tr["loss_pct"])), ("freezes per min", _fmt(tr["freezes_per_min"]))]
    for name, k in tr["by_kind"].items():
        rows.append((f"{name} kbps / jitter ms", f"{_fmt(k['bitrate_kbps_mean'])} / {_fmt(k['jitter_ms_mean'])}"))
    chat = report["chat"]
    if chat["sent"]:
        rows.append(("chat delivered", f"{chat['delivered']} / {chat['expected_deliveries']}"))
        p = chat["latency_ms"]
        rows.append(("chat ms p50/p95/p99", f"{_fmt(p['p50'])} / {_fmt(p['p95'])} / {_fmt(p['p99'])}"))
    wf = report["workflow"]
    if wf["consultations"]:
        rows.append(("consultations completed", f"{wf['completed']} / {wf['consultations']}"))
        for name, p in wf["steps"].items():
            rows.append((f"{name} p50/p95", f"{_fmt(p['p50'])} / {_fmt(p['p95'])}"))
    server = report["server"]
    rows.append(("server CPU % p50/max", f"{_fmt(server['cpu_pct']['p50'])} / {_fmt(server['cpu_pct']['max'])}"))
    rows.append(("server RSS MB max", _fmt(server["rss_mb"]["max"])))
    rows.append(("generator CPU % per process", " ".join(_fmt(w["cpu_pct"]) for w in report["generator"]["workers"])))
    return rows


def print_report(report: dict[str, Any], console: Any) -> None:
    """The tables, on a ``rich.console.Console``."""
    from rich.table import Table

    table = Table(title=f"openconsult loadtest: {report['script']['name']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, value in summary_rows(report):
        table.add_row(label, value)
    console.print(table)
    recv = [t for t in report["tracks"]["list"] if t["direction"] == "recv"]
    if recv:
        tracks = Table(title="received tracks")
        for col in ("participant", "from", "kind", "expected", "received", "kbps", "loss %", "jitter ms",
                    "freezes/min"):
            tracks.add_column(col, justify="right" if col not in ("participant", "from", "kind") else "left")
        for t in recv[:50]:
            tracks.add_row(t["participant"], t["peer_name"], t["kind"], str(t["packets_expected"]), str(t["packets"]),
                           _fmt(t["bitrate_kbps"]), _fmt(t["loss_pct"]), _fmt(t["jitter_ms"]),
                           _fmt(t["freezes_per_min"]))
        if len(recv) > 50:
            tracks.caption = f"first 50 of {len(recv)} tracks (all are in the JSON)"
        console.print(tracks)
    for t in report["thresholds"]:
        state = {True: "ok", False: "VIOLATED", None: "not measured"}[t["ok"]]
        console.print(f"threshold {t['name']}: {t['limit']:g} ({t['meaning']}) measured {_fmt(t['value'])}: {state}")
    for error in report["errors"]:
        console.print(f"error: {error}")


def compare(a: dict[str, Any], b: dict[str, Any], console: Any, names: tuple[str, str] = ("A", "B")) -> None:
    """Two reports' headline figures side by side."""
    from rich.table import Table

    table = Table(title=f"{names[0]} vs {names[1]}")
    table.add_column("figure")
    table.add_column(names[0], justify="right")
    table.add_column(names[1], justify="right")
    rows_a, rows_b = dict(summary_rows(a)), dict(summary_rows(b))
    for label in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        table.add_row(label, rows_a.get(label, "-"), rows_b.get(label, "-"))
    console.print(table)
