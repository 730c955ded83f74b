"""Wall clocks that jump or disagree: nothing the cluster decides may depend on them.

The leading coordinator's wall clock is stepped an hour forward and then an hour back while it
leads, and one agent's host runs ten minutes behind from the start (libfaketime; the monotonic
clocks are untouched, as on a real host after an NTP step). What users must see: no node is
called stale or DEGRADED, no failover, no change of leader or epoch; the leader keeps deciding.
Before health moved to the monotonic clock, the skewed agent's records looked ten minutes old
and it was ejected three samples after it joined, and the +1 h step ejected every node.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

from etcd_fixtures import EtcdCluster
from helpers import CoordinatorProcess, wait_until

from faults.clock import FakeClock, requires_libfaketime
from faults.fleet import CLUSTER, chat, cluster_agent, endpoint_state, eq, stop_all

pytestmark = requires_libfaketime


def passes(coord: CoordinatorProcess) -> int:
    """How many leader passes the coordinator has made (its route-compute histogram's count)."""
    with urllib.request.urlopen(coord.base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^gpu_coordinator_route_compute_seconds_count (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


async def test_wall_clock_steps_and_skew_change_no_decision(etcd: EtcdCluster, tmp_path: Path) -> None:
    leader_clock = FakeClock(tmp_path, "c1")
    agent_clock = FakeClock(tmp_path, "behind")
    agent_clock.jump(-600)
    c1 = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER, wrapper=leader_clock.wrapper()).start()
    c2: CoordinatorProcess | None = None
    agents = []
    try:
        c1.wait_ready_sync()
        await wait_until(lambda: c1.status()["is_leader"], timeout=20, what="c1 leads")
        c2 = CoordinatorProcess(tmp_path, "c2", etcd.endpoints, CLUSTER).start().wait_ready_sync()
        agents.append(cluster_agent(tmp_path / "true", "true", etcd.endpoints[0]))
        agents.append(cluster_agent(tmp_path / "behind", "behind", etcd.endpoints[0], wrapper=agent_clock.wrapper()))
        for node in ("true", "behind"):
            await wait_until(lambda n=node: eq(endpoint_state(etcd, n), "READY"), timeout=30, what=f"{node} READY")
        epoch = c1.status()["epoch"]

        for offset in (+3600, -3600):
            leader_clock.jump(offset)
            start = passes(c1)
            # Three bad samples make a node DEGRADED; 12 passes (≥ 6 s at 0.5 s a sample) is
            # well past that.
            await wait_until(lambda s=start: passes(c1) >= s + 12, timeout=60, what=f"12 passes at {offset:+d} s")
            st = c1.status()
            assert (st["is_leader"], st["epoch"]) == (True, epoch), st
            assert {n["node"]: n["state"] for n in st["nodes"]} == {"true": "READY", "behind": "READY"}, st["nodes"]
            for node in ("true", "behind"):
                assert await endpoint_state(etcd, node) == "READY", (offset, node)
            assert not c2.status()["is_leader"]
            # The times the leader shows people follow its stepped wall clock: the step happened.
            shown = st["nodes"][0]["since"] - time.time()
            assert offset - 600 < shown < offset + 1, (offset, shown)
        transitions = [ln for ln in c1.log_lines() if '"health transition"' in ln and "-> DEGRADED" in ln]
        assert transitions == []
        for a in agents:
            assert chat(a.base)[0] == 200
    finally:
        stop_all(*agents, c2, c1)
    assert "Traceback" not in c1.log_path.read_text()
