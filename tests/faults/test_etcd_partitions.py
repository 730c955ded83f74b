"""Network faults between the cluster's processes and etcd, through a fault-injecting TCP proxy.

What users must see: a node cut off from etcd drops out of the routes but keeps serving what
it has locally, and comes back by itself; latency of seconds causes no failover at all; a leader
cut off from etcd stops leading *before* another coordinator can be elected (no split brain),
and rejoins as a standby.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from etcd_fixtures import EtcdCluster
from helpers import CoordinatorProcess, wait_until

from faults.fleet import CLUSTER, KEYS, chat, cluster_agent, endpoint_state, eq, log_time, proxy_to


@pytest.mark.parametrize("fault", ["blackhole", "half-open", "reset"])
async def test_agent_cut_off_from_etcd_leaves_the_routes_keeps_serving_and_comes_back(
    etcd: EtcdCluster, tmp_path: Path, fault: str
) -> None:
    proxy = proxy_to(etcd)
    coord = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    cut = cluster_agent(tmp_path / "cut", "cut", proxy.url)
    other = cluster_agent(tmp_path / "other", "other", etcd.endpoints[0])
    try:
        coord.wait_ready_sync()
        for node in ("cut", "other"):
            await wait_until(lambda n=node: eq(endpoint_state(etcd, n), "READY"), timeout=30, what=f"{node} READY")
        proxy.set(fault)  # type: ignore[arg-type]
        await wait_until(lambda: eq(endpoint_state(etcd, "cut"), "DOWN"), timeout=20, what="cut node DOWN")
        # The data plane does not depend on etcd: the node still answers what it serves itself.
        assert chat(cut.base)[0] == 200
        assert await endpoint_state(etcd, "other") == "READY"
        proxy.set("pass")
        await wait_until(lambda: eq(endpoint_state(etcd, "cut"), "READY"), timeout=30, what="cut node back")
        assert cut.proc is not None and cut.proc.poll() is None
        log = cut.log_path.read_text()
        assert ("Traceback" not in log and '"re-registering"' in log) or "registered" in log
    finally:
        cut.stop()
        other.stop()
        coord.stop()
        proxy.stop()


@pytest.mark.parametrize("delay_s", [1.5])  # each way: round trips of about 3 s (the worst the issue names)
async def test_etcd_latency_of_seconds_causes_no_failover(etcd: EtcdCluster, tmp_path: Path, delay_s: float) -> None:
    proxy = proxy_to(etcd)
    coord = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    # The production lease (10 s); a deadline above the round trip, as an operator on such a link sets.
    slow = cluster_agent(tmp_path / "slow", "slow", proxy.url, lease_ttl_s=10, timeout_s=4.0)
    try:
        coord.wait_ready_sync()
        await wait_until(lambda: eq(endpoint_state(etcd, "slow"), "READY"), timeout=30, what="READY")
        proxy.set("delay", delay_s)  # each chunk, both ways
        states: set[str | None] = set()
        async with etcd.client() as c:
            kv = await c.get(KEYS.node("slow"))
            assert kv is not None and kv.lease
            seen = {"last": 0, "renewals": 0}

            async def renewed_through_the_delay() -> bool:
                states.add(await endpoint_state(etcd, "slow"))
                ttl = (await c.lease_time_to_live(kv.lease)).ttl
                if ttl > seen["last"] and seen["last"]:
                    seen["renewals"] += 1
                seen["last"] = ttl
                return seen["renewals"] >= 4  # several keep-alives, each slowed by the round trip

            await wait_until(renewed_through_the_delay, timeout=40, interval=0.3, what="keep-alives through the delay")
        assert states == {"READY"}
    finally:
        slow.stop()
        coord.stop()
        proxy.stop()


async def test_a_leader_cut_off_steps_down_before_anyone_else_can_lead(etcd: EtcdCluster, tmp_path: Path) -> None:
    proxy = proxy_to(etcd)
    c1 = CoordinatorProcess(tmp_path, "c1", [proxy.url], CLUSTER).start()
    c2: CoordinatorProcess | None = None
    try:
        c1.wait_ready_sync()
        await wait_until(lambda: c1.status()["is_leader"], timeout=20, what="c1 leads")
        c2 = CoordinatorProcess(tmp_path, "c2", etcd.endpoints, CLUSTER).start().wait_ready_sync()
        old_epoch = c1.status()["epoch"]
        proxy.set("blackhole")
        await wait_until(lambda: c2.status()["is_leader"], timeout=20, what="c2 leads")  # type: ignore[union-attr]
        stepped_down = log_time(c1.log_path, "stepping down")
        elected = log_time(c2.log_path, "elected leader")
        assert stepped_down < elected, (stepped_down, elected)
        assert not c1.status()["is_leader"]  # its API still answers: it knows it is not the leader
        assert c2.status()["epoch"] > old_epoch
        proxy.set("pass")
        await wait_until(lambda: c1.status()["leader"] == "c2", timeout=20, what="c1 follows c2")
        assert not c1.status()["is_leader"] and c2.status()["is_leader"]
    finally:
        if c2 is not None:
            c2.stop()
        c1.stop()
        proxy.stop()
