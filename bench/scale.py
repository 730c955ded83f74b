#!/usr/bin/env python3
"""Scale: 1,000 lightweight agents and two real coordinators on one etcd.

The agents are the real ``ClusterPublisher`` (lease, keep-alive, publish policy) fed by the
synthetic 8-GPU hosts of ``etcd_load.py`` (4 instances of one model each, telemetry random-walking
every 5 s), sharing one etcd client so 1,000 fit in one process. The coordinators are real
``gpu-coordinator`` processes with the production defaults. ``--mirrors`` data planes are the
agents' real ``RouteTable`` (list-then-watch of the route table), each on its own etcd client,
as on separate hosts.

Measured over ``--seconds`` of steady state: etcd writes/s, leader and standby CPU, the route
record's size. Then ``--trials`` times: one node's GPUs jump to 88 °C (over the 85 °C cap):
- ``publish_s``: from the change to the node record in etcd (crossing 85 °C is a state change
  for the agent's publish policy, so this is not held back by the 15 s telemetry gap);
- ``route_s``: from the record in etcd to the capped weight seen by *every* mirror (the farthest
  agent): leader wake-up, recomputation, write, watch fan-out.
The node is cooled again (and its weight seen restored) between trials. Prints JSON.

    .venv/bin/python bench/scale.py --agents 1000 --seconds 60 --trials 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_seconds, etcd_puts, free_port, pct, start_etcd
from etcd_load import PROBE_S, FakeNode

from agent.cluster.publisher import ClusterPublisher
from agent.cluster.routes import RouteTable
from agent.config import ClusterSection
from gpufleet import tomlwrite
from gpufleet.etcd import EtcdClient
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import NodeRecord
from gpufleet.logsetup import configure_logging
from gpufleet_dev.localfleet import CoordinatorProcess

CLUSTER = "scale"
MODEL = "qwen3-32b"
HOT_C = 88.0


def start_coordinator(tmp: Path, ident: str, url: str) -> tuple[CoordinatorProcess, int]:
    """A coordinator of the local-fleet harness with the defaults of a deployment (warnings only)."""
    port = free_port()
    coordinator = {"id": ident, "listen_port": port, "log_format": "json", "log_level": "warning"}
    text = tomlwrite.dumps({"coordinator": coordinator, "etcd": {"endpoints": [url], "cluster": CLUSTER}})
    return CoordinatorProcess(tmp, ident, [url], CLUSTER, port=port, config_text=text).start(), port


def leader_of(ports: dict[str, int]) -> str | None:
    import urllib.request

    for ident, port in ports.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=2) as r:
                if json.loads(r.read())["is_leader"]:
                    return ident
        except OSError:
            continue
    return None


async def until(cond, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll ``cond`` every 5 ms; the time it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what} not within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def run(args: argparse.Namespace, url: str, etcd_pid: int, tmp: Path) -> dict:
    procs, ports = {}, {}
    for ident in ("c1", "c2"):
        procs[ident], ports[ident] = start_coordinator(tmp, ident, url)
    keys = Keyspace(CLUSTER)
    cfg = ClusterSection(endpoints=[url], cluster=CLUSTER, timeout_s=2.0)
    rng = random.Random(7)
    nodes = [FakeNode(i, rng) for i in range(args.agents)]
    mirrors_clients = [EtcdClient([url], timeout=5.0) for _ in range(args.mirrors)]
    try:
        async with EtcdClient([url], timeout=5.0) as etcd:
            pubs = [ClusterPublisher(cfg, f"sim-{i:04d}", nodes[i].record, client=etcd) for i in range(args.agents)]
            for p in pubs:
                p._task = asyncio.create_task(p._run())

            async def probes() -> None:
                while True:
                    for i in range(args.agents):
                        nodes[i].step()
                        pubs[i].poke()
                        await asyncio.sleep(PROBE_S / args.agents)

            prober = asyncio.create_task(probes())
            for c in mirrors_clients:
                await c.__aenter__()
            tables = [RouteTable(c, keys, f"sim-{i:04d}") for i, c in enumerate(mirrors_clients)]
            for t in tables:
                t.start()

            def all_routed() -> bool:
                return all(
                    (r := t.routes.get(MODEL)) is not None and len(r.endpoints) == 4 * args.agents for t in tables
                )

            await until(all_routed, 180, "every node in every mirror's route")
            leader = await asyncio.to_thread(leader_of, ports)
            assert leader is not None
            standby = next(i for i in procs if i != leader)
            await asyncio.sleep(10)  # past the registration burst
            w0, puts0 = time.monotonic(), etcd_puts(url)
            cpu0 = {i: cpu_seconds(p.pid) for i, p in procs.items()} | {"etcd": cpu_seconds(etcd_pid)}
            await asyncio.sleep(args.seconds)
            w1, puts1 = time.monotonic(), etcd_puts(url)
            cpu1 = {i: cpu_seconds(p.pid) for i, p in procs.items()} | {"etcd": cpu_seconds(etcd_pid)}
            kv = await etcd.get(keys.route(MODEL))
            route_bytes = len(kv.value) if kv else 0

            # Trials: one node heats up; how long until every mirror sees its weight capped.
            publish_s, route_s = [], []
            # Lightly loaded nodes: their normal weight is well above the 30 % cap, so "capped"
            # and "restored" are both unambiguous.
            coolest = sorted(range(args.agents), key=lambda k: sum(nodes[k].load))[: args.trials]
            for i in coolest:
                name, node = f"sim-{i:04d}", nodes[i]

                def weights(t: RouteTable, n: str = name) -> list[int]:
                    r = t.routes.get(MODEL)
                    return [e.weight for e in r.endpoints if e.node == n] if r else []

                node.forced_temperature = HOT_C
                t0 = time.monotonic()
                node.step()
                pubs[i].poke()

                async def published(n: str = name) -> bool:
                    kv = await etcd.get(keys.node(n))
                    rec = decode(kv.value, NodeRecord) if kv else None
                    return bool(rec and all(g.temperature_celsius == HOT_C for g in rec.gpus))

                while not await published():  # noqa: ASYNC110 - a benchmark's poll
                    await asyncio.sleep(0.005)
                t1 = time.monotonic()
                await until(lambda: all(max(weights(t), default=999) <= 0.3 * 220 for t in tables), 60, "capped")
                t2 = time.monotonic()
                publish_s.append(t1 - t0)
                route_s.append(t2 - t1)
                node.forced_temperature = None
                node.step()
                pubs[i].poke()
                await until(lambda: all(max(weights(t), default=0) > 0.3 * 220 for t in tables), 120, "cooled")
            prober.cancel()
            for p in pubs:
                if p._task:
                    p._task.cancel()
            for t in tables:
                await t.stop()
            window = w1 - w0
            return {
                "benchmark": "scale",
                "agents": args.agents,
                "endpoints": 4 * args.agents,
                "mirrors": args.mirrors,
                "window_s": round(window, 1),
                "etcd_writes_per_s": round((puts1 - puts0) / window, 1),
                "route_record_bytes": route_bytes,
                "cpu_percent": {
                    "leader": round(100 * (cpu1[leader] - cpu0[leader]) / window, 1),
                    "standby": round(100 * (cpu1[standby] - cpu0[standby]) / window, 1),
                    "etcd": round(100 * (cpu1["etcd"] - cpu0["etcd"]) / window, 1),
                },
                "telemetry_change_to_etcd_s": {"p50": round(pct(publish_s, 50), 2), "max": round(max(publish_s), 2)},
                "etcd_to_farthest_agent_route_s": {"p50": round(pct(route_s, 50), 3), "max": round(max(route_s), 3)},
                "trials": args.trials,
            }
    finally:
        for c in mirrors_clients:
            await c.__aexit__(None, None, None)
        for p in procs.values():
            p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--mirrors", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory() as d:
        etcd, url = start_etcd(d + "/etcd")
        try:
            print(json.dumps(asyncio.run(run(args, url, etcd.pid, Path(d))), indent=2))
        finally:
            etcd.stop()


if __name__ == "__main__":
    main()
