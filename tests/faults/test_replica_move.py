"""A single replica moved (its node drained) under traffic through another node: no request fails.

Before: the leader removed the replica from the drained node at once and routed nothing until
its replacement elsewhere was READY, about 3 s of 503 for a model with one replica. Now the
move is make-before-break: the drained node's replica stays assigned and routed until the
replacement is READY (coordinator/policy/placement.py rule 7, policy/routes.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
from etcd_fixtures import EtcdCluster
from helpers import SIM_LAUNCHER, CoordinatorProcess, agent_toml, as_node, cluster_toml, free_port, wait_until
from helpers import start_agent_sync as start_agent

from faults.fleet import CLUSTER, KEYS, agent_status
from gpufleet.keyspace import encode
from gpufleet.keyspace.records import DrainRecord, ModelRecord

H100 = '\n[[gpu.simulated]]\nname = "NVIDIA H100 80GB HBM3"\nmemory_total_gib = 80\n'
A100 = '\n[[gpu.simulated]]\nname = "NVIDIA A100-SXM4-80GB"\nmemory_total_gib = 80\n'


def node_config(tmp: Path, node: str, port: int, gpus: str, etcd: EtcdCluster, shared: Path) -> str:
    tmp.mkdir(parents=True)
    text = as_node(agent_toml(tmp, port, "", gpus=gpus), node, f"http://127.0.0.1:{port}")
    models = f'launchers = {{ vllm = {SIM_LAUNCHER} }}\nallowed_roots = ["{shared}"]\nrecheck_interval_s = 1.0\n'
    return text + cluster_toml(etcd.endpoints, CLUSTER) + "\n[models]\n" + models


def replica_ready(base: str) -> bool:
    return any(i["assigned"] and i["state"] == "READY" for i in agent_status(base)["instances"])


def has_replica(base: str) -> bool:
    return any(i["assigned"] for i in agent_status(base)["instances"])


async def test_moving_a_single_replica_fails_no_request(etcd: EtcdCluster, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "mv.gguf").write_bytes(b"GGUF" + bytes(1024))
    coord = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    agents = {}
    try:
        # Two H100 nodes the model may run on, and an A100 entry node it may not (classes).
        for node, gpus in (("h1", H100), ("h2", H100), ("entry", A100)):
            port = free_port()
            cfg = node_config(tmp_path / node, node, port, gpus, etcd, shared)
            agents[node] = await asyncio.to_thread(start_agent, tmp_path / node, cfg, port, 0)
        coord.wait_ready_sync()
        # Loading takes a while, as a real model's does: the window a move used to be down.
        rec = ModelRecord(name="mv", path=str(shared / "mv.gguf"), classes=["H100"], args=["--startup-delay", "1.5"])
        async with etcd.client() as c:
            await c.put(KEYS.model("mv"), encode(rec))
        holder = await wait_until(
            lambda: next((n for n in ("h1", "h2") if replica_ready(agents[n].base)), None),
            timeout=20,
            what="the replica READY",
        )
        other = "h2" if holder == "h1" else "h1"
        statuses: list[int] = []
        fail_times: list[float] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            body = {"model": "mv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                while not stop.is_set():
                    async with http.post(agents["entry"].base + "/v1/chat/completions", json=body) as r:
                        await r.read()
                        statuses.append(r.status)
                        if r.status != 200:
                            fail_times.append(time.monotonic())

        await wait_until(lambda: _answers(agents["entry"].base), timeout=10, what="mv through the entry node")
        load = asyncio.create_task(traffic())
        try:
            await wait_until(lambda: len(statuses) >= 5, timeout=10, what="traffic flowing")
            t0 = time.monotonic()
            async with etcd.client() as c:
                drain = DrainRecord(node=holder, reason="move test", by="test", at=time.time())
                await c.put(KEYS.drain(holder), encode(drain))
            await wait_until(lambda: replica_ready(agents[other].base), timeout=20, what="the replacement READY")
            await wait_until(lambda: not has_replica(agents[holder].base), timeout=20, what="the old replica gone")
            moved_in = time.monotonic() - t0
            n = len(statuses)
            await wait_until(lambda: len(statuses) >= n + 10, timeout=10, what="traffic after the move")
        finally:
            stop.set()
            await load
        failed = Counter(s for s in statuses if s != 200)
        span = fail_times[-1] - fail_times[0] if fail_times else 0.0
        print(
            f"replica move: done in {moved_in:.2f} s; {len(statuses)} requests, "
            f"failed: {dict(failed)} over {span:.2f} s"
        )
        assert not failed, f"{sum(failed.values())} of {len(statuses)} requests failed during the move: {failed}"
    finally:
        for a in agents.values():
            a.stop()
        coord.stop()


async def _answers(base: str) -> bool:
    body = {"model": "mv", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as http, http.post(base + "/v1/chat/completions", json=body) as r:
        return r.status == 200
