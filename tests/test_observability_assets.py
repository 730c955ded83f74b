"""The Grafana dashboard (deploy/grafana/gpufleet.json) and the Prometheus alert rules
(deploy/prometheus/gpufleet-alerts.yml, with promtool unit tests in gpufleet-alerts.test.yml).

Every metric name their PromQL uses must be one gpufleet exports: the exported set is read from
the real metric classes' registries (``registry.collect()``), not from a list kept here, so a
renamed or removed metric fails this test with the name and the panel or alert that uses it.
promtool (Debian's ``prometheus`` package; scripts/bootstrap installs it) checks and unit-tests
the rules and parses every dashboard query; without it those tests skip, and under ``CI=true``
they fail instead, since a skip there would hide a broken rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from agent.api.metrics import LogDropCollector, make_registry
from agent.cluster.publisher import ClusterPublisher, MembershipCollector
from agent.config import ClusterSection
from agent.keys.gate import KeyMetrics
from agent.proxy.cache import ResponseCache
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.stats import ProxyStats
from coordinator.metrics import CoordinatorMetrics
from gpufleet.httpserver import ApiSection, ConnectionGuard, ConnectionMetrics
from gpufleet.keyspace.records import NodeRecord

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "gpufleet.json"
ALERTS = ROOT / "deploy" / "prometheus" / "gpufleet-alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "gpufleet-alerts.test.yml"
PROMTOOL = shutil.which("promtool")
DATASOURCE = "${datasource}"
# Prometheus' own per-target series (1 when the last scrape worked): alerts may use it to name a
# node whose agent no longer answers, which no series of the agent's can say.
PROMETHEUS_SERIES = frozenset({"up"})


# --- what gpufleet exports ------------------------------------------------------------------------


def _agent_registry(tmp: Path) -> CollectorRegistry:
    """The agent's /metrics registry, assembled as agent/api/server.py does: the node collector,
    the HTTP listener's, dropped log lines, etcd membership, the proxy's and the API keys'."""
    rec = NodeRecord(
        node="n1",
        address="http://127.0.0.1:1",
        agent_version="0",
        started_at=0.0,
        updated_at=0.0,
        gpu_source="simulated",
        gpu_classes=[],
        gpus=[],
        instances=[],
    )
    registry = make_registry(lambda: rec)
    registry.register(ConnectionMetrics(ConnectionGuard(ApiSection(), cap=1), "gpu_agent"))
    registry.register(LogDropCollector(lambda: 0, lambda: []))
    publisher = ClusterPublisher(
        ClusterSection(endpoints=["http://127.0.0.1:1"], cluster="c"), "n1", lambda: rec, state_dir=str(tmp)
    )
    registry.register(MembershipCollector(lambda: publisher))
    proxy = ProxyMetrics(registry)
    proxy.watch_state(ProxyStats(), lambda: ResponseCache(), lambda: {})
    proxy.watch_ejected(lambda: [])
    KeyMetrics(registry)
    return registry


def _coordinator_registry() -> CollectorRegistry:
    metrics = CoordinatorMetrics()
    metrics.registry.register(ConnectionMetrics(ConnectionGuard(ApiSection(), cap=1), "gpu_coordinator"))
    return metrics.registry


def _series_names(registry: CollectorRegistry) -> Iterator[str]:
    """The series names Prometheus stores for each family (prometheus_client drops a counter's
    ``_total`` from the family name; the samples carry it)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            yield family.name + suffix


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    names = {*_series_names(_agent_registry(tmp_path_factory.mktemp("agent"))), *_series_names(_coordinator_registry())}
    # The families this module's assets depend on most; if these vanish, the registries above
    # are no longer assembled like the daemons' and the check below would prove nothing.
    assert {"gpu_agent_gpu_temperature_celsius", "gpu_agent_proxy_requests_total", "gpu_coordinator_is_leader"} <= names
    return frozenset(names)


# --- PromQL: the metric names an expression uses ----------------------------------------------------

_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_TOKEN = re.compile(
    rf"""
    (?P<string>{_STRING})
  | (?P<matchers>\{{(?:{_STRING}|[^{{}}"'`])*\}})      # {{label="value", ...}}: label names, not metrics
  | (?P<range>\[[^\]]*\])                               # [5m], [1h:1m]
  | (?P<variable>\$\{{\w+\}}|\$\w+)                       # Grafana's $node, ${{datasource}}, $__rate_interval
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<space>\s+)
  | (?P<other>.)
    """,
    re.VERBOSE,
)
# Binary operators, modifiers and the literals Inf/NaN: identifiers that are not metric names.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "atan2"}
    | {"inf", "nan", "start", "end"}
)
# Keywords whose parenthesised list holds label names.
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


def metric_names(expr: str) -> list[str]:
    """The metric names in a PromQL expression: identifiers that are not a function or aggregation
    (followed by ``(``, ``by`` or ``without``), a keyword, in a label list (``by (...)``,
    ``on (...)``) or inside ``{...}``."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]
    names: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text.lower() in _LABEL_LISTS and nxt == "(":
            i = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")") + 1
            continue
        aggregation = nxt == "(" or nxt.lower() in ("by", "without")  # sum by (x) (...)
        if kind == "ident" and not aggregation and text.lower() not in _KEYWORDS:
            names.append(text)
        i += 1
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{model=~"$model", code!="5.."}[5m]))) > 1e3 '
        "and on (cluster, job, instance) (b == 1) or sum without (x) (c offset 5m) / ignoring (y) group_left (z) d "
        '+ count(e{le="+Inf"}[$__rate_interval]) * 0x1f - Inf'
    )
    assert metric_names(expr) == ["a_bucket", "b", "c", "d", "e"]


def test_a_name_gpufleet_does_not_export_is_caught(exported: frozenset[str]) -> None:
    # A counter without the _total Prometheus stores it under, a histogram without _bucket.
    bad = "rate(gpu_agent_proxy_requests[5m]) / histogram_quantile(0.5, gpu_agent_proxy_time_to_first_byte_seconds)"
    assert [n for n in metric_names(bad) if n not in exported] == [
        "gpu_agent_proxy_requests",
        "gpu_agent_proxy_time_to_first_byte_seconds",
    ]


# --- the Grafana dashboard ----------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # a collapsed row holds its panels


def _dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (its first argument)."""
    d = _dashboard()
    for p in _panels(d["panels"]):
        for t in p.get("targets", []):
            yield f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", v["definition"])
            assert m, f"variable {v['name']}: expected label_values(<series>, <label>), got {v['definition']!r}"
            yield f"variable {v['name']}", m[1]


def test_dashboard_uses_only_exported_metrics(exported: frozenset[str]) -> None:
    problems = []
    for where, expr in _dashboard_queries():
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric in {expr!r}")
        problems += [f"{where}: {n!r} is not a metric gpufleet exports ({expr!r})" for n in names if n not in exported]
    assert not problems, "\n".join(problems)


def test_dashboard_structure() -> None:
    d = _dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert d["uid"] == "gpufleet" and d.get("id") is None  # importable anywhere, the same uid each time
    panels = list(_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    titles = [p["title"] for p in panels]  # what a reader (and tests/test_observability_live.py) finds them by
    assert len(titles) == len(set(titles)), f"duplicate titles: {sorted({t for t in titles if titles.count(t) > 1})}"
    problems = []
    for p in panels:
        if p["type"] == "row":
            continue
        name = f"panel {p['id']} {p['title']!r}"
        if p.get("datasource", {}).get("uid") != DATASOURCE:
            problems.append(f"{name}: datasource {p.get('datasource')!r} is not the {DATASOURCE} variable")
        if not p.get("targets"):
            problems.append(f"{name}: no queries")
        problems += [
            f"{name} target {t.get('refId')}: datasource {t.get('datasource')!r}"
            for t in p.get("targets", [])
            if t.get("datasource", {}).get("uid") != DATASOURCE
        ]
    for v in variables.values():
        if v["type"] == "query" and v["datasource"].get("uid") != DATASOURCE:
            problems.append(f"variable {v['name']}: datasource {v['datasource']!r}")
    assert not problems, "\n".join(problems)
    # No two panels on the same grid cells (Grafana would shift one; the layout here is meant).
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap at {(x, y)}"
                cells[(x, y)] = p["id"]
        assert g["x"] + g["w"] <= 24, f"panel {p['id']} is wider than the grid"


# --- the alert rules -------------------------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alerts_use_only_exported_metrics(exported: frozenset[str]) -> None:
    problems = []
    for rule in _alert_rules():
        names = metric_names(rule["expr"])
        if not names:
            problems.append(f"{rule['alert']}: no metric in {rule['expr']!r}")
        problems += [
            f"alert {rule['alert']}: {n!r} is not a metric gpufleet exports"
            for n in names
            if n not in exported and n not in PROMETHEUS_SERIES
        ]
    assert not problems, "\n".join(problems)


def test_alerts_are_complete_and_each_is_unit_tested() -> None:
    rules = _alert_rules()
    problems = []
    for r in rules:
        if "for" not in r:
            problems.append(f"{r['alert']}: no 'for:' (one bad scrape would page)")
        if r.get("labels", {}).get("severity") not in ("warning", "critical"):
            problems.append(f"{r['alert']}: severity must be warning or critical")
        if not {"summary", "description"} <= set(r.get("annotations", {})):
            problems.append(f"{r['alert']}: needs summary and description annotations")
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    fired = {c["alertname"] for t in tests["tests"] for c in t["alert_rule_test"] if c["exp_alerts"]}
    problems += [f"{r['alert']}: no promtool test case where it fires" for r in rules if r["alert"] not in fired]
    assert not problems, "\n".join(problems)


# --- promtool --------------------------------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        reason = "promtool not installed (Debian: apt-get install prometheus; scripts/bootstrap installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the promtool checks: {reason}", pytrace=False)
        pytest.skip(reason)
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=ALERTS.parent)


def test_promtool_check_rules() -> None:
    res = _promtool("check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests() -> None:
    res = _promtool("test", "rules", str(ALERT_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL: each becomes a recording rule, with the dashboard's
    variables at their "All" values, and promtool parses the file."""
    subst = {"$__rate_interval": "5m", "$cluster": ".*", "$node": ".*", "$model": ".*"}
    rules = []
    for i, (where, expr) in enumerate(_dashboard_queries()):
        for var, value in subst.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: unknown variable in {expr!r}"
        rules.append({"record": f"gpufleet_dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
