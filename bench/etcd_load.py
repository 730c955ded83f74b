#!/usr/bin/env python3
"""N lightweight simulated agents registering and publishing against one local etcd.

Each simulated agent is the real ``ClusterPublisher`` (lease, keep-alive every TTL/3, publish
policy) fed by a synthetic node record whose GPU temperature and utilization random-walk every
5 s probe. They share one ``EtcdClient`` so 1,000 of them fit in one process. Measured per N:
etcd writes/s (etcd's own ``etcd_mvcc_put_total``), etcd CPU, registration latency. Baseline,
side by side: the same agents writing their record on every probe (what "publish what you
measure" costs).

    .venv/bin/python bench/etcd_load.py [--agents 100 1000] [--seconds 60]

Needs an ``etcd`` binary on PATH (scripts/bootstrap installs Debian's). Prints JSON.
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

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_seconds, etcd_puts, pct, start_etcd

from agent.cluster.publish_policy import PublishPolicy
from agent.cluster.publisher import ClusterPublisher
from agent.config import ClusterSection
from agent.gpu.smoothing import UtilizationSmoother
from gpufleet.etcd import EtcdClient
from gpufleet.keyspace.records import GpuRecord, InstanceLoad, InstanceRecord, NodeRecord
from gpufleet.logsetup import configure_logging

PROBE_S = 5.0


class FakeNode:
    """An 8-GPU serving host. Model (stated, since it decides the result): each GPU's load level
    drifts slowly (random walk, sd 3 points per probe); NVML's raw utilization scatters ±30
    points around it from probe to probe, and the agent's real smoother averages it; the
    temperature follows the load (45 + 0.35 × load °C) with ±0.6 °C sensor noise, reported in
    whole degrees as NVML does."""

    def __init__(self, i: int, rng: random.Random) -> None:
        self.i, self.rng = i, rng
        self.load = [rng.uniform(10, 90) for _ in range(8)]
        self.forced_temperature: float | None = None  # bench/scale.py heats a node up
        self.smoother = UtilizationSmoother()
        self.gpus: list[GpuRecord] = []
        self.step()

    def step(self) -> None:
        raw = []
        for g in range(8):
            self.load[g] = min(100.0, max(0.0, self.load[g] + self.rng.gauss(0, 3)))
            util = min(100.0, max(0.0, self.load[g] + self.rng.uniform(-30, 30)))
            temp = round(45 + 0.35 * self.load[g] + self.rng.gauss(0, 0.6))
            if self.forced_temperature is not None:
                temp = self.forced_temperature
            raw.append(
                GpuRecord(
                    index=g,
                    uuid=f"GPU-{self.i}-{g}",
                    name="NVIDIA A100-SXM4-80GB",
                    gpu_class="A100",
                    memory_total_bytes=80 << 30,
                    memory_used_bytes=60 << 30,
                    memory_free_bytes=20 << 30,
                    utilization_percent=round(util),
                    temperature_celsius=temp,
                    power_watts=300.0,
                )
            )
        self.gpus = self.smoother.apply(raw)

    def record(self) -> NodeRecord:
        gpus = self.gpus
        insts = [
            InstanceRecord(
                name=f"i{k}",
                model="qwen3-32b",
                backend="vllm",
                state="READY",
                state_since=0.0,
                port=8000 + k,
                gpus=[2 * k, 2 * k + 1],
                gpu_memory_fraction=0.9,
                load=InstanceLoad(requests_running=self.rng.randint(0, 8)),
            )
            for k in range(4)
        ]
        return NodeRecord(
            node=f"sim-{self.i:04d}",
            address=f"http://10.0.{self.i // 256}.{self.i % 256}:8080",
            mode="cluster",
            agent_version="bench",
            started_at=0.0,
            updated_at=time.time(),
            gpu_source="simulated",
            gpu_classes=["A100"],
            gpus=gpus,
            instances=insts,
            ready=True,
        )


async def run(n: int, seconds: float, url: str, etcd_pid: int, every_probe: bool) -> dict:
    cfg = ClusterSection(endpoints=[url], cluster=f"bench{n}{'naive' if every_probe else ''}", timeout_s=2.0)
    rng = random.Random(n)
    async with EtcdClient([url], timeout=5.0) as etcd:
        nodes = [FakeNode(i, rng) for i in range(n)]
        t0 = time.monotonic()
        registered_at: dict[str, float] = {}

        class TimedPublisher(ClusterPublisher):
            async def _register(self) -> None:
                await super()._register()
                registered_at.setdefault(self.node_id, time.monotonic() - t0)

        pubs = [TimedPublisher(cfg, f"sim-{i:04d}", nodes[i].record, client=etcd) for i in range(n)]
        if every_probe:
            for p in pubs:  # the naive baseline: every probe is a write
                p.policy = PublishPolicy(interval_s=PROBE_S - 0.01, min_gap_s=0)
        for p in pubs:  # all at once, as after a fleet-wide restart; one shared client
            p._task = asyncio.create_task(p._run())
        while len(registered_at) < n and time.monotonic() - t0 < 60:  # noqa: ASYNC110 - a benchmark's poll
            await asyncio.sleep(0.01)

        async def probes() -> None:
            # Each node probes every 5 s, spread over the period like real, unsynchronised hosts.
            order = list(range(n))
            while True:
                for i in order:
                    nodes[i].step()
                    pubs[i].poke()
                    await asyncio.sleep(PROBE_S / n)

        prober = asyncio.create_task(probes())
        await asyncio.sleep(5)  # settle past registration
        puts0, cpu0, w0 = etcd_puts(url), cpu_seconds(etcd_pid), time.monotonic()
        await asyncio.sleep(seconds)
        puts1, cpu1, w1 = etcd_puts(url), cpu_seconds(etcd_pid), time.monotonic()
        prober.cancel()
        for p in pubs:
            assert p._task is not None
            p._task.cancel()
        await asyncio.gather(*(p._task for p in pubs if p._task), return_exceptions=True)
        lats = list(registered_at.values())
        return {
            "agents": n,
            "policy": "every probe (baseline)" if every_probe else "meaningful change + 30 s refresh",
            "registered": len(registered_at),
            "registration_s": {
                "p50": round(pct(lats, 50), 3),
                "p99": round(pct(lats, 99), 3),
                "max": round(max(lats), 3),
            },
            "etcd_writes_per_s": round((puts1 - puts0) / (w1 - w0), 1),
            "etcd_cpu_percent": round(100 * (cpu1 - cpu0) / (w1 - w0), 1),
            "window_s": round(w1 - w0, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory() as d:
        etcd, url = start_etcd(d)
        try:
            results = []
            for n in args.agents:
                for naive in (False, True):
                    results.append(asyncio.run(run(n, args.seconds, url, etcd.pid, naive)))
            print(
                json.dumps(
                    {
                        "benchmark": "etcd_load",
                        "probe_interval_s": PROBE_S,
                        "lease_ttl_s": 10,
                        "results": results,
                        "goal": "1000 agents at <= 100 writes/s",
                    },
                    indent=2,
                )
            )
        finally:
            etcd.stop()


if __name__ == "__main__":
    main()
