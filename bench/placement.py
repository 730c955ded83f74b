#!/usr/bin/env python3
"""Placement at scale: how long the leader's ``place()`` takes on every pass.

The leader runs placement after the routes on every pass (every node-record change, and every
``sample_interval_s``), so its cost adds to each pass. Synthetic fleet (the same as the route
benchmark in ``failover.py``: 8 × 80 GiB GPUs per node, 4 static instances on 2 GPUs each, 20 GiB
free per GPU and 0.7 of each GPU's memory share taken, 60 % A100 / 30 % H100 / 10 % L40S) plus
``--models`` registered models of 1–8 replicas, 10–16 GiB each, every node reporting every path
available.

Measured: ``place()`` from scratch (the first pass of a new registry: every replica placed) and
in the steady state (every replica already assigned: the keep phase, what every later pass
costs); then the same with a full cluster (static instances hold 0.9 of every GPU), where every
pass scans every node for every model and finds nothing. Prints JSON.

    .venv/bin/python bench/placement.py --nodes 1000 10000 --models 50
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from failover import synthetic_nodes

from coordinator.policy.placement import NodeView, place
from gpufleet.keyspace.records import ModelAvailability, ModelRecord


def registry(n: int, rng: random.Random) -> dict[str, ModelRecord]:
    return {
        f"reg-{i:03d}": ModelRecord(
            name=f"reg-{i:03d}",
            path=f"/mnt/models/reg-{i:03d}",
            replicas=rng.randint(1, 8),
            min_vram_gib=float(rng.randint(10, 16)),
            classes=[] if i % 3 else ["A100"],
        )
        for i in range(n)
    }


def run(n_nodes: int, n_models: int, runs: int, full: bool = False) -> dict:
    rng = random.Random(n_nodes)
    models = registry(n_models, rng)
    nodes = synthetic_nodes(n_nodes, rng)
    avail = [ModelAvailability(model=m.name, path=m.path, available=True) for m in models.values()]
    for rec in nodes.values():
        rec.models = avail
        for inst in rec.instances:  # 0.7 of each GPU taken by static instances, 20 GiB free
            inst.gpu_memory_fraction = 0.9 if full else 0.7  # full: no model fits anywhere
    views = {name: NodeView(record=rec, state="READY") for name, rec in nodes.items()}
    now = time.time()
    t0 = time.perf_counter()
    first = place(models, views, {}, now)
    cold = time.perf_counter() - t0
    steady = []
    for _ in range(runs):
        t0 = time.perf_counter()
        again = place(models, views, first.assignments, now)
        steady.append(time.perf_counter() - t0)
        assert again.assignments == first.assignments, "a steady pass moved something"
    placed = sum(len(s.nodes) for s in first.status.values())
    return {
        "scenario": "cluster full: every replica unplaceable" if full else "replicas fit",
        "nodes": n_nodes,
        "models": n_models,
        "replicas_wanted": sum(m.replicas for m in models.values()),
        "replicas_placed": placed,
        "first_pass_ms": round(cold * 1000, 1),
        "steady_pass_median_ms": round(statistics.median(steady) * 1000, 1),
        "steady_pass_max_ms": round(max(steady) * 1000, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    out = [run(n, args.models, args.runs, full) for full in (False, True) for n in args.nodes]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
