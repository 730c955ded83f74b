"""Autoscaling and cold starts across nodes, end to end: real etcd, one coordinator, three agents
(two with an A100, one with an H100) running the simulated vLLM server.

- A request for an on-demand A100 model enters the H100 node, which cannot run it: its proxy
  holds the request while the leader places the replica on an A100 node, and forwards it once
  that replica is READY. The leader logs no panic for the cold start.
- A burst through the H100 node (the simulated server runs 2 sequences at once, the rest wait)
  scales a model from 1 to 2 replicas; when the burst is over, back to 1, stopping an idle
  replica. Each decision, with its reason, is in ``gpuctl models list`` and the leader's log.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from helpers import (
    wait_until,
)
from modelfleet import ModelFleet, model_fleet

from gpufleet.etcd import EtcdClient
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import ModelPlacement, NodeRecord, PlacementRecord

CLUSTER = "autoscale"
KEYS = Keyspace(CLUSTER)
GPUS = {"a100-1": "NVIDIA A100-SXM4-80GB", "a100-2": "NVIDIA A100-SXM4-80GB", "h100-1": "NVIDIA H100 80GB HBM3"}
ENTRY = "h100-1"  # no A100: every model below runs elsewhere


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelFleet]:
    tmp = tmp_path_factory.mktemp("autoscale")
    shared = tmp / "shared"
    for name in ("od", "m"):
        (shared / name).mkdir(parents=True)
        (shared / name / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with model_fleet(tmp, CLUSTER, GPUS, [shared]) as f:
        yield f


async def status_of(etcd: EtcdClient, model: str) -> ModelPlacement | None:
    kv = await etcd.get(KEYS.placement)
    rec = decode(kv.value, PlacementRecord) if kv else None
    return next((m for m in rec.models if m.model == model), None) if rec else None


async def ready_nodes(etcd: EtcdClient, model: str) -> list[str]:
    out = []
    for kv in (await etcd.get_prefix(KEYS.nodes)).kvs:
        rec = decode(kv.value, NodeRecord)
        if any(i.model == model and i.assigned and i.state == "READY" for i in rec.instances):
            out.append(rec.node)
    return sorted(out)


def chat(model: str, max_tokens: int = 4) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


@pytest.mark.timeout(120)
async def test_cold_start_on_another_node_is_held_and_forwarded(fleet: ModelFleet) -> None:
    add = fleet.gpuctl(
        "models", "add", "od", "--path", str(fleet.shared / "od"), "--classes", "A100", "--min-vram-gib", "10",
        "--min-replicas", "0", "--idle-unload-after", "600", "--arg=--startup-delay=1.5",
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    entry = fleet.agents[ENTRY]
    async with fleet.etcd.client() as etcd:
        status = await wait_until(lambda: status_of(etcd, "od"), timeout=20, what="od's placement status")
        assert status.nodes == [] and status.scaling.startswith("idle: 0 of 1"), status
        async with aiohttp.ClientSession() as http:
            t0 = time.monotonic()
            async with http.post(entry.base + "/v1/chat/completions", json=chat("od")) as r:
                body = await r.read()
                took = time.monotonic() - t0
                assert r.status == 200, body
        print(f"\ncold start through {ENTRY}, replica on another node: answered in {took:.2f} s")
        assert json.loads(body)["choices"][0]["message"]["content"]
        assert took >= 1.5  # the replica's simulated load time: the request was held, not refused
        placed = await status_of(etcd, "od")
        assert placed is not None and len(placed.nodes) == 1 and placed.nodes[0].startswith("a100"), placed
        assert await ready_nodes(etcd, "od") == placed.nodes
    lines = [json.loads(x) for x in entry.log_lines() if x.startswith("{")]
    held = [x for x in lines if x.get("event") == "cold start: request held until a replica was ready"]
    assert held and held[-1]["model"] == "od", held
    # A cold start is not an outage: no panic mode for the class of the only replica.
    assert not [x for x in fleet.leader_log() if "panic" in x.get("event", "")]


async def _burst(base: str, workers: int, stop: asyncio.Event, answers: list[int]) -> None:
    async with aiohttp.ClientSession() as http:

        async def worker() -> None:
            while not stop.is_set():
                async with http.post(base + "/v1/chat/completions", json=chat("m", 10)) as r:
                    await r.read()
                    answers.append(r.status)

        await asyncio.gather(*(worker() for _ in range(workers)))


@pytest.mark.timeout(180)
async def test_burst_scales_up_and_back_down(fleet: ModelFleet) -> None:
    add = fleet.gpuctl(
        "models", "add", "m", "--path", str(fleet.shared / "m"), "--classes", "A100", "--min-vram-gib", "10",
        "--max-replicas", "2", "--scale-up-waiting", "2", "--scale-up-after", "1", "--scale-down-waiting", "0",
        "--scale-down-after", "3", "--scale-cooldown", "2",
        # 2 sequences at once, 20 tokens/s: a 10-token answer takes 0.5 s, the rest of a burst waits
        "--arg=--max-num-seqs=2", "--arg=--tokens-per-second=20",
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    assert "up to 2 under load (autoscaled)" in add.stdout
    async with fleet.etcd.client() as etcd:
        first = (await wait_until(lambda: ready_nodes(etcd, "m"), timeout=30, what="m READY on one node"))[0]
        status = await status_of(etcd, "m")
        assert status is not None and status.desired == 1
        listed = fleet.gpuctl("models", "list").stdout
        assert "m: autoscaled, wanted: 1 of 1-2 replicas" in listed, listed

        stop, answers = asyncio.Event(), []
        burst = asyncio.create_task(_burst(fleet.agents[ENTRY].base, 12, stop, answers))
        try:
            t0 = time.monotonic()
            nodes = await wait_until(
                lambda: _len_is(ready_nodes(etcd, "m"), 2), timeout=45, what="a second replica READY"
            )
            print(f"\nburst: second replica READY {time.monotonic() - t0:.1f} s after the burst began")
            listed = fleet.gpuctl("models", "list").stdout
            assert "m: autoscaled, scaled up: " in listed and "requests waiting per READY replica" in listed, listed
            assert "2 of 1-2 replicas" in listed, listed
        finally:
            stop.set()
            await burst
        assert answers and set(answers) == {200}, sorted(set(answers))

        # After the burst, one long request on each replica, each entering at its replica's own
        # node (served there): the scale-down falls due 3 s after the queues drained, but both
        # replicas serve. It waits until the shorter request is over (10 s) and stops that
        # replica; the other's request (16 s) runs on to its end. Placement's own order for
        # dropping a replica (node name descending) would have stopped the other one.
        short, long = sorted(nodes)  # a100-1, a100-2
        t_end = time.monotonic()
        ends: dict[str, float] = {}
        runs = {
            node: asyncio.create_task(_timed(fleet.agents[node].base, n, ends, node))
            for node, n in ((short, 200), (long, 320))  # 10 s and 16 s at 20 tokens/s
        }

        async def waiting_for_idle() -> bool:
            st = await status_of(etcd, "m")
            return st is not None and "waiting for an idle replica" in st.scaling

        await wait_until(waiting_for_idle, timeout=15, what="the scale-down waiting for an idle replica")
        listed = fleet.gpuctl("models", "list").stdout
        assert "waiting for an idle replica (every replica is serving)" in listed, listed
        assert not any(t.done() for t in runs.values())  # both still serving: nothing was stopped
        left = await wait_until(lambda: _len_is(ready_nodes(etcd, "m"), 1), timeout=30, what="back to one replica")
        down_after = time.monotonic() - t_end
        print(f"after the burst: back to one replica in {down_after:.1f} s (the last request on it ended)")
        assert left == [long] and short in ends and long not in ends
        tokens = {node: await t for node, t in runs.items()}
        assert tokens == {short: 200, long: 320}  # both answered in full
        status = await status_of(etcd, "m")
        assert status is not None and status.desired == 1 and status.nodes == [long]
        listed = fleet.gpuctl("models", "list").stdout
        assert "m: autoscaled, scaled down: " in listed and f"stopping the replica on {short}" in listed, listed
        assert first in nodes

    decided = [x for x in fleet.leader_log() if x.get("event") == "model autoscaled" and x.get("model") == "m"]
    assert [(x["replicas"], x["reason"].split(":")[0]) for x in decided] == [(2, "scaled up"), (1, "scaled down")]
    assert decided[1]["stopping"] == short
    waits = [x for x in fleet.leader_log() if x.get("event") == "model autoscaling waits"]
    assert waits and waits[0]["model"] == "m"


async def _timed(base: str, max_tokens: int, ends: dict[str, float], node: str) -> int:
    """One request of ``max_tokens`` tokens; the tokens answered (its end noted in ``ends``)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/chat/completions", json=chat("m", max_tokens)) as r:
            body = await r.json()
            assert r.status == 200, body
    ends[node] = time.monotonic()
    return int(body["usage"]["completion_tokens"])


async def _len_is(listing: Any, n: int) -> list[str] | None:
    got = await listing
    return got if len(got) == n else None


def test_max_replicas_is_checked_before_it_reaches_etcd(fleet: ModelFleet) -> None:
    path = str(fleet.shared / "m")
    low = fleet.gpuctl("models", "add", "x", "--path", path, "--replicas", "2", "--max-replicas", "1")
    assert low.returncode != 0 and "max_replicas: must be between replicas (2) and 1000" in low.stderr, low.stderr
    # Two A100 nodes, one replica per node: five replicas can never run.
    wide = fleet.gpuctl("models", "add", "x", "--path", path, "--classes", "A100", "--max-replicas", "5")
    assert wide.returncode != 0, wide.stdout
    assert "max_replicas: 5 replicas need 5 nodes with 1 GPU(s) of class A100 each" in wide.stderr, wide.stderr
    assert "the cluster has 2" in wide.stderr
    band = fleet.gpuctl("models", "add", "x", "--path", path, "--max-replicas", "2", "--scale-down-waiting", "3")
    assert band.returncode != 0 and "scale_down_waiting" in band.stderr, band.stderr
    listed = json.loads(fleet.gpuctl("-o", "json", "models", "list").stdout)
    assert "x" not in [r["model"]["name"] for r in listed]
