"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, over the DevTools
protocol: tests/cdp.py) loads ``/ui`` of a standby coordinator of a real local cluster, checks the
nodes, GPUs and routes it shows against etcd, sees a SIGKILLed node go DOWN within its lease,
and saves screenshots in ``$GPUFLEET_ARTIFACTS`` (default: the test's tmp directory) for CI.
Then: a coordinator whose status needs a token (the page asks for it) and whose admin token
drains and undrains a node from the page; and etcd gone (the page keeps its data, says so).

Without chromium the test is skipped with the reason; under ``CI=true`` that is a failure.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cdp import Browser, chromium_binary
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
    wait_until,
)

from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import DrainRecord, NodeRecord
from gpufleet.routeslices import read_routes
from gpufleet.tomlwrite import dumps as toml_dumps
from gpufleet_dev.fleetconfig import coordinator_doc

pytestmark = pytest.mark.slow  # a cluster, three coordinators and a browser: ~20-30 s

CLUSTER = "ui"
KEYS = Keyspace(CLUSTER)
LEASE_TTL_S = 3  # the agents' lease (cluster_toml's default)
GPUS = {  # node -> the [[gpu.simulated]] entries
    "a100-1": ["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"],
    "a100-2": ["NVIDIA A100-SXM4-80GB"],
    "h100-1": ["NVIDIA H100 80GB HBM3"],
}
VICTIM = "a100-1"
STATUS_TOKEN = "status-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
NODE_COUNT = "document.querySelectorAll('[data-node]').length"


def _need_chromium() -> None:
    if chromium_binary() is not None:
        return
    reason = "no chromium on PATH (./scripts/bootstrap installs Debian's chromium package)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the dashboard's browser test cannot run, and CI must run it: {reason}", pytrace=False)
    pytest.skip(reason)


def _artifacts(tmp: Path) -> Path:
    out = Path(os.environ.get("GPUFLEET_ARTIFACTS") or tmp / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


class Cluster:
    def __init__(self, etcd: EtcdCluster, tmp: Path) -> None:
        self.etcd = etcd
        self.tmp = tmp
        self.agents: dict[str, AgentProcess] = {}
        self.coords: list[CoordinatorProcess] = []

    def start_agent(self, node: str) -> None:
        tmp = self.tmp / node
        tmp.mkdir()
        port = free_port()
        gpus = "".join(
            f'\n[[gpu.simulated]]\nname = "{name}"\nmemory_total_gib = 80\n'
            f"temperature_c = {52 + 34 * i}\nutilization_percent = {30 + 25 * i}\n"
            for i, name in enumerate(GPUS[node])
        )
        text = agent_toml(tmp, port, instance_toml("m", model="m", gpus="[0]", fraction=0.5), gpus=gpus)
        text = as_node(text, node, f"http://127.0.0.1:{port}")
        text += cluster_toml(self.etcd.endpoints, CLUSTER, lease_ttl_s=LEASE_TTL_S, telemetry_min_gap_s=0.2)
        self.agents[node] = start_agent_sync(tmp, text, port, ready_instances=1)

    def standby(self) -> CoordinatorProcess:
        return next(c for c in self.coords if not c.is_leader())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    _need_chromium()
    c = Cluster(EtcdCluster(1).start(), tmp_path_factory.mktemp("ui"))
    try:
        for node in GPUS:
            c.start_agent(node)
        for ident in ("c1", "c2"):
            c.coords.append(CoordinatorProcess(c.tmp, ident, c.etcd.endpoints, CLUSTER).start())
        for coord in c.coords:
            coord.wait_ready_sync()
        yield c
    finally:
        for coord in c.coords:
            coord.stop()
        for a in c.agents.values():
            a.stop()
        c.etcd.destroy()


async def _etcd_view(cluster: Cluster) -> dict[str, Any]:
    """What the page must show, read from etcd: node -> GPU temperatures, and the route's
    endpoints -> (state, weight)."""
    async with cluster.etcd.client() as etcd:
        res = await etcd.get_prefix(KEYS.nodes)
        nodes = [decode(kv.value, NodeRecord) for kv in res.kvs]
        routes = await read_routes(etcd, KEYS)
    return {
        "nodes": {n.node: [g.temperature_celsius for g in n.gpus] for n in nodes},
        "routes": {m: {f"{e.node}/{e.instance}": [e.state, e.weight] for e in r.endpoints} for m, r in routes.items()},
    }


PAGE_VIEW = """(() => {
  const nodes = {};
  for (const el of document.querySelectorAll("[data-node]")) {
    nodes[el.dataset.node] = [...el.querySelectorAll("[data-temp]")].map((t) => Number(t.dataset.temp));
  }
  const routes = {};
  for (const r of document.querySelectorAll("[data-route]")) {
    routes[r.dataset.route] = {};
    for (const e of r.querySelectorAll("[data-endpoint]")) {
      routes[r.dataset.route][e.dataset.endpoint] = [e.dataset.state, Number(e.dataset.weight)];
    }
  }
  return {nodes, routes};
})()"""


NODE_STATES = (
    "Object.fromEntries([...document.querySelectorAll('[data-node]')].map((e) => [e.dataset.node, e.dataset.state]))"
)


async def test_the_dashboard_shows_the_fleet_and_a_node_going_down(cluster: Cluster, tmp_path: Path) -> None:
    artifacts = _artifacts(tmp_path)

    async def routed_everywhere() -> bool:
        view = await _etcd_view(cluster)
        eps = view["routes"].get("m", {})
        return len(eps) == 3 and all(s == "READY" and w > 0 for s, w in eps.values())

    await wait_until(routed_everywhere, timeout=30, what="model m routed READY on all three nodes")
    standby = cluster.standby()  # the dashboard reads etcd: a standby shows the fleet too
    async with Browser(tmp_path) as browser:
        await browser.goto(standby.base + "/ui")
        await wait_until(lambda: browser.eval("document.body.dataset.loaded === 'true'"), 15, what="first view")

        async def page_matches_etcd() -> dict[str, Any] | None:
            """Every node in etcd with its GPUs' temperatures, and every route's endpoints (a
            node whose record went stays on the page, DOWN, with what it last had)."""
            want, seen = await _etcd_view(cluster), await browser.eval(PAGE_VIEW)
            nodes = {n: seen["nodes"].get(n) for n in want["nodes"]}
            return seen if nodes == want["nodes"] and seen["routes"] == want["routes"] else None

        seen = await wait_until(page_matches_etcd, timeout=15, what="the page showing what etcd holds")
        assert set(seen["nodes"]) == set(GPUS)
        assert {n: len(t) for n, t in seen["nodes"].items()} == {n: len(g) for n, g in GPUS.items()}
        states = await browser.eval(NODE_STATES)
        assert states == dict.fromkeys(GPUS, "READY")
        classes = await browser.eval("[...document.querySelectorAll('[data-class]')].map((c) => c.dataset.class)")
        assert classes == ["A100", "H100"], classes
        # a100-1's second GPU is at 86 °C: highlighted (from 85 °C), below the policy's 90 °C limit.
        hot = await browser.eval("[...document.querySelectorAll('.temp.t-warn')].map((t) => t.dataset.temp)")
        assert hot == ["86"], hot
        leader = await browser.eval("document.querySelector('[data-leader]').dataset.leader")
        assert leader == next(c.ident for c in cluster.coords if c.is_leader())
        await browser.screenshot(artifacts / "dashboard.png")

        cluster.agents[VICTIM].kill()
        t0 = time.monotonic()
        down = f"document.querySelector('[data-node=\"{VICTIM}\"]')?.dataset.state === 'DOWN'"
        await wait_until(lambda: browser.eval(down), timeout=LEASE_TTL_S + 10, what=f"{VICTIM} DOWN on the page")
        took = time.monotonic() - t0
        # Its lease, one poll of the page (1.5 s) and slack for a loaded machine.
        assert took <= LEASE_TTL_S + 4, f"{VICTIM} took {took:.1f}s to show DOWN"

        async def traffic_moved() -> bool:
            view = await browser.eval(PAGE_VIEW)
            eps = view["routes"].get("m", {})
            return eps.get(f"{VICTIM}/m") == ["DOWN", 0] and eps.get("a100-2/m", ["", 0])[1] > 0

        await wait_until(traffic_moved, timeout=15, what="the route's weight off the dead node on the page")
        await wait_until(page_matches_etcd, timeout=15, what="the page matching etcd after the failover")

        async def events_seen() -> bool:
            events = await browser.eval("[...document.querySelectorAll('#events li')].map((e) => e.textContent)")
            return any(f"node {VICTIM} DOWN" in e for e in events) and any(
                f"m: traffic off {VICTIM}/m (DOWN) to a100-2" in e for e in events
            )

        await wait_until(events_seen, timeout=10, what="the node's DOWN and the failover among the events")
        await browser.screenshot(artifacts / "dashboard-node-down.png")


def _call(url: str, token: str | None = None, method: str = "GET", body: bytes | None = None) -> int:
    req = urllib.request.Request(url, body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _token_file(path: Path, token: str) -> str:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


async def _drain_record(cluster: Cluster, node: str) -> DrainRecord | None:
    async with cluster.etcd.client() as etcd:
        kv = await etcd.get(KEYS.drain(node))
    return decode(kv.value, DrainRecord) if kv else None


def _guarded_coordinator(cluster: Cluster, tmp: Path) -> CoordinatorProcess:
    """A coordinator whose status needs a token, with an admin token for the drain buttons."""
    port = free_port()
    doc = coordinator_doc("c3", port, cluster.etcd.endpoints, CLUSTER)
    doc["coordinator"]["admin_token_file"] = _token_file(tmp / "admin-token", ADMIN_TOKEN)
    doc["api"] = {"status_access": "token", "status_token_file": _token_file(tmp / "status-token", STATUS_TOKEN)}
    return CoordinatorProcess(tmp, "c3", cluster.etcd.endpoints, CLUSTER, port=port, config_text=toml_dumps(doc))


async def test_the_page_asks_for_the_status_token_and_drains_with_the_admin_token(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The dashboard's data is a status view: ``[api] status_access = "token"`` guards it as it
    guards /v1/status, and the page (no data in it) stays open and asks for the token. Drain and
    undrain need the admin token, which opens status too; they write /drain/<node> as gpuctl does."""
    coord = _guarded_coordinator(cluster, tmp_path).start()
    try:
        coord.wait_ready_sync()
        api = coord.base + "/ui/api/"
        assert _call(coord.base + "/ui") == 200
        assert _call(coord.base + "/ui/static/app.js") == 200
        assert _call(api + "fleet") == 401
        assert _call(api + "fleet", "wrong-token-0123456789") == 401
        assert _call(api + "fleet", STATUS_TOKEN) == _call(api + "fleet", ADMIN_TOKEN) == 200
        assert _call(api + "admin", STATUS_TOKEN) == 401 and _call(api + "admin", ADMIN_TOKEN) == 200
        assert _call(api + "drain/a100-2", STATUS_TOKEN, "PUT") == 401
        assert _call(api + "drain/..", ADMIN_TOKEN, "PUT") == 400
        assert _call(api + "drain/a100-2", ADMIN_TOKEN, "PUT", b'{"reason": 5}') == 400
        assert await _drain_record(cluster, "a100-2") is None
        async with Browser(tmp_path) as browser:
            await browser.goto(coord.base + "/ui")
            form_shown = "!document.getElementById('token-form').hidden"
            await wait_until(lambda: browser.eval(form_shown), 15, what="the token form")
            assert await browser.eval(NODE_COUNT) == 0
            await browser.eval(
                f"document.getElementById('token').value = '{STATUS_TOKEN}';"
                "document.getElementById('token-form').requestSubmit()"
            )
            await wait_until(lambda: browser.eval(NODE_COUNT), 15, what="nodes shown after the token")
            assert await browser.eval(form_shown) is False
            assert await browser.eval("document.querySelectorAll('button.drain').length") == 0  # not signed in
            # Sign in as admin, drain a100-2 with a reason, see it DRAINED, undrain it.
            await browser.eval("document.getElementById('admin-signin').click()")
            await browser.eval(
                f"document.getElementById('admin-token').value = '{ADMIN_TOKEN}';"
                "document.getElementById('admin-form').requestSubmit()"
            )
            node = "document.querySelector('[data-node=\"a100-2\"]')"
            await wait_until(lambda: browser.eval(f"!!{node}.querySelector('button.drain')"), 15, what="drain button")
            await browser.eval(f"{node}.querySelector('button.drain').click()")
            await browser.eval(
                "document.getElementById('drain-reason').value = 'fan swap';"
                "document.getElementById('drain-confirm').click()"
            )
            await wait_until(lambda: browser.eval(f"{node}.dataset.state === 'DRAINED'"), 15, what="a100-2 DRAINED")
            rec = await _drain_record(cluster, "a100-2")
            assert rec is not None and rec.reason == "fan swap" and rec.by.startswith("dashboard on c3"), rec
            assert "fan swap" in await browser.eval(f"{node}.querySelector('.drain').textContent")
            await browser.screenshot(_artifacts(tmp_path) / "dashboard-drained.png")
            await browser.eval(f"{node}.querySelector('button.undrain').click()")
            await wait_until(lambda: browser.eval(f"{node}.dataset.state === 'READY'"), 15, what="a100-2 READY again")
            assert await _drain_record(cluster, "a100-2") is None
            events = await browser.eval("[...document.querySelectorAll('#events li')].map((e) => e.textContent)")
            assert any("node a100-2 drained" in e for e in events), events
    finally:
        coord.stop()


async def test_with_etcd_gone_the_page_keeps_its_data_and_says_it_is_stale(cluster: Cluster, tmp_path: Path) -> None:
    """Last in this module: it stops etcd."""
    artifacts = _artifacts(tmp_path)
    coord = cluster.coords[0]
    async with Browser(tmp_path) as browser:
        await browser.goto(coord.base + "/ui")
        await wait_until(lambda: browser.eval(NODE_COUNT), 15, what="nodes shown")
        shown = await browser.eval(NODE_COUNT)
        cluster.etcd.destroy()
        notice = "document.getElementById('notice').hidden ? '' : document.getElementById('notice').textContent"
        text = await wait_until(lambda: browser.eval(notice), 15, what="the notice that etcd is unreachable")
        assert "etcd unreachable" in text, text
        assert await browser.eval(NODE_COUNT) == shown
        await browser.screenshot(artifacts / "dashboard-etcd-unreachable.png")
