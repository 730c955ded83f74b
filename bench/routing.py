#!/usr/bin/env python3
"""Choice of node: round-robin by weight vs load-aware (power of two choices), same run.

Two nodes serve a model with the same route weight (same GPU class), but one is four times
slower: two simulated vLLM servers (``--tokens-per-second`` 400 and 100, 8 sequences each,
more requests queue). The proxy is the real ``agent.proxy.Proxy`` in this process, forwarding by
a fixed route table to both as "other nodes" (what an agent without a local instance does).
Closed-loop clients send a mix of short (8 tokens) and long (64 tokens) non-streaming
completions for ``--seconds`` per policy; the policies alternate in blocks so drift hits both.

Measured per policy: completed requests/s, latency p50/p90/p99 for short and long requests,
and each node's share of the requests.

    .venv/bin/python bench/routing.py [--clients 24] [--seconds 20] [--blocks 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from _common import free_port, pct
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.config import DegradationSection, ProxySection
from agent.proxy import Proxy, add_proxy
from agent.proxy.metrics import ProxyMetrics
from agent.proxy.upstreams import LocalUpstream, ServedModel
from gpufleet.keyspace.records import RouteEndpoint, RouteRecord
from gpufleet.logsetup import configure_logging
from gpufleet_dev.staticroutes import StaticRoutes

MODEL = "m"
NODES = {"fast": 400.0, "slow": 100.0}  # tokens per second
SHORT, LONG, LONG_SHARE = 8, 64, 0.2


class EntryNode:
    """What the proxy reads from an agent with no instance of its own."""

    def __init__(self, routes: StaticRoutes, balance: str) -> None:
        self.routes = routes
        self.node_id = "entry"
        self.proxy_cfg = ProxySection(remote_balance=balance, access_log=False)  # type: ignore[arg-type]
        self.degradation_cfg = DegradationSection()

    def local(self, model: str) -> list[LocalUpstream]:
        return []

    def ready_models(self) -> list[ServedModel]:
        return []

    def gpu_classes(self) -> set[str]:
        return {"A100"}

    def fallback_of(self, model: str) -> str | None:
        return None


def start_backends() -> tuple[dict[str, str], list[subprocess.Popen[bytes]]]:
    urls, procs = {}, []
    for node, tps in NODES.items():
        port = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gpufleet_dev.simulated_server", "serve", MODEL, "--port", str(port),
                 "--tokens-per-second", str(tps), "--max-num-seqs", "8", "--disable-uvicorn-access-log"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        urls[node] = f"http://127.0.0.1:{port}"
    return urls, procs


async def wait_up(urls: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as http:
        for url in urls.values():
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with http.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not come up")
                await asyncio.sleep(0.1)


async def start_proxy(route: RouteRecord, balance: str) -> tuple[web.AppRunner, str]:
    proxy = Proxy(EntryNode(StaticRoutes({MODEL: route}), balance), ProxyMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    app = web.Application()
    add_proxy(app, proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def load(base: str, clients: int, seconds: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    lat: dict[str, list[float]] = {"short": [], "long": []}
    nodes: Counter[str] = Counter()
    errors = 0
    end = time.monotonic() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < end:
            kind = "long" if rng.random() < LONG_SHARE else "short"
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": LONG if kind == "long" else SHORT}  # fmt: skip
            t0 = time.monotonic()
            async with http.post(base + "/v1/chat/completions", json=body) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    continue
                nodes[r.headers.get("X-GPUFleet-Node", "?")] += 1
            lat[kind].append(time.monotonic() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return {"lat": lat, "nodes": nodes, "errors": errors, "seconds": seconds}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lat: dict[str, list[float]] = {"short": [], "long": []}
    nodes: Counter[str] = Counter()
    for r in runs:
        for k in lat:
            lat[k] += r["lat"][k]
        nodes += r["nodes"]
    done = sum(nodes.values())
    seconds = sum(r["seconds"] for r in runs)
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    return {
        "requests_per_s": round(done / seconds, 1),
        "errors": sum(r["errors"] for r in runs),
        **{
            f"{k}_ms": {"p50": ms(pct(v, 50)), "p90": ms(pct(v, 90)), "p99": ms(pct(v, 99)), "n": len(v)}
            for k, v in lat.items()
        },
        "share": {n: round(c / done, 3) for n, c in sorted(nodes.items())},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    urls, procs = start_backends()
    try:
        await wait_up(urls)
        route = RouteRecord(
            model=MODEL,
            epoch=1,
            updated_at=0.0,
            endpoints=[
                RouteEndpoint(node=n, instance="i0", address=u, gpu_class="A100", weight=220, state="READY")
                for n, u in urls.items()
            ],
        )
        results: dict[str, list[dict[str, Any]]] = {"round_robin": [], "least_loaded": []}
        for block in range(args.blocks):
            for balance in results:
                runner, base = await start_proxy(route, balance)
                try:
                    results[balance].append(await load(base, args.clients, args.seconds, seed=block))
                finally:
                    await runner.cleanup()
        return {
            "benchmark": "routing",
            "setup": {
                "nodes_tokens_per_s": NODES,
                "max_num_seqs": 8,
                "clients": args.clients,
                "mix": f"{1 - LONG_SHARE:.0%} x {SHORT} tokens, {LONG_SHARE:.0%} x {LONG} tokens",
                "seconds_per_policy": args.seconds * args.blocks,
            },
            **{balance: summary(runs) for balance, runs in results.items()},
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--blocks", type=int, default=2)
    args = ap.parse_args()
    configure_logging("console", "warning")
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
