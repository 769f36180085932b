"""The operators' assets in deploy/: the Grafana dashboard, the alert rules and the scrape config.

Every metric name in a PromQL expression must be one the app really exports, in the form
Prometheus stores it (a counter only as ``<name>_total``), so a renamed metric or a missing
suffix breaks this test instead of silently emptying a panel or disarming an alert.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from metrics import prometheus

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "openconsult.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
UNIT = ROOT / "deploy" / "openconsult.service"
#: Where the unit expects the venv (docs/operations.md, "Installing with systemd").
UNIT_BINARY = "/opt/openconsult/venv/bin/openconsult"

METRIC_NAME = re.compile(r"\b(?:openconsult|process)_[a-z_]+")
# Prometheus adds these per target itself; the app does not export them.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
DS_UID = "${DS_PROMETHEUS}"

REQUIRED_ALERTS = {
    "OpenConsultNodeDown",
    "OpenConsultEventLogEntriesDropped",
    "OpenConsultEventLogQueueBackingUp",
    "OpenConsultManyNetworkDisconnects",
    "OpenConsultTokenRejectionsSpike",
    "OpenConsultMediaPlaneStuck",
    "OpenConsultHighCPU",
    "OpenConsultClusterNodeLost",
    "OpenConsultLeaseConflict",
    "OpenConsultRedisUnavailable",
}

#: What the dashboard's Cluster row must show per node (and the node id of each instance).
CLUSTER_PANEL_METRICS = {
    "openconsult_node_info",
    "openconsult_sessions_active",
    "openconsult_calls_active",
    "process_cpu_seconds",
    "openconsult_cluster_redis_up",
    "openconsult_cluster_nodes",
    "openconsult_cluster_rooms_owned",
    "openconsult_cluster_leases_lost",
    "openconsult_cluster_claims",
    "openconsult_cluster_relayed_connections",
    "openconsult_cluster_heartbeat_failures",
}

# Which sample-name suffixes each metric type has in the exposition (and so in Prometheus).
SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "untyped": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
}


# --- helpers ------------------------------------------------------------------------------


def exported_families() -> dict[str, str]:
    """Family name -> type, from the live exposition (every labelled series is pre-created)."""
    body, _ = prometheus.render()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def resolve(name: str, families: dict[str, str]) -> str | None:
    """The exported family that the queried series name ``name`` belongs to, or None.

    Strips the suffix the family's type gives its samples: ``x_total`` is counter ``x``,
    ``x_bucket``/``x_sum``/``x_count`` histogram ``x``; a gauge is queried by its bare name.
    A counter queried without ``_total`` resolves to nothing, because Prometheus has no
    such series.
    """
    for family, kind in families.items():
        for suffix in SUFFIXES.get(kind, ("",)):
            if name == family + suffix:
                return family
    return None


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def assert_balanced(expr: str) -> None:
    """Brackets pair up outside string literals: a cheap syntax check where promtool is absent."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quote: str | None = None
    escaped = False
    for ch in expr:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack[-1] == pairs[ch], f"unbalanced {ch!r} in: {expr}"
            stack.pop()
    assert not stack and quote is None, f"unclosed {stack or quote} in: {expr}"


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def datasources(node: Any) -> Iterator[dict[str, Any]]:
    """Every ``datasource`` object anywhere in the dashboard JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value
            else:
                yield from datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasources(item)


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found.append((f'panel "{panel.get("title")}" target {target.get("refId")}', target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]
            found.append((f'variable "{var["name"]}"', query["query"] if isinstance(query, dict) else query))
    return found


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for group in load_yaml(ALERTS)["groups"]:
        assert group.get("name") and group.get("rules"), group
        rules.extend(group["rules"])
    return rules


# --- the resolver itself -------------------------------------------------------------------


def test_resolve_strips_suffixes_by_type() -> None:
    families = exported_families()
    assert resolve("openconsult_connections_closed_total", families) == "openconsult_connections_closed"
    assert resolve("openconsult_rtp_packets_forwarded_total", families) == "openconsult_rtp_packets_forwarded"
    assert resolve("openconsult_connections_active", families) == "openconsult_connections_active"
    assert resolve("process_cpu_seconds_total", families) == "process_cpu_seconds"
    assert resolve("process_resident_memory_bytes", families) == "process_resident_memory_bytes"
    # No such series in Prometheus: a counter without _total, a gauge with it, histogram
    # suffixes on a counter, an unknown name.
    assert resolve("openconsult_connections_closed", families) is None
    assert resolve("openconsult_connections_active_total", families) is None
    assert resolve("openconsult_tokens_rejected_bucket", families) is None
    assert resolve("openconsult_tokens_rejected_count", families) is None
    assert resolve("openconsult_no_such_thing_total", families) is None
    synthetic = {"demo_latency_seconds": "histogram"}
    assert resolve("demo_latency_seconds_bucket", synthetic) == "demo_latency_seconds"
    assert resolve("demo_latency_seconds_count", synthetic) == "demo_latency_seconds"
    assert resolve("demo_latency_seconds", synthetic) is None


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (reason) (rate(openconsult_connections_closed_total{job=~"$job"}[5m]))'
        ' / on() rate(process_cpu_seconds_total[1m]) and up{job="openconsult"} == 0'
    )
    assert metric_names(expr) == {"openconsult_connections_closed_total", "process_cpu_seconds_total"}


# --- dashboard ---------------------------------------------------------------------------


def test_dashboard_metrics_are_exported() -> None:
    families = exported_families()
    dashboard = load_dashboard()
    used: set[str] = set()
    for where, expr in dashboard_exprs(dashboard):
        assert_balanced(expr)
        names = metric_names(expr)
        assert names, f"{where} queries no openconsult_/process_ metric: {expr}"
        for name in names:
            family = resolve(name, families)
            assert family, f"{where} uses {name}, which /metrics does not export (as a series): {expr}"
            used.add(family)
    # A metric nobody can see is a metric nobody watches: each one needs a panel.
    ours = {f for f in families if f.startswith("openconsult_")}
    missing = ours - used
    assert not missing, f"no panel in {DASHBOARD.name} shows {sorted(missing)}: add one"
    assert {"process_cpu_seconds", "process_resident_memory_bytes"} <= used


def test_dashboard_cluster_row_shows_each_node() -> None:
    families = exported_families()
    panels = load_dashboard()["panels"]
    rows = [p for p in panels if p["type"] == "row"]
    (cluster,) = [r for r in rows if r["title"] == "Cluster"]
    below = [r["gridPos"]["y"] for r in rows if r["gridPos"]["y"] > cluster["gridPos"]["y"]]
    end = min(below, default=10**6)
    inside = [p for p in panels if p["type"] != "row" and cluster["gridPos"]["y"] < p["gridPos"]["y"] < end]
    shown: set[str] = set()
    for panel in inside:
        for target in panel["targets"]:
            expr = target["expr"]
            shown |= {f for f in (resolve(n, families) for n in metric_names(expr)) if f}
            if target.get("format") == "table" or expr.startswith("count("):
                continue
            # Per node: one line per instance, named by it, never summed over the nodes.
            assert "{{instance}}" in target.get("legendFormat", ""), (panel["title"], target)
            assert not re.search(r"\b(sum|max|min|avg|count)\s*\(", expr) or "by (instance" in expr, expr
    missing = CLUSTER_PANEL_METRICS - shown
    assert not missing, f"the Cluster row shows no {sorted(missing)}"


def test_dashboard_has_datasource_input_and_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("job", "instance"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == DS_UID
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query.startswith("label_values(") and query.rstrip(")").endswith(name), query
    # instance is narrowed by the chosen job.
    assert "$job" in variables["instance"]["query"]["query"]


def test_every_panel_and_target_uses_the_datasource_input() -> None:
    dashboard = load_dashboard()
    ids = []
    for panel in all_panels(dashboard["panels"]):
        title = panel.get("title")
        ids.append(panel["id"])
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), title
        assert panel.get("datasource") == {"type": "prometheus", "uid": DS_UID}, title
        if panel["type"] == "row":
            assert not panel.get("targets"), title
            continue
        assert panel.get("targets"), f'panel "{title}" has no query'
        for target in panel["targets"]:
            assert target.get("datasource") == {"type": "prometheus", "uid": DS_UID}, title
            # The job and instance variables must actually filter every panel.
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"], target
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # No datasource uid of the machine the dashboard was exported from, anywhere.
    for source in datasources(dashboard):
        assert source.get("uid") == DS_UID or source.get("type") == "grafana", source


# --- alert rules and scrape config -------------------------------------------------------------


def test_alert_metrics_are_exported() -> None:
    families = exported_families()
    for rule in alert_rules():
        expr = rule["expr"]
        assert_balanced(expr)
        names = metric_names(expr)
        assert names or "up{" in expr, f'{rule["alert"]} queries no known metric: {expr}'
        for name in names - SYNTHETIC:
            assert resolve(name, families), f'{rule["alert"]} uses {name}, which /metrics does not export: {expr}'


def test_alerts_are_complete_and_annotated() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    assert REQUIRED_ALERTS <= set(names), REQUIRED_ALERTS - set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            text = annotations.get(key, "")
            assert isinstance(text, str) and len(text.strip()) > 20, f'{rule["alert"]} needs a real {key}'
    by_name = {r["alert"]: r for r in rules}
    assert by_name["OpenConsultNodeDown"]["expr"].replace(" ", "").startswith("up{")
    # Lost records must page at the first one.
    assert "openconsult_eventlog_entries_dropped_total" in by_name["OpenConsultEventLogEntriesDropped"]["expr"]
    assert "> 0" in by_name["OpenConsultEventLogEntriesDropped"]["expr"]


def test_alert_unit_tests_cover_the_cluster_alerts() -> None:
    """``promtool test rules`` proves each cluster alert fires on a failing series and stays quiet
    on a healthy one (node lost, lease conflict, Redis unavailable on a clustered node only)."""
    tests = load_yaml(ALERT_TESTS)
    assert tests["rule_files"] == [ALERTS.name]
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert {"OpenConsultClusterNodeLost", "OpenConsultLeaseConflict", "OpenConsultRedisUnavailable"} <= tested
    for name in tested:
        fires = [c for t in tests["tests"] for c in t["alert_rule_test"] if c["alertname"] == name and c["exp_alerts"]]
        quiet = [c for t in tests["tests"] for c in t["alert_rule_test"] if c["alertname"] == name and not c["exp_alerts"]]
        assert fires and quiet, f"{name} needs a case where it fires and one where it does not"
    result = subprocess.run(["promtool", "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_matches_the_alerts() -> None:
    config = load_yaml(SCRAPE_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "openconsult" in jobs
    assert jobs["openconsult"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["openconsult"]["static_configs"][0]["targets"]
    for rule_file in config["rule_files"]:
        assert (SCRAPE_CONFIG.parent / rule_file).is_file(), rule_file
    # The rules select the scrape job by name: they must agree.
    for rule in alert_rules():
        for job in re.findall(r'\bjob="([^"]*)"', rule["expr"]):
            assert job in jobs, f'{rule["alert"]} selects job="{job}", which prometheus.yml does not scrape'


def test_promtool_accepts_config_rules_and_dashboard_queries(tmp_path: Path) -> None:
    def promtool(*args: str) -> None:
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr

    promtool("check", "config", str(SCRAPE_CONFIG))  # also checks alerts.yml via rule_files
    # The dashboard's queries, with Grafana's variables filled in, as recording rules.
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs(load_dashboard())):
        if expr.startswith("label_values("):
            continue
        filled = expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": filled})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))


# --- systemd unit --------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> its values (in order) over all sections; comments and blank lines skipped."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def systemd_verify(text: str, tmp_path: Path) -> str:
    """``systemd-analyze verify`` on ``text`` with ExecStart pointed at a stub executable (verify
    needs the binary to exist); what it said about the unit, empty when the unit is clean."""
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.path.exists(analyze):
        message = "systemd-analyze is not installed (apt install systemd)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    stub = tmp_path / "openconsult"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "openconsult.service"
    unit.write_text(text.replace(UNIT_BINARY, str(stub)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    said = [line for line in (result.stdout + result.stderr).splitlines() if "openconsult" in line]
    if result.returncode != 0:
        said.append(f"exit status {result.returncode}")
    return "\n".join(said)


def test_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert UNIT_BINARY in text
    assert systemd_verify(text, tmp_path) == ""


def test_systemd_unit_is_hardened_and_runs_the_json_logging_server() -> None:
    d = unit_directives(UNIT.read_text())
    (exec_start,) = d["ExecStart"]
    assert exec_start == f"{UNIT_BINARY} serve --config /etc/openconsult/openconsult.toml --log-format json"
    expected = {
        "User": "openconsult", "Group": "openconsult", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "SystemCallFilter": "@system-service", "Restart": "on-failure", "KillSignal": "SIGTERM",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], (key, d.get(key))
    assert d["ReadWritePaths"] == ["/var/lib/openconsult"] and d["WorkingDirectory"] == ["/var/lib/openconsult"]
    assert float(d["RestartSec"][0]) >= 1
    # Many sockets: well above server.max_connections' default (20000) plus media sockets.
    assert int(d["LimitNOFILE"][0]) >= 65536
    # Room for the server's own shutdown (connections leave, the event log flushes) and a drain.
    assert int(d["TimeoutStopSec"][0]) >= 60


@pytest.mark.parametrize("breakage", [
    ("Restart=on-failure", "Restart=sometimes"),       # a value systemd cannot parse
    ("NoNewPrivileges=yes", "NoNewPrivilege=yes"),     # a misspelt key (systemd would ignore it)
    ("[Install]", "[Install]\nWantedBy"),              # a line that is no assignment
])
def test_systemd_verify_catches_a_broken_unit(tmp_path: Path, breakage: tuple[str, str]) -> None:
    text = UNIT.read_text()
    assert breakage[0] in text
    assert systemd_verify(text.replace(breakage[0], breakage[1], 1), tmp_path) != ""


def test_systemd_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    text = UNIT.read_text().replace(UNIT_BINARY, "/nonexistent/openconsult")
    assert "/nonexistent/openconsult" in systemd_verify(text, tmp_path)
