"""Two agents configured with the same node_id (a cloned host, a copy-pasted config).

Before: the second took the registration over, the first took it back on its next keep-alive,
and so on forever (37 takeovers, 36 address flips and 38 route rewrites a minute, and one
generic warning). Now the second is refused with an error naming the first's address, the
first keeps its record untouched (measured by watching etcd), and the second takes over only
once the first is gone, within one lease TTL.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from etcd_fixtures import EtcdCluster
from helpers import CoordinatorProcess, wait_until

from faults.fleet import CLUSTER, KEYS, agent_status, cluster_agent, endpoint_state, eq
from gpufleet.etcd import Delete, EtcdClient, Put, Snapshot, list_watch
from gpufleet.keyspace import decode
from gpufleet.keyspace.records import NodeRecord
from gpufleet.routeslices import RouteAssembly

TTL = 3
WINDOW_S = 2 * TTL  # long enough for several keep-alives (every second) of both agents


class NodeKeyWatch:
    """Puts and deletes of the node key, and model m's route after each write of it, from one watch."""

    def __init__(self, client: EtcdClient, node: str) -> None:
        self.client = client
        self.node_key = KEYS.node(node).encode()
        self.routes = RouteAssembly(KEYS)
        self.node_puts: list[tuple[int, str]] = []  # (lease, address)
        self.node_deletes = 0
        self.route_addresses: list[list[str]] = []  # the node's endpoint addresses, per route put
        self._task: asyncio.Task[None] | None = None

    def start(self) -> NodeKeyWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        async for change in list_watch(self.client, KEYS.prefix, idle_timeout=2.0):
            if isinstance(change, Snapshot):
                continue
            if isinstance(change, Put) and change.kv.key == self.node_key:
                self.node_puts.append((change.kv.lease, decode(change.kv.value, NodeRecord).address))
            elif isinstance(change, Delete) and change.key == self.node_key:
                self.node_deletes += 1
            elif isinstance(change, Put) and self.routes.model_of(change.kv.key_str) == "m":
                self.routes.put(change.kv.key_str, change.kv.value, change.kv.mod_revision)
                route = self.routes.assemble("m") if change.last else None
                if route is not None:
                    self.route_addresses.append([e.address for e in route.endpoints if e.node == "dup"])


async def test_second_agent_with_the_same_node_id_is_refused(etcd: EtcdCluster, tmp_path: Path) -> None:
    coord = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    first = cluster_agent(tmp_path / "first", "dup", etcd.endpoints[0], lease_ttl_s=TTL)
    second = None
    try:
        coord.wait_ready_sync()
        await wait_until(lambda: eq(endpoint_state(etcd, "dup"), "READY"), timeout=20, what="first routed")
        async with etcd.client() as client:
            kv = await client.get(KEYS.node("dup"))
            assert kv is not None
            lease, address = kv.lease, decode(kv.value, NodeRecord).address
            assert address == first.base
            seen = NodeKeyWatch(client, "dup").start()
            try:
                second = await asyncio.to_thread(
                    cluster_agent, tmp_path / "second", "dup", etcd.endpoints[0], lease_ttl_s=TTL
                )
                # Refused, and says so where an operator looks: /v1/status, /healthz, the log.
                st = await wait_until(
                    lambda: (
                        agent_status(second.base).get("cluster", {}).get("state") == "refused"
                        and agent_status(second.base)
                    ),
                    timeout=10,
                    what="the second agent refused",
                )
                assert st["cluster"]["other_address"] == first.base
                assert first.base in st["cluster"]["error"] and "'dup'" in st["cluster"]["error"]
                errors = [json.loads(ln) for ln in second.log_lines() if '"registration refused' in ln]
                assert errors and errors[0]["level"] == "error" and errors[0]["other_address"] == first.base
                # The window: both agents keep-alive every second; nothing may change hands.
                await asyncio.sleep(WINDOW_S)  # the observation window, not a wait for a condition
                takeovers = sum(1 for lease_, _ in seen.node_puts if lease_ != lease)
                flips = sum(1 for _, addr in seen.node_puts if addr != first.base)
                rewrites = len(seen.route_addresses)
                assert (takeovers, flips, seen.node_deletes, rewrites) == (0, 0, 0, 0), seen.__dict__
                # Rate-limited: one error for the whole window, not one per retry.
                errors = [ln for ln in second.log_lines() if '"registration refused' in ln]
                assert len(errors) == 1, errors
                assert agent_status(first.base)["cluster"]["state"] == "registered"

                # The first stops (revoking its lease): the second takes over within a TTL.
                await asyncio.to_thread(first.stop)
                stopped = time.monotonic()

                async def second_holds() -> bool:
                    kv = await client.get(KEYS.node("dup"))
                    return kv is not None and decode(kv.value, NodeRecord).address == second.base

                await wait_until(second_holds, timeout=TTL + 2, what="the second agent registered")
                took = time.monotonic() - stopped
                assert took < TTL, f"takeover took {took:.1f} s"
                print(f"duplicate node_id: second agent registered {took:.2f} s after the first stopped")
            finally:
                await seen.stop()
        await wait_until(
            lambda: agent_status(second.base)["cluster"]["state"] == "registered", timeout=5, what="registered"
        )
        assert any("other agent's registration of this node_id ended" in ln for ln in second.log_lines())
    finally:
        for p in (second, first, coord):
            if p is not None:
                p.stop()
    for p in (first, second):
        assert p is not None and "Traceback" not in p.log_path.read_text()
