"""An agent frozen with SIGSTOP (a stalled VM, a swap storm, a debugger): shorter than its
lease it is not failed over at all; longer, its routes go DOWN while its lease is gone, and on
SIGCONT it registers again and comes back, without a restart and without orphans."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from etcd_fixtures import EtcdCluster
from helpers import CoordinatorProcess, pid_alive, wait_until

from faults.fleet import CLUSTER, agent_status, cluster_agent, endpoint_state, eq


def node_transitions(coord: CoordinatorProcess, node: str) -> list[str]:
    out = []
    for line in coord.log_lines():
        doc = json.loads(line)
        if doc.get("event") == "health transition" and doc.get("change", "").startswith(f"node {node}:"):
            out.append(doc["change"])
    return out


async def test_agent_frozen_shorter_and_longer_than_its_lease(etcd: EtcdCluster, tmp_path: Path) -> None:
    coord = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    agent = cluster_agent(tmp_path / "frozen", "frozen", etcd.endpoints[0], lease_ttl_s=4)
    assert agent.proc is not None
    try:
        coord.wait_ready_sync()
        await wait_until(lambda: eq(endpoint_state(etcd, "frozen"), "READY"), timeout=30, what="READY")
        before = node_transitions(coord, "frozen")

        # Shorter than the lease (4 s): the fault lasts 1.5 s, then the keep-alive catches up.
        agent.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(1.5)  # the fault's duration, not a wait for a condition
        agent.proc.send_signal(signal.SIGCONT)
        await wait_until(
            lambda: eq(endpoint_state(etcd, "frozen"), "READY"), timeout=10, what="still READY after a short freeze"
        )
        assert node_transitions(coord, "frozen") == before, "a freeze shorter than the lease caused a failover"

        # Longer than the lease: DOWN while frozen, back after SIGCONT with the same process.
        server_pid = agent_status(agent.base)["instances"][0]["pid"]
        agent.proc.send_signal(signal.SIGSTOP)
        await wait_until(lambda: eq(endpoint_state(etcd, "frozen"), "DOWN"), timeout=20, what="DOWN while frozen")
        agent.proc.send_signal(signal.SIGCONT)
        await wait_until(lambda: eq(endpoint_state(etcd, "frozen"), "READY"), timeout=30, what="READY again")
        assert agent.proc.poll() is None  # the same agent process, not a restart
        assert any("DOWN" in t for t in node_transitions(coord, "frozen"))
        # Its model server kept running through it: same process, READY, not restarted.
        inst = agent_status(agent.base)["instances"][0]
        assert inst["pid"] == server_pid and pid_alive(server_pid) and inst["state"] == "READY"
    finally:
        agent.proc.send_signal(signal.SIGCONT)
        agent.stop()
        coord.stop()
    assert "Traceback" not in agent.log_path.read_text()
