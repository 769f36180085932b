"""Call scripts: YAML files that say who joins which room when, what they publish, whom
they subscribe to, what they chat, how their network behaves, and which clinical workflow
steps (book, enter, admit, end, complete) a room goes through.

``load_script(path)`` parses the YAML (keeping each node's line), validates it against
``loadtest/schemas/callscript.json`` and a few rules a schema cannot say (the workflow's step
order, who a workflow room needs), and returns a frozen ``CallScript``. Every error is a
``ScriptError`` whose message names the file, the line and the field:
``one-to-one.yaml:12: groups[0].participants[1].publish.fps: 'x' is not of type 'integer'``.

``plan(script)`` expands the groups into concrete rooms and participants with absolute start
times (random draws are seeded, so one script gives one plan); the runner hands rooms to
generator processes. The format is documented in docs/loadtest.md.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

SCHEMA_PATH: Final = Path(__file__).with_name("schemas") / "callscript.json"
SCRIPTS_DIR: Final = Path(__file__).with_name("scripts")

#: The workflow steps in the only order a consultation can go through them.
WORKFLOW_ORDER: Final = ("book", "enter", "admit", "end", "complete")


class ScriptError(Exception):
    """A call script that cannot be run; the message names file, line and field."""


@dataclass(frozen=True)
class PublishSpec:
    """What a participant publishes (converted to ``loadtest.synthetic.MediaSpec``)."""

    audio: bool = True
    video: bool = True
    codec: str = "vp8"
    width: int = 640
    height: int = 480
    fps: int = 30
    bitrate_kbps: int = 1000


@dataclass(frozen=True)
class BurstSpec:
    every_s: float
    length_ms: float


@dataclass(frozen=True)
class NetworkSpec:
    """The client's own UDP path (converted to ``loadtest.synthetic.NetworkProfile``)."""

    loss_pct: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_kbps: float | None = None
    burst: BurstSpec | None = None
    direction: str = "both"


@dataclass(frozen=True)
class ChatSpec:
    count: int
    interval_s: float = 1.0
    size: int = 40
    start_s: float = 0.0


@dataclass(frozen=True)
class Action:
    """``do`` (mute, unmute, leave, rejoin) at ``at_s`` seconds after the participant joined."""

    at_s: float
    do: str
    kind: str | None = None


@dataclass(frozen=True)
class WorkflowStep:
    do: str
    after_s: float = 0.0


@dataclass(frozen=True)
class WorkflowSpec:
    department: str
    waiting_room: str
    steps: tuple[WorkflowStep, ...]
    appointment_in_min: float = 0.0

    def has(self, step: str) -> bool:
        return any(s.do == step for s in self.steps)


@dataclass(frozen=True)
class ParticipantPlan:
    """One synthetic participant of one room."""

    key: str                     # unique in the run: "<group>-<room>-<role>-<n>"
    role: str
    start_s: float               # absolute, from the run's start (workflow rooms: set by the steps)
    publish: PublishSpec | None
    subscribe: str               # "all", "none" or a role
    chat: ChatSpec | None
    actions: tuple[Action, ...]
    network: NetworkSpec | None


@dataclass(frozen=True)
class RoomPlan:
    key: str                     # unique in the run: "<script>-<group>-<room>"
    group: str
    start_s: float
    workflow: WorkflowSpec | None
    participants: tuple[ParticipantPlan, ...]


@dataclass(frozen=True)
class CallScript:
    name: str
    duration_s: float
    ramp_s: float
    seed: int
    groups: tuple[dict[str, Any], ...]      # validated, defaults not yet applied
    defaults: dict[str, Any]
    thresholds: dict[str, float]
    path: str = ""
    description: str = ""
    rooms: tuple[RoomPlan, ...] = field(default=())

    @property
    def participant_count(self) -> int:
        return sum(len(r.participants) for r in self.rooms)


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def _field(path: Any) -> str:
    """``groups[0].participants[1].fps`` from a jsonschema path."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _node_at(root: yaml.Node, path: Any) -> yaml.Node:
    """The deepest YAML node along ``path`` (for its line)."""
    node = root
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                break
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node


def _where(name: str, root: yaml.Node | None, path: Any) -> str:
    line = (_node_at(root, path).start_mark.line + 1) if root is not None else 1
    return f"{name}:{line}: {_field(path)}"


def parse_script(text: str, name: str = "<script>") -> CallScript:
    """Validate and build a script from YAML text; ``name`` is used in error messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ScriptError(f"{name}:{line}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ScriptError(f"{name}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ScriptError(f"{name}:1: (top level): a call script is a mapping, not {type(data).__name__}")
    errors = sorted(_validator().iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        from jsonschema.exceptions import best_match

        error = best_match(errors)
        assert error is not None
        raise ScriptError(f"{_where(name, root, error.absolute_path)}: {error.message}")

    groups = tuple(data["groups"])
    for gi, group in enumerate(groups):
        _check_group(name, root, gi, group)
    script = CallScript(
        name=data["name"], duration_s=float(data["duration_s"]), ramp_s=float(data.get("ramp_s", 0)),
        seed=int(data.get("seed", 1)), groups=groups, defaults=dict(data.get("defaults", {})),
        thresholds={k: float(v) for k, v in data.get("thresholds", {}).items()}, path=name,
        description=str(data.get("description", "")))
    return _with_rooms(script)


def load_script(path: str | Path) -> CallScript:
    """Read and validate a call script file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScriptError(f"{path}: cannot read the script: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ScriptError(f"{path}: not UTF-8 text: {exc.reason}") from None
    return parse_script(text, str(path))


def _check_group(name: str, root: yaml.Node | None, gi: int, group: dict[str, Any]) -> None:
    """The rules a schema cannot say: workflow step order and the roles a step needs."""
    roles = [p["role"] for p in group["participants"]]
    for pi, p in enumerate(group["participants"]):
        burst = (p.get("network") or {}).get("burst")
        if burst and burst["length_ms"] > burst["every_s"] * 1000:
            raise ScriptError(f"{_where(name, root, ['groups', gi, 'participants', pi, 'network', 'burst'])}: "
                              "length_ms must not be longer than every_s")
        publish = p.get("publish")
        if isinstance(publish, dict) and publish.get("audio") is False and publish.get("video") is False:
            raise ScriptError(f"{_where(name, root, ['groups', gi, 'participants', pi, 'publish'])}: "
                              "a publish needs audio or video (say publish: false to publish nothing)")
    workflow = group.get("workflow")
    if workflow is None:
        for pi, p in enumerate(group["participants"]):
            if "chat" in p:
                raise ScriptError(f"{_where(name, root, ['groups', gi, 'participants', pi, 'chat'])}: chat needs a "
                                  "workflow group: chat channels belong to booked consultations")
        return
    steps = [s["do"] for s in workflow["steps"]]
    if steps != list(WORKFLOW_ORDER[: len(steps)]):
        raise ScriptError(f"{_where(name, root, ['groups', gi, 'workflow', 'steps'])}: steps must be a prefix of "
                          f"{' -> '.join(WORKFLOW_ORDER)}, not {' -> '.join(steps)}")
    if roles.count("patient") != 1 or roles.count("clinician") > 1:
        raise ScriptError(f"{_where(name, root, ['groups', gi, 'participants'])}: a workflow room has one patient "
                          f"and at most one clinician, not {roles}")
    if "admit" in steps and "clinician" not in roles:
        raise ScriptError(f"{_where(name, root, ['groups', gi, 'participants'])}: the admit step needs a clinician")
    for pi, p in enumerate(group["participants"]):
        if p.get("count", 1) != 1:
            raise ScriptError(f"{_where(name, root, ['groups', gi, 'participants', pi, 'count'])}: "
                              "a workflow room's participants have count 1")
        if "join" in p:
            raise ScriptError(f"{_where(name, root, ['groups', gi, 'participants', pi, 'join'])}: "
                              "in a workflow room the steps say when each participant joins")
        if any(a["do"] in ("leave", "rejoin") for a in p.get("actions", [])):
            raise ScriptError(f"{_where(name, root, ['groups', gi, 'participants', pi, 'actions'])}: "
                              "leave/rejoin are not supported in a workflow room (the steps end the call)")


def _publish(value: Any) -> PublishSpec | None:
    if value is None or value is False:
        return None
    if value is True:
        return PublishSpec()
    spec = PublishSpec(**value)
    return spec if spec.audio or spec.video else None


def _network(value: Any) -> NetworkSpec | None:
    if not value:
        return None
    burst = value.get("burst")
    return NetworkSpec(**{**value, "burst": BurstSpec(**burst) if burst else None})


def _draw(join: Any, rng: random.Random, index: int, count: int, default_window: float) -> float:
    """A start time from a join spec (number, at_s, uniform, poisson); None spreads linearly."""
    if join is None:
        return default_window * index / count if count > 1 else 0.0
    if isinstance(join, int | float):
        return float(join)
    if "at_s" in join:
        return float(join["at_s"])
    if "uniform" in join:
        low, high = sorted(join["uniform"])
        return rng.uniform(low, high)
    poisson = join["poisson"]
    # Arrivals of a Poisson process conditioned on the count are uniform over the window.
    return float(poisson.get("start_s", 0.0)) + rng.uniform(0, float(poisson["window_s"]))


def _subscribe(value: Any) -> str:
    if value is None:
        return "all"
    return value if isinstance(value, str) else str(value["role"])


def _with_rooms(script: CallScript) -> CallScript:
    """Expand the groups into rooms and participants with absolute start times (seeded)."""
    rng = random.Random(script.seed)
    defaults = script.defaults
    rooms: list[RoomPlan] = []
    for gi, group in enumerate(script.groups):
        gname = group.get("name", f"g{gi}")
        count = int(group.get("rooms", 1))
        wf = group.get("workflow")
        workflow = None if wf is None else WorkflowSpec(
            wf["department"], wf["waiting_room"],
            tuple(WorkflowStep(s["do"], float(s.get("after_s", 0))) for s in wf["steps"]),
            float(wf.get("appointment_in_min", 0)))
        starts = sorted(_draw(group.get("start"), rng, i, count, script.ramp_s) for i in range(count))
        for ri in range(count):
            room_key = f"{script.name}-{gname}-{ri}"
            people: list[ParticipantPlan] = []
            for pi, p in enumerate(group["participants"]):
                n = int(p.get("count", 1))
                for k in range(n):
                    offset = _draw(p.get("join"), rng, k, n, 0.0) if workflow is None else 0.0
                    chat = p.get("chat")
                    people.append(ParticipantPlan(
                        key=f"{gname}-{ri}-{p.get('name', p['role'])}-{pi}.{k}", role=p["role"],
                        start_s=starts[ri] + offset,
                        publish=_publish(p.get("publish", defaults.get("publish", True))),
                        subscribe=_subscribe(p.get("subscribe", defaults.get("subscribe"))),
                        chat=ChatSpec(**chat) if chat else None,
                        actions=tuple(sorted((Action(float(a["at_s"]), a["do"], a.get("kind"))
                                              for a in p.get("actions", [])), key=lambda a: a.at_s)),
                        network=_network(p.get("network", defaults.get("network")))))
            rooms.append(RoomPlan(room_key, gname, starts[ri], workflow, tuple(people)))
    return CallScript(**{**script.__dict__, "rooms": tuple(rooms)})


def shipped_scripts() -> list[Path]:
    """The call scripts shipped in ``loadtest/scripts/``."""
    return sorted(SCRIPTS_DIR.glob("*.yaml"))


def resolve(path_or_name: str) -> Path:
    """A script path, or the name of a shipped one (``one-to-one``)."""
    path = Path(path_or_name)
    if path.exists() or path.suffix:
        return path
    shipped = SCRIPTS_DIR / f"{path_or_name}.yaml"
    return shipped if shipped.exists() else path
