"""A registered model with ``gpus_per_replica = 2``, end to end: the leader places a replica on
two GPUs of one class on one node, the agent starts the (simulated) vLLM server across both
with ``--tensor-parallel-size 2``, and it serves through the proxy. The node's other GPUs are
of another class or too full, so the placement has exactly one right answer. Then with the
interconnect declared (two NVLink islands): the replica lands inside one island, although the
two GPUs with most free memory are in different ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import (
    wait_until,
)
from modelfleet import OneNodeFleet, one_node_fleet

from gpufleet.keyspace import Keyspace, assigned_instance_name, decode
from gpufleet.keyspace.records import LINK_NUMA_NODE, LINK_NVLINK, NodeRecord, PlacementRecord
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
def cluster(tmp_path: Path) -> Iterator[OneNodeFleet]:
    with one_node_fleet(tmp_path, CLUSTER, ["big"], gpus=GPUS) as fleet:
        yield fleet


async def test_a_tp2_model_is_placed_on_two_gpus_of_one_class_and_served(cluster: OneNodeFleet) -> None:
    etcd, agent = cluster.etcd, cluster.agent
    add = ["models", "add", "big", "--path", str(cluster.shared / "big"), "--classes", "A100"]
    assert cluster.gpuctl(*add, "--gpus-per-replica", "2", "--min-vram-gib", "40").returncode == 0
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


# Two NVLink islands on one socket, {0, 2} and {1, 3}. By free memory alone (80, 80, 70, 50 GiB)
# the replica would take GPUs 0 and 1, across the islands; island {0, 2} leaves 70 GiB on its
# least free GPU, island {1, 3} 50 GiB.
ISLAND_GPUS = "".join(
    f"\n[[gpu.simulated]]\n{A100}\nnvlink_island = {island}\nnuma_node = 0\nmemory_used_gib = {used}\n"
    for island, used in ((0, 0), (1, 0), (0, 10), (1, 30))
)


@pytest.fixture
def islands(tmp_path: Path) -> Iterator[OneNodeFleet]:
    with one_node_fleet(tmp_path, CLUSTER, ["big"], gpus=ISLAND_GPUS) as fleet:
        yield fleet


async def test_a_tp2_model_lands_inside_one_nvlink_island(islands: OneNodeFleet) -> None:
    add = ["models", "add", "big", "--path", str(islands.shared / "big"), "--gpus-per-replica", "2"]
    assert islands.gpuctl(*add, "--min-vram-gib", "40").returncode == 0
    name = assigned_instance_name("big")
    async with islands.etcd.client() as c:

        async def node_record() -> NodeRecord | None:
            kv = await c.get(KEYS.node("n1"))
            return decode(kv.value, NodeRecord) if kv else None

        async def ready() -> list[int] | None:
            rec = await node_record()
            inst = next((i for i in rec.instances if i.name == name), None) if rec else None
            return inst.gpus if inst is not None and inst.state == "READY" else None

        assert await wait_until(ready, timeout=60, what="the TP=2 replica READY") == [0, 2]
        rec = await node_record()
        assert rec is not None
        nv, numa = LINK_NVLINK, LINK_NUMA_NODE
        assert rec.gpus[0].links == [0, numa, nv, numa]  # what the agent published
        kv = await c.get(KEYS.placement)
        assert kv is not None
        status = next(m for m in decode(kv.value, PlacementRecord).models if m.model == "big")
        assert status.nodes == ["n1"] and status.reasons == []  # inside an island: nothing to say
    assert "tp=2" in (islands.agent.tmp / "logs" / f"{name}.log").read_text()
