"""A flapping instance is kept out of the routes longer each time (Envoy-style growing ejection).

Four A100 agents, so that one instance ejected plus the entry's stopped one stay under the
panic threshold (which would suspend ejection). Agent ``flappy`` serves model ``m``; three
times its model server starts failing its health checks, the agent restarts it, and it is
READY again within a couple of seconds. The leader ejects it each time for ``eject_base_s × n``
(here 2, 4, 6 s) from the ejection, even though the agent says READY sooner. Meanwhile requests
enter through the agent whose own instance is stopped, so every one of them is forwarded by the
route: none may fail.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from etcd_fixtures import EtcdCluster
from helpers import TOKEN, CoordinatorProcess, wait_until

from faults.fleet import CLUSTER, KEYS, chat, cluster_agent, endpoint_state, eq, neq, post_json, stop_all
from gpufleet.keyspace import decode
from gpufleet.keyspace.records import NodeRecord

BASE_S = 2.0
EXTRA = f"[health]\neject_base_s = {BASE_S}\neject_max_s = 30\neject_forget_after_s = 300\n"


async def agent_state(etcd: EtcdCluster, node: str) -> str | None:
    async with etcd.client() as c:
        kv = await c.get(KEYS.node(node))
    rec = decode(kv.value, NodeRecord) if kv else None
    return next((i.state for i in rec.instances if i.name == "m"), None) if rec else None


async def instance_port(etcd: EtcdCluster, node: str) -> int:
    async with etcd.client() as c:
        kv = await c.get(KEYS.node(node))
    assert kv is not None
    return next(i.port for i in decode(kv.value, NodeRecord).instances if i.name == "m")


async def test_a_flapping_instance_is_ejected_longer_each_time_and_no_request_fails(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    coord = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER, EXTRA).start()
    agents = {n: cluster_agent(tmp_path / n, n, etcd.endpoints[0]) for n in ("flappy", "steady", "steady2", "entry")}
    failures: list[str] = []
    sent = [0]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                status = chat(agents["entry"].base)[0]
                if status != 200:
                    failures.append(str(status))
            except OSError as e:
                failures.append(repr(e))
            sent[0] += 1

    loader = threading.Thread(target=traffic, daemon=True)
    try:
        coord.wait_ready_sync()
        assert post_json(agents["entry"].base + "/admin/instances/m/stop", token=TOKEN) == 202
        for node in ("flappy", "steady", "steady2"):
            await wait_until(lambda n=node: eq(endpoint_state(etcd, n), "READY"), timeout=30, what=f"{node} READY")
        await wait_until(lambda: neq(endpoint_state(etcd, "entry"), "READY"), timeout=30, what="entry out")
        loader.start()
        kept_out = []
        for n in (1, 2, 3):
            port = await instance_port(etcd, "flappy")
            assert post_json(f"http://127.0.0.1:{port}/sim/control", {"fail_health": True}) == 200
            await wait_until(lambda: neq(endpoint_state(etcd, "flappy"), "READY"), timeout=20, what=f"ejection {n}")
            out_at = time.monotonic()
            # The agent restarts the server (its health failed) and reports READY again...
            await wait_until(lambda: eq(agent_state(etcd, "flappy"), "READY"), timeout=30, what=f"restart {n}")
            agent_ready = time.monotonic() - out_at
            # ...but the route takes it back only when the n-th ejection has run out.
            await wait_until(lambda: eq(endpoint_state(etcd, "flappy"), "READY"), timeout=60, what=f"back {n}")
            kept_out.append((round(agent_ready, 1), round(time.monotonic() - out_at, 1)))
        stop.set()
        loader.join(15)
        for n, (_, out) in enumerate(kept_out, start=1):
            assert out >= BASE_S * n - 0.3, kept_out  # the write that ejected it came after the ejection
        assert kept_out[2][1] > kept_out[0][1] + BASE_S, kept_out
        logged = [ln for ln in coord.log_lines() if '"health transition"' in ln and "flappy/m" in ln]
        for n in (1, 2, 3):
            assert any(f"ejection {n} ({BASE_S * n:.0f} s)" in ln for ln in logged), logged
        assert failures == [] and sent[0] > 10, (failures[:5], sent[0])
    finally:
        stop.set()
        stop_all(*agents.values(), coord)
