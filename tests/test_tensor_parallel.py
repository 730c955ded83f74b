"""A registered model with ``gpus_per_replica = 2``, end to end: the leader places a replica on
two GPUs of one class on one node, the agent starts the (simulated) vLLM server across both
with ``--tensor-parallel-size 2``, and it serves through the proxy. The node's other GPUs are
of another class or too full, so the placement has exactly one right answer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from etcd_fixtures import EtcdCluster
from helpers import (
    SIM_LAUNCHER,
    AgentProcess,
    CoordinatorProcess,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    start_agent_sync,
    wait_until,
)

from gpufleet.keyspace import Keyspace, assigned_instance_name, decode
from gpufleet.keyspace.records import NodeRecord, PlacementRecord
from gpufleet.routeslices import read_routes

pytestmark = pytest.mark.timeout(120)

CLUSTER = "tp"
KEYS = Keyspace(CLUSTER)
A100 = 'name = "NVIDIA A100-SXM4-80GB"\nmemory_total_gib = 80'
H100 = 'name = "NVIDIA H100 80GB HBM3"\nmemory_total_gib = 80'
# GPU 0: an A100 already 70 % used; 1 and 3: free A100s; 2: an H100 (another class).
GPUS = "".join(
    f"\n[[gpu.simulated]]\n{spec}\n" + (f"memory_used_gib = {used}\n" if used else "")
    for spec, used in ((A100, 56), (A100, 0), (H100, 0), (A100, 0))
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[EtcdCluster, AgentProcess, CoordinatorProcess, Path]]:
    etcd = EtcdCluster(1).start()
    shared = tmp_path / "shared"
    (shared / "big").mkdir(parents=True)
    (shared / "big" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    port = free_port()
    (tmp_path / "n1").mkdir()
    text = as_node(agent_toml(tmp_path / "n1", port, "", gpus=GPUS), "n1", f"http://127.0.0.1:{port}")
    text += cluster_toml(etcd.endpoints, CLUSTER, telemetry_min_gap_s=0.2)
    text += f'\n[models]\nlaunchers = {{ vllm = {SIM_LAUNCHER} }}\nallowed_roots = ["{shared}"]\n'
    agent = coordinator = None
    try:
        agent = start_agent_sync(tmp_path / "n1", text, port, 0)
        coordinator = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
        coordinator.wait_ready_sync()
        yield etcd, agent, coordinator, shared
    finally:
        if coordinator is not None:
            coordinator.stop()
        if agent is not None:
            agent.stop()
        etcd.destroy()


def gpuctl(etcd: EtcdCluster, *args: str) -> int:
    argv = [sys.executable, "-m", "gpuctl.main", "--etcd", ",".join(etcd.endpoints), "--cluster", CLUSTER, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).returncode


async def test_a_tp2_model_is_placed_on_two_gpus_of_one_class_and_served(cluster) -> None:  # type: ignore[no-untyped-def]
    etcd, agent, _, shared = cluster
    add = ["models", "add", "big", "--path", str(shared / "big"), "--classes", "A100"]
    assert gpuctl(etcd, *add, "--gpus-per-replica", "2", "--min-vram-gib", "40") == 0
    name = assigned_instance_name("big")
    async with etcd.client() as c:

        async def ready() -> list[int] | None:
            kv = await c.get(KEYS.node("n1"))
            rec = decode(kv.value, NodeRecord) if kv else None
            inst = next((i for i in rec.instances if i.name == name), None) if rec else None
            return inst.gpus if inst is not None and inst.state == "READY" else None

        assert await wait_until(ready, timeout=60, what="the TP=2 replica READY") == [1, 3]

        async def routed() -> bool:
            r = (await read_routes(c, KEYS)).get("big")
            return r is not None and [(e.node, e.state) for e in r.endpoints] == [("n1", "READY")]

        await wait_until(routed, timeout=20, what="big routed")
        kv = await c.get(KEYS.placement)
        assert kv is not None
        status = next(m for m in decode(kv.value, PlacementRecord).models if m.model == "big")
        assert status.nodes == ["n1"] and status.unplaced == 0
    log = (agent.tmp / "logs" / f"{name}.log").read_text()
    assert "tp=2" in log  # the server was started across both GPUs
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            agent.base + "/v1/chat/completions",
            json={"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ) as r,
    ):
        assert r.status == 200 and json.loads(await r.read())["model"] == "big"
