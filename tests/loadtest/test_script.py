"""Call scripts: every shipped script validates; a malformed one is refused with its file, line
and field; the plan expands groups into rooms and seeded start times; report figures and
thresholds."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.report import THRESHOLDS, check_thresholds, percentiles
from loadtest.script import ScriptError, load_script, parse_script, shipped_scripts

SHIPPED = ("bad-network", "clinic-morning", "group-6", "one-to-one", "soak-30min", "waiting-room-rush")


def test_every_issue_script_is_shipped() -> None:
    assert sorted(p.stem for p in shipped_scripts()) == sorted(SHIPPED)


@pytest.mark.parametrize("path", shipped_scripts(), ids=lambda p: p.stem)
def test_shipped_script_validates(path: Path) -> None:
    script = load_script(path)
    assert script.name == path.stem
    assert script.rooms and script.participant_count >= 1
    assert all(0 <= room.start_s <= script.duration_s for room in script.rooms)
    assert set(script.thresholds) <= set(THRESHOLDS)


def test_shipped_scripts_say_what_the_issue_asks() -> None:
    rush = load_script(Path("loadtest/scripts/waiting-room-rush.yaml"))
    assert len(rush.rooms) == 100 and max(r.start_s for r in rush.rooms) <= 10
    assert all(r.workflow is not None and [s.do for s in r.workflow.steps] == ["book", "enter"] for r in rush.rooms)
    bad = load_script(Path("loadtest/scripts/bad-network.yaml"))
    network = [p.network for r in bad.rooms for p in r.participants if p.network is not None]
    assert len(network) == 1 and network[0].loss_pct == 5 and 2 * network[0].delay_ms == 300
    morning = load_script(Path("loadtest/scripts/clinic-morning.yaml"))
    assert {tuple(s.do for s in r.workflow.steps) for r in morning.rooms if r.workflow} == \
        {("book", "enter", "admit", "end", "complete")}
    assert len(load_script(Path("loadtest/scripts/group-6.yaml")).rooms[0].participants) == 6
    assert load_script(Path("loadtest/scripts/soak-30min.yaml")).duration_s == 1800


GOOD = """\
name: t
duration_s: 10
groups:
  - rooms: 2
    participants:
      - role: patient
        publish: {width: 320, height: 240}
"""


@pytest.mark.parametrize(("text", "where", "says"), [
    (GOOD.replace("width: 320", 'width: "wide"'), "t.yaml:7: groups[0].participants[0].publish.width",
     "is not of type 'integer'"),
    (GOOD.replace("role: patient", "role: nurse"), "t.yaml:6: groups[0].participants[0].role", "nurse"),
    (GOOD.replace("duration_s: 10", "duration_s: -1"), "t.yaml:2: duration_s", "less than or equal to the minimum of 0"),
    (GOOD + "thresholds: {max_lag: 3}\n", "t.yaml:8: thresholds", "max_lag"),
    (GOOD.replace("rooms: 2", "rooms: 2\n    start: {uniform: [1]}"), "t.yaml:5: groups[0].start", ""),
    (GOOD.replace("        publish: {width: 320, height: 240}\n", "        chat: {count: 2}\n"),
     "t.yaml:7: groups[0].participants[0].chat", "workflow group"),
    (GOOD.replace("  - rooms: 2\n", "  - rooms: 2\n    workflow: {department: gp, waiting_room: wr, "
                  "steps: [{do: admit}]}\n"), "t.yaml:5: groups[0].workflow.steps", "prefix"),
    (GOOD.replace("publish: {width: 320, height: 240}",
                  "network: {burst: {every_s: 1, length_ms: 2000}}"),
     "t.yaml:7: groups[0].participants[0].network.burst", "every_s"),
    ("name: t\nduration_s: [1\n", "t.yaml:3:", "not valid YAML"),
])
def test_malformed_script_names_line_and_field(text: str, where: str, says: str) -> None:
    with pytest.raises(ScriptError) as caught:
        parse_script(text, "t.yaml")
    assert str(caught.value).startswith(where), str(caught.value)
    assert says in str(caught.value)


def test_plan_is_seeded_and_spreads_rooms() -> None:
    text = GOOD.replace("rooms: 2", "rooms: 20\n    start: {uniform: [0, 10]}") + "seed: 5\n"
    a, b = parse_script(text, "t.yaml"), parse_script(text, "t.yaml")
    starts = [r.start_s for r in a.rooms]
    assert starts == [r.start_s for r in b.rooms]
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] <= 10 and len(set(starts)) == 20
    assert len({p.key for r in a.rooms for p in r.participants}) == 20
    ramp = parse_script(GOOD.replace("rooms: 2", "rooms: 4") + "ramp_s: 8\n", "t.yaml")
    assert [r.start_s for r in ramp.rooms] == [0.0, 2.0, 4.0, 6.0]


def test_percentiles_and_thresholds() -> None:
    assert percentiles([]) == {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    p = percentiles(range(1, 101))
    assert (p["p50"], p["p95"], p["p99"], p["max"]) == (50.5, 95.0, 99.0, 100)
    report = {"join_ms": {"p95": 1600.0}, "tracks": {"loss_pct": 0.1}, "chat": {"delivered_pct": None}}
    checked = {t["name"]: t["ok"] for t in check_thresholds(
        report, {"p95_join_ms": 1500, "max_loss_pct": 0.5, "min_chat_delivered_pct": 100})}
    assert checked == {"p95_join_ms": False, "max_loss_pct": True, "min_chat_delivered_pct": None}


def test_rooms_are_dealt_round_robin_in_start_order() -> None:
    from loadtest.runner import Target, deal

    script = parse_script(GOOD.replace("rooms: 2", "rooms: 5") + "ramp_s: 4\n", "t.yaml")
    dealt = deal(script.rooms, 2)
    assert [[r.start_s for r in rooms] for rooms in dealt] == [[0.0, 1.6, 3.2], [0.8, 2.4]]
    assert Target("https://video.example.org/base/", "s").ws_url == "wss://video.example.org/base/ws"
    assert Target("http://127.0.0.1:8080", "s").ws_url == "ws://127.0.0.1:8080/ws"
