"""The dashboard's queries and the alert rules against a real Prometheus scraping a real fleet:
etcd, one coordinator, two agents (simulated GPUs and vLLM servers), Prometheus (Debian's
``prometheus`` package) scraping them every second with the labels the Ansible monitoring role
gives them (``instance`` = the node's name, ``cluster``).

What the static checks (tests/test_observability_assets.py) cannot see: a query that parses but
fails when evaluated (a many-to-many match in ``and on (...)``), a label the panels and
annotations name that the scraped series do not carry (``exported_instance``, ``instance``), a
rule whose evaluation errors. Without the prometheus binary the tests skip; under ``CI=true``
they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from etcd_fixtures import EtcdCluster
from helpers import (
    AgentProcess,
    CoordinatorProcess,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    instance_toml,
    start_agent_sync,
)

from gpufleet_dev.fleetbase import Daemon, wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "gpufleet.json"
ALERTS = ROOT / "deploy" / "prometheus" / "gpufleet-alerts.yml"
PROMETHEUS = shutil.which("prometheus")
CLUSTER = "obs"
# The dashboard's variables at their "All" values; rates over 5 scrapes.
VARIABLES = {"$__rate_interval": "5s", "$cluster": ".*", "$node": ".*", "$model": ".*"}


class Prometheus(Daemon):
    name = "prometheus"
    stop_timeout = 10.0

    def __init__(self, tmp: Path, scrape: dict[str, dict[str, str]]) -> None:
        """``scrape``: job -> {node name: host:port}."""
        super().__init__(tmp / "prometheus.log")
        self.tmp, self.port = tmp, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [
                        {"targets": [addr], "labels": {"instance": node, "cluster": CLUSTER}}
                        for node, addr in targets.items()
                    ],
                }
                for job, targets in scrape.items()
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))

    def argv(self) -> list[str]:
        assert PROMETHEUS is not None
        return [
            PROMETHEUS,
            f"--config.file={self.tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad query: 400 with the error in the body
            if e.code != 400:
                raise  # 503 while it starts: an OSError, "not yet" to wait_for
            body = json.loads(e.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]


@dataclass
class Stack:
    prometheus: Prometheus
    agents: dict[str, AgentProcess]
    coordinator: CoordinatorProcess


def _chat(agent: AgentProcess) -> int:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    req = urllib.request.Request(
        agent.base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


@pytest.fixture(scope="module")
def stack(etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if PROMETHEUS is None:
        reason = "prometheus not installed (Debian: apt-get install prometheus; scripts/bootstrap installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the live Prometheus checks: {reason}", pytrace=False)
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("observability")
    agents: dict[str, AgentProcess] = {}
    daemons: list[Daemon] = []
    try:
        for node in ("n1", "n2"):
            (tmp / node).mkdir()
            port = free_port()
            text = agent_toml(tmp / node, port, instance_toml(f"m-{node}", model="m", gpus="[0]", fraction=0.5))
            text = as_node(text, node, f"http://127.0.0.1:{port}")
            text += cluster_toml(etcd.endpoints, CLUSTER, telemetry_min_gap_s=0.2)
            agents[node] = start_agent_sync(tmp / node, text, port, ready_instances=1)
            daemons.append(agents[node])
        coordinator = CoordinatorProcess(tmp, "c1", etcd.endpoints, CLUSTER).start()
        daemons.append(coordinator)
        coordinator.wait_ready_sync()
        wait_for(coordinator.is_leader, 30, "c1 leads", [coordinator])
        prometheus = Prometheus(
            tmp,
            {
                "gpufleet-agent": {n: a.base.removeprefix("http://") for n, a in agents.items()},
                "gpufleet-coordinator": {"c1": coordinator.base.removeprefix("http://")},
            },
        ).start()
        daemons.append(prometheus)
        wait_for(lambda: len(prometheus.query("up == 1")) == 3, 60, "prometheus scraping 3 targets", daemons)
        yield Stack(prometheus, agents, coordinator)
    finally:
        for d in reversed(daemons):
            d.stop()


def _dashboard_queries() -> Iterator[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    for p in d["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            yield f"panel {p['id']} {p['title']!r} {t['refId']}", expr


def test_dashboard_queries_evaluate_and_name_the_fleet(stack: Stack) -> None:
    prom = stack.prometheus

    def traffic() -> list[dict[str, Any]]:
        # A request on both entry nodes each try: rates need the counters to grow between scrapes.
        assert all(_chat(agent) == 200 for agent in stack.agents.values())
        return prom.query("sum(rate(gpu_agent_proxy_time_to_first_byte_seconds_count[5s])) > 0")

    wait_for(traffic, 30, "a request rate in Prometheus", [prom], interval=0.5)
    results = {where: prom.query(expr) for where, expr in _dashboard_queries()}  # raises on an evaluation error

    def series(title: str, ref: str = "A") -> list[dict[str, str]]:
        found = [r for where, r in results.items() if f"{title!r} {ref}" in where]
        assert len(found) == 1, f"one panel titled {title!r} expected"
        return [s["metric"] for s in found[0]]

    def values(title: str, ref: str = "A") -> list[float]:
        found = [r for where, r in results.items() if f"{title!r} {ref}" in where]
        return [float(s["value"][1]) for s in found[0]]

    # Nodes are the scrape targets' instance labels; an agent's model-server instance is exported_instance.
    assert {s["instance"] for s in series("GPU temperature")} == {"n1", "n2"}
    assert {s["exported_instance"] for s in series("Instance health")} == {"m-n1", "m-n2"}
    assert {(s["node"], s["exported_instance"]) for s in series("Endpoint weights")} == {("n1", "m-n1"), ("n2", "m-n2")}
    assert [s["instance"] for s in series("Leader")] == ["c1"]
    assert values("Nodes READY") == [2.0]
    assert values("Nodes DOWN") == [0.0]
    assert values("Errors (5xx share)") == [0.0]  # no 5xx yet: 0, not a gap
    assert [s["model"] for s in series("Time to first byte", "C")] == ["m"]  # p99 from the _bucket series
    # The variables' label_values find the fleet.
    assert prom.api("label/instance/values", **{"match[]": "gpu_agent_build_info"}) == ["n1", "n2"]
    assert prom.api("label/model/values", **{"match[]": "gpu_agent_proxy_requests_total"}) == ["m"]


def test_rules_evaluate_and_a_dead_node_alerts(stack: Stack) -> None:
    prom = stack.prometheus

    def rules() -> list[dict[str, Any]]:
        return [r for g in prom.api("rules")["groups"] for r in g["rules"]]

    never = "0001-01-01T00:00:00Z"  # Go's zero time: not evaluated yet
    wait_for(lambda: all(r["lastEvaluation"] != never for r in rules()), 30, "rules evaluated", [prom])
    bad = [(r["name"], r.get("lastError")) for r in rules() if r["health"] != "ok"]
    assert not bad, bad
    assert not prom.api("alerts")["alerts"], "a healthy fleet raises no alert"

    stack.agents["n2"].kill()  # its lease runs out in 3 s: the leader counts it DOWN

    def pending() -> set[tuple[str, str]]:
        return {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in prom.api("alerts")["alerts"]}

    wait_for(lambda: {("GpufleetAgentDown", "n2"), ("GpufleetNodeDown", "")} <= pending(), 30, "alerts for n2", [prom])
    assert [s["value"][1] for s in prom.query('gpu_coordinator_nodes{state="DOWN"}')] == ["1"]
