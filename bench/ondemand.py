#!/usr/bin/env python3
"""On-demand models and autoscaling: what a cold start, the cold-start queue, an idle unload and
a scale-up under a burst cost the users, with real processes.

One local etcd, one gpu-coordinator, five gpu-agents with simulated GPUs running the simulated
vLLM server (gpufleet_dev.simulated_server) as the replicas the leader places:

    l40s-1   1 x L40S   entry and replica node of the local cold start (a) and the idle unload
    a100-1..3  2 x A100 replica nodes of the cross-node cold start (b), the queue and the burst
    h100-1   1 x H100   entry of (b), the queue and the burst: it runs none of those models

Agents and coordinator run with their production defaults (probe every 5 s, publish gap 1 s,
telemetry gap 15 s, leader sampling every 5 s, placement every 2 s, 15 s election lease);
only the models' own windows are shortened where a scenario needs them (each says which).
Every model directory's server loads for ``--startup-delay`` seconds (vLLM's weight load).

1. Cold start of an on-demand model (min_replicas 0, idle_unload_after 600 s) with no replica,
   a streaming chat completion of 16 tokens at 200 tokens/s: time to first token and to the
   full answer, (a) through the node that gets the replica, (b) through a node that has no
   fitting GPU class (held there, forwarded once the replica on an A100 node is READY). Each
   repetition is a fresh model (registered, measured, removed). The milestones come from an
   etcd watch this script keeps on the whole cluster (its own clock) and the leader's log:
   demand in the entry's node record, the leader's decision, the assignment, STARTING, READY
   in the node record, a READY endpoint in the route, first token, full answer. Then the same
   request three times warm. ``--long-delay``: (a) again with a longer load.
2. The cold-start queue: ``--queue`` concurrent first requests (all held, all answered), and
   cold_start_queue (64, the default) + 16 concurrent ones: what the 16 get.
3. Idle unload: idle_unload_after 10 s (default 600 s); from the end of the last request to the
   leader's decision, the assignment removed, the instance gone from the node record.
4. Autoscaling: ``--workers`` closed-loop clients for ``--burst`` s through h100-1 against a
   model whose server runs 2 requests at once at 20 tokens/s (a 10-token answer takes 0.5 s),
   replicas 1, max_replicas 3, scale_up_after 5 s, scale_cooldown 5 s, scale_down_after 10 s
   (defaults 30, 120, 300 s); against the same burst on 3 fixed replicas. Time to the 2nd and
   3rd replica READY, latency p50/p99, and the time back to 1 replica after the burst.

    .venv/bin/python bench/ondemand.py [--reps 5] [--startup-delay 1.5] [--long-delay 10]
    .venv/bin/python bench/ondemand.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from _common import free_port, pct, start_etcd

from gpufleet import tomlwrite
from gpufleet.etcd import EtcdClient
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import AssignmentRecord, NodeRecord, PlacementRecord, RouteSlice
from gpufleet.logsetup import configure_logging
from gpufleet_dev.localfleet import SIM_LAUNCHER_ARGV, AgentProcess, CoordinatorProcess, free_port_block, stop_all

CLUSTER = "bench-ondemand"
KEYS = Keyspace(CLUSTER)
GPUS = {  # node -> (GPU name, count)
    "l40s-1": ("NVIDIA L40S", 1),
    "a100-1": ("NVIDIA A100-SXM4-80GB", 2),
    "a100-2": ("NVIDIA A100-SXM4-80GB", 2),
    "a100-3": ("NVIDIA A100-SXM4-80GB", 2),
    "h100-1": ("NVIDIA H100 80GB HBM3", 1),
}
ENTRY = "h100-1"
LOCAL = "l40s-1"
COLD_START_QUEUE = 64  # [proxy] cold_start_queue's default


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000)


def p50_max(values: list[float]) -> dict[str, Any]:
    return {"p50": ms(pct(values, 50)), "max": ms(max(values)), "n": len(values)} if values else {"n": 0}


# --- the fleet -------------------------------------------------------------------------------


class Timeline:
    """Every change in the cluster's keys, stamped on this process's monotonic clock when the
    watch delivered it (what an observer in etcd's place would see)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, bytes | None]] = []
        self.changed = asyncio.Event()

    async def run(self, etcd: EtcdClient) -> None:
        async with etcd.watch(KEYS.prefix, idle_timeout=60) as w:
            async for resp in w:
                now = time.monotonic()
                for e in resp.events:
                    self.events.append((now, e.kv.key.decode(), e.kv.value if e.type == "PUT" else None))
                self.changed.set()
                self.changed = asyncio.Event()

    def first(self, pred: Callable[[str, bytes | None], bool], after: float) -> float | None:
        return next((t for t, k, v in self.events if t >= after and pred(k, v)), None)

    async def wait(self, pred: Callable[[str, bytes | None], bool], after: float, timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        while (t := self.first(pred, after)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: not within {timeout:g} s")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass
        return t


def node_rec(k: str, v: bytes | None) -> NodeRecord | None:
    return decode(v, NodeRecord) if v and k.startswith(KEYS.nodes) else None


def demand_in(node: str, model: str) -> Callable[[str, bytes | None], bool]:
    def pred(k: str, v: bytes | None) -> bool:
        rec = node_rec(k, v) if k == KEYS.node(node) else None
        return rec is not None and model in (rec.model_demand or {})

    return pred


def assigned(model: str, want: bool = True) -> Callable[[str, bytes | None], bool]:
    def pred(k: str, v: bytes | None) -> bool:
        if not k.startswith(KEYS.assignments):
            return False
        has = v is not None and any(a.model == model for a in decode(v, AssignmentRecord).instances)
        return has == want

    return pred


def state_of(model: str, state: str) -> Callable[[str, bytes | None], bool]:
    def pred(k: str, v: bytes | None) -> bool:
        rec = node_rec(k, v)
        return rec is not None and any(i.model == model and i.state == state for i in rec.instances)

    return pred


def route_ready(model: str) -> Callable[[str, bytes | None], bool]:
    prefix = KEYS.model_slices(model)

    def pred(k: str, v: bytes | None) -> bool:
        if not k.startswith(prefix) or v is None:
            return False
        return any(e.state == "READY" and e.weight > 0 for e in decode(v, RouteSlice).endpoints)

    return pred


class Fleet:
    def __init__(self, tmp: Path, startup_delay: float) -> None:
        self.tmp = tmp
        self.shared = tmp / "shared"
        self.startup_delay = startup_delay
        self.agents: dict[str, AgentProcess] = {}
        self.coord: CoordinatorProcess | None = None
        self.etcd_member, self.etcd_url = start_etcd(str(tmp / "etcd"))
        self.tl = Timeline()
        # wall time = monotonic + offset: the leader's log lines carry wall times
        self.offset = time.time() - time.monotonic()

    def start(self) -> None:
        for node, (gpu, count) in GPUS.items():
            port = free_port()
            d = self.tmp / node
            d.mkdir()
            self.agents[node] = AgentProcess(d, self.agent_config(node, d, port, gpu, count), port, name=node)
            self.agents[node].start()
        doc = {
            "coordinator": {"id": "c1", "listen_port": (port := free_port()), "advertise_url": f"http://127.0.0.1:{port}",
                            "log_format": "json", "log_level": "info"},
            "etcd": {"endpoints": [self.etcd_url], "cluster": CLUSTER},
        }  # fmt: skip
        self.coord = CoordinatorProcess(self.tmp, "c1", [], CLUSTER, port=port, config_text=tomlwrite.dumps(doc))
        self.coord.start()
        for a in self.agents.values():
            a.wait_ready_sync(0, 60)
        self.coord.wait_ready_sync(60)

    def agent_config(self, node: str, d: Path, port: int, gpu: str, count: int) -> str:
        doc = {
            "agent": {"node_id": node, "advertise_url": f"http://127.0.0.1:{port}", "listen_port": port,
                      "state_dir": str(d / "state"), "log_dir": str(d / "logs"), "log_format": "json",
                      "log_level": "info"},
            "gpu": {"source": "simulated",
                    "simulated": [{"name": gpu, "memory_total_gib": 80, "temperature_c": 50}] * count},
            "supervisor": {"port_base": free_port_block()},
            "cluster": {"endpoints": [self.etcd_url], "cluster": CLUSTER},
            "models": {"launchers": {"vllm": SIM_LAUNCHER_ARGV}, "allowed_roots": [str(self.shared)]},
            "proxy": {"access_log": False},
        }  # fmt: skip
        return tomlwrite.dumps(doc)

    def stop(self) -> None:
        stop_all([d for d in [self.coord, *self.agents.values()] if d is not None])
        self.etcd_member.stop()

    def gpuctl(self, *args: str) -> str:
        argv = [sys.executable, "-m", "gpuctl.main", "--etcd", self.etcd_url, "--cluster", CLUSTER, *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(f"gpuctl {' '.join(args)}: {r.stderr or r.stdout}")
        return r.stdout

    def add(self, name: str, classes: str, *args: str, delay: float | None = None) -> None:
        (self.shared / name).mkdir(parents=True, exist_ok=True)
        (self.shared / name / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        d = self.startup_delay if delay is None else delay
        self.gpuctl("models", "add", name, "--path", str(self.shared / name), "--classes", classes,
                    "--min-vram-gib", "10", f"--arg=--startup-delay={d:g}", *args)  # fmt: skip

    def leader_event(self, event: str, model: str, after: float, **match: Any) -> float | None:
        """When (monotonic) the leader logged ``event`` for ``model`` after ``after``."""
        assert self.coord is not None
        return self.logged([self.coord], event, model, after, **match)

    def agent_event(self, event: str, model: str, after: float, **match: Any) -> float | None:
        """When (monotonic) an agent logged ``event`` for ``model`` after ``after``."""
        return self.logged(list(self.agents.values()), event, model, after, **match)

    def logged(self, daemons: list[Any], event: str, model: str, after: float, **match: Any) -> float | None:
        times = [t for d in daemons if (t := self._logged(d, event, model, after, match)) is not None]
        return min(times, default=None)

    def _logged(self, daemon: Any, event: str, model: str, after: float, match: dict[str, Any]) -> float | None:
        for line in daemon.log_lines():
            if not line.startswith("{"):
                continue
            x = json.loads(line)
            if x.get("event") != event or x.get("model") != model or any(x.get(k) != v for k, v in match.items()):
                continue
            t = datetime.fromisoformat(x["timestamp"].replace("Z", "+00:00")).timestamp() - self.offset
            if t >= after:
                return t
        return None


async def quiet(fleet: Fleet, node: str, seconds: float) -> None:
    """Until ``node``'s record has not been written for ``seconds``."""
    while True:
        last = max((t for t, k, _ in fleet.tl.events if k == KEYS.node(node)), default=0.0)
        left = last + seconds - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(left)


async def placement_status(etcd: EtcdClient, model: str) -> Any:
    kv = await etcd.get(KEYS.placement)
    rec = decode(kv.value, PlacementRecord) if kv else None
    return next((m for m in rec.models if m.model == model), None) if rec else None


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := await check()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)
    return got


async def nodes_with(etcd: EtcdClient, model: str, state: str | None = "READY") -> list[str]:
    out = []
    for kv in (await etcd.get_prefix(KEYS.nodes)).kvs:
        rec = decode(kv.value, NodeRecord)
        if any(i.model == model and (state is None or i.state == state) for i in rec.instances):
            out.append(rec.node)
    return sorted(out)


async def remove(fleet: Fleet, etcd: EtcdClient, model: str) -> None:
    """Unregister ``model`` and wait until no node runs it (its GPU is free for the next one)."""
    fleet.gpuctl("models", "rm", model)

    async def gone() -> bool:
        return not await nodes_with(etcd, model, None)

    await wait_for(gone, 60, f"{model} stopped everywhere")


# --- requests --------------------------------------------------------------------------------


def chat(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


async def streamed(http: aiohttp.ClientSession, base: str, model: str) -> tuple[int, float, float, float]:
    """(status, sent at, first token at, full answer at) of one streaming request."""
    t0 = time.monotonic()
    first = None
    async with http.post(base + "/v1/chat/completions", json=chat(model, 16, True)) as r:
        if r.status != 200:
            await r.read()
            return r.status, t0, time.monotonic(), time.monotonic()
        async for line in r.content:
            if first is None and line.startswith(b"data:"):
                first = time.monotonic()
            if line.strip() == b"data: [DONE]":
                break
    end = time.monotonic()
    return 200, t0, first or end, end


async def cold_start(fleet: Fleet, etcd: EtcdClient, http: aiohttp.ClientSession, name: str, classes: str,
                     entry: str, delay: float | None = None) -> dict[str, Any]:  # fmt: skip
    """One cold start of a fresh model ``name`` through ``entry``, its milestones, three warm
    requests after it; the model is removed at the end (its GPU free for the next)."""
    fleet.add(name, classes, "--min-replicas", "0", "--idle-unload-after", "600", delay=delay)

    async def idle() -> bool:
        st = await placement_status(etcd, name)
        return st is not None and st.desired == 0

    await wait_for(idle, 30, f"{name} registered and idle")
    # A model's first request comes long after its registration, which made every agent write
    # its record (the model path checked): wait until the entry's last write is older than the
    # agent's publish_min_gap_s (1 s), as it usually is, so the demand is written at once.
    await quiet(fleet, entry, 1.5)
    base = fleet.agents[entry].base
    status, t0, first, end = await streamed(http, base, name)
    assert status == 200, f"cold start of {name}: {status}"
    tl = fleet.tl
    await tl.wait(route_ready(name), t0, 10, f"{name}'s route READY")  # may trail the answer (local)
    marks = {
        "demand_published": tl.first(demand_in(entry, name), t0),
        "leader_decided": fleet.leader_event("on-demand model scaled", name, t0, replicas=1),
        "assignment_written": tl.first(assigned(name), t0),
        "server_started": fleet.agent_event("instance started", name, t0),
        "ready_on_node": fleet.agent_event("state change", name, t0, state="READY"),
        "ready_published": tl.first(state_of(name, "READY"), t0),
        "route_ready": tl.first(route_ready(name), t0),
        "first_token": first,
        "full_answer": end,
    }
    warm = [await streamed(http, base, name) for _ in range(3)]
    assert all(w[0] == 200 for w in warm)
    await remove(fleet, etcd, name)
    return {
        "ms_after_request": {k: ms(v - t0) if v is not None else None for k, v in marks.items()},
        "warm_ttft_ms": [ms(w[2] - w[1]) for w in warm],
        "warm_total_ms": [ms(w[3] - w[1]) for w in warm],
    }


def summarize_cold(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = runs[0]["ms_after_request"].keys()
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r["ms_after_request"][k] for r in runs if r["ms_after_request"][k] is not None]
        out[k] = {"p50": pct(vals, 50), "max": max(vals), "n": len(vals)} if vals else {"n": 0}
    warm_ttft = [v for r in runs for v in r["warm_ttft_ms"]]
    warm_total = [v for r in runs for v in r["warm_total_ms"]]
    out["warm_first_token"] = {"p50": pct(warm_ttft, 50), "max": max(warm_ttft), "n": len(warm_ttft)}
    out["warm_full_answer"] = {"p50": pct(warm_total, 50), "max": max(warm_total), "n": len(warm_total)}
    return out


async def plain(http: aiohttp.ClientSession, base: str, model: str, max_tokens: int = 16) -> tuple[int, float, str]:
    """(status, latency, Retry-After) of one non-streaming request; 200 only with a full answer."""
    t0 = time.monotonic()
    try:
        async with http.post(base + "/v1/chat/completions", json=chat(model, max_tokens, False)) as r:
            body = await r.read()
            status = r.status
            if status == 200 and not json.loads(body)["choices"][0]["message"]["content"]:
                status = -1  # an empty answer counts as lost
            return status, time.monotonic() - t0, r.headers.get("Retry-After", "")
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
        return -2, time.monotonic() - t0, ""  # cut off / no answer


async def cold_queue(fleet: Fleet, etcd: EtcdClient, http: aiohttp.ClientSession, name: str, n: int) -> dict[str, Any]:
    fleet.add(name, "A100", "--min-replicas", "0", "--idle-unload-after", "600")

    async def idle() -> bool:
        st = await placement_status(etcd, name)
        return st is not None and st.desired == 0

    await wait_for(idle, 30, f"{name} registered and idle")
    got = await asyncio.gather(*(plain(http, fleet.agents[ENTRY].base, name) for _ in range(n)))
    await remove(fleet, etcd, name)
    statuses: dict[str, int] = {}
    for s, _, _ in got:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    ok = [lat for s, lat, _ in got if s == 200]
    refused = [(lat, ra) for s, lat, ra in got if s in (429, 503)]
    return {
        "requests": n,
        "statuses": statuses,
        "answered_s": {"min": round(min(ok), 2), "max": round(max(ok), 2)} if ok else None,
        "refused_with_retry_after": sum(1 for _, ra in refused if ra),
        "refused_answered_in_ms_max": ms(max(lat for lat, _ in refused)) if refused else None,
    }


async def idle_unload(fleet: Fleet, etcd: EtcdClient, http: aiohttp.ClientSession, idle_s: float) -> dict[str, Any]:
    name = "idle"
    fleet.add(name, "L40S", "--min-replicas", "0", "--idle-unload-after", f"{idle_s:g}")
    base = fleet.agents[LOCAL].base
    status, t0, _, _ = await streamed(http, base, name)
    assert status == 200
    status, _, _, last = await streamed(http, base, name)  # the last request, warm
    assert status == 200
    tl = fleet.tl
    gone = await tl.wait(assigned(name, want=False), last, idle_s + 60, "idle replica unassigned")

    def no_instance(k: str, v: bytes | None) -> bool:
        rec = node_rec(k, v) if k == KEYS.node(LOCAL) else None
        return rec is not None and not any(i.model == name for i in rec.instances)

    stopped = await tl.wait(no_instance, gone, 60, "idle replica gone from the node record")
    decided = fleet.leader_event("on-demand model scaled", name, last, replicas=0)
    # the last change of the demand entry the leader saw: the idle time counts from there
    last_change, shown = None, None
    for t, k, v in tl.events:
        rec = node_rec(k, v) if k == KEYS.node(LOCAL) and t < gone else None
        entry = (rec.model_demand or {}).get(name) if rec is not None else shown
        if entry is not None and entry != shown:
            last_change = t
        shown = entry
    await remove(fleet, etcd, name)
    return {
        "idle_unload_after_s": idle_s,
        "first_request_to_last_end_s": round(last - t0, 2),
        "after_last_request_s": {
            "last_demand_entry_change": round(last_change - last, 2) if last_change else None,
            "leader_decided": round(decided - last, 2) if decided else None,
            "assignment_removed": round(gone - last, 2),
            "instance_gone_from_node_record": round(stopped - last, 2),
        },
    }


# --- autoscaling -------------------------------------------------------------------------------

AUTOSCALE_ARGS = ("--arg=--max-num-seqs=2", "--arg=--tokens-per-second=20")


async def burst(base: str, model: str, workers: int, seconds: float) -> list[tuple[float, float, int]]:
    """(sent at, latency, status) of every request of ``workers`` closed-loop clients."""
    out: list[tuple[float, float, int]] = []
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def worker() -> None:
            while time.monotonic() < end:
                t0 = time.monotonic()
                status, lat, _ = await plain(http, base, model, 10)
                out.append((t0, lat, status))

        await asyncio.gather(*(worker() for _ in range(workers)))
    return out


def lat_summary(rows: list[tuple[float, float, int]]) -> dict[str, Any]:
    ok = [lat for _, lat, s in rows if s == 200]
    errors: dict[str, int] = {}
    for _, _, s in rows:
        if s != 200:
            errors[str(s)] = errors.get(str(s), 0) + 1
    if not ok:
        return {"n": 0, "errors": errors}
    return {"n": len(ok), "p50_ms": ms(pct(ok, 50)), "p99_ms": ms(pct(ok, 99)), "errors": errors}


def ready_count(model: str, n: int) -> Callable[[str, bytes | None], bool]:
    """Holds once ``n`` nodes' records (the latest of each up to the event) show ``model`` READY."""
    latest: dict[str, bool] = {}

    def pred(k: str, v: bytes | None) -> bool:
        if not k.startswith(KEYS.nodes):
            return False
        rec = node_rec(k, v)
        latest[k] = rec is not None and any(i.model == model and i.state == "READY" for i in rec.instances)
        return sum(latest.values()) == n

    return pred


def count_at(fleet: Fleet, model: str, n: int, after: float) -> float | None:
    """The first time after ``after`` with exactly ``n`` READY replicas (the watch replayed from its start)."""
    pred = ready_count(model, n)
    return next((t for t, k, v in fleet.tl.events if pred(k, v) and t >= after), None)


async def autoscale(fleet: Fleet, etcd: EtcdClient, workers: int, seconds: float) -> dict[str, Any]:
    base = fleet.agents[ENTRY].base
    fleet.add("fixed3", "A100", "--replicas", "3", *AUTOSCALE_ARGS)
    await wait_for(lambda: _len(nodes_with(etcd, "fixed3"), 3), 60, "fixed3 on 3 READY replicas")
    fixed = await burst(base, "fixed3", workers, seconds)
    await remove(fleet, etcd, "fixed3")

    windows = ("--scale-up-waiting", "2", "--scale-up-after", "5", "--scale-down-waiting", "0.5",
               "--scale-down-after", "10", "--scale-cooldown", "5")  # fmt: skip
    fleet.add("auto", "A100", "--replicas", "1", "--max-replicas", "3", *windows, *AUTOSCALE_ARGS)
    await wait_for(lambda: _len(nodes_with(etcd, "auto"), 1), 60, "auto on 1 READY replica")
    t0 = time.monotonic()
    scaled = await burst(base, "auto", workers, seconds)
    t_end = time.monotonic()
    second = count_at(fleet, "auto", 2, t0)
    third = count_at(fleet, "auto", 3, t0)
    back = await fleet.tl.wait(ready_count_after(fleet, "auto", 1, t_end), t_end, 120, "auto back to 1 replica")
    decisions = []
    assert fleet.coord is not None
    for line in fleet.coord.log_lines():
        if '"model autoscaled"' in line:
            x = json.loads(line)
            if x.get("model") == "auto":
                wall = datetime.fromisoformat(x["timestamp"].replace("Z", "+00:00")).timestamp()
                at = wall - fleet.offset - t0
                decisions.append({"s_after_burst_began": round(at, 1), "replicas": x.get("replicas"),
                                  "reason": x.get("reason")})  # fmt: skip
    failed = [r for r in scaled if r[2] != 200]
    await remove(fleet, etcd, "auto")
    before2 = [r for r in scaled if second is None or r[0] < second]
    return {
        "burst": {"workers": workers, "seconds": seconds, "server": "2 at once, 20 tokens/s, 10 tokens (0.5 s)"},
        "fixed_3_replicas": lat_summary(fixed),
        "autoscaled_1_to_3": {
            **lat_summary(scaled),
            "before_2nd_replica_ready": lat_summary(before2),
            "2nd_replica_ready_s": round(second - t0, 1) if second else None,
            "3rd_replica_ready_s": round(third - t0, 1) if third else None,
            "back_to_1_replica_after_burst_s": round(back - t_end, 1) if second else None,
            "failed_requests": len(failed),
            "decisions": decisions,
        },
    }


def ready_count_after(fleet: Fleet, model: str, n: int, after: float) -> Callable[[str, bytes | None], bool]:
    """``ready_count`` fed with the events before ``after`` first, so its per-node view is whole."""
    pred = ready_count(model, n)
    for t, k, v in fleet.tl.events:
        if t < after:
            pred(k, v)
    return pred


async def _len(listing: Any, n: int) -> bool:
    return len(await listing) == n


# --- main ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    async with EtcdClient([fleet.etcd_url], timeout=5.0) as etcd:
        watcher = asyncio.create_task(fleet.tl.run(etcd))
        await asyncio.sleep(0.5)
        await wait_for(lambda: _len(etcd_nodes(etcd), len(GPUS)), 60, "every agent registered")
        out: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
            local = [await cold_start(fleet, etcd, http, f"cs-a-{i}", "L40S", LOCAL) for i in range(args.reps)]
            out["cold_start_local"] = summarize_cold(local)
            remote = [await cold_start(fleet, etcd, http, f"cs-b-{i}", "A100", ENTRY) for i in range(args.reps)]
            out["cold_start_forwarded"] = summarize_cold(remote)
            if args.long_delay:
                slow = [
                    await cold_start(fleet, etcd, http, f"cs-l-{i}", "L40S", LOCAL, args.long_delay)
                    for i in range(max(1, args.reps // 2))
                ]
                out["cold_start_local_long_load"] = {"startup_delay_s": args.long_delay, **summarize_cold(slow)}
            out["cold_start_queue"] = await cold_queue(fleet, etcd, http, "q-small", args.queue)
            out["cold_start_queue_full"] = await cold_queue(fleet, etcd, http, "q-full", COLD_START_QUEUE + 16)
            out["idle_unload"] = await idle_unload(fleet, etcd, http, args.idle)
        out["autoscaling"] = await autoscale(fleet, etcd, args.workers, args.burst)
        watcher.cancel()
        return out


async def etcd_nodes(etcd: EtcdClient) -> list[Any]:
    return list((await etcd.get_prefix(KEYS.nodes)).kvs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="cold starts per case")
    ap.add_argument("--startup-delay", type=float, default=1.5, help="the simulated server's model load, s")
    ap.add_argument("--long-delay", type=float, default=10.0, help="a second local cold start with this load (0: none)")
    ap.add_argument("--queue", type=int, default=20, help="concurrent first requests (all held)")
    ap.add_argument("--idle", type=float, default=10.0, help="idle_unload_after_s of the idle-unload case")
    ap.add_argument("--workers", type=int, default=12, help="closed-loop clients of the burst")
    ap.add_argument("--burst", type=float, default=40.0, help="seconds of the burst")
    ap.add_argument("--quick", action="store_true", help="a short smoke: 1 repetition, no long load, 15 s burst")
    ap.add_argument("--keep", action="store_true", help="keep the fleet's directory (logs) and print its path")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.long_delay, args.queue, args.idle, args.burst = 1, 0.0, 5, 5.0, 15.0
    configure_logging("console", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ondemand-"))
    fleet = Fleet(tmp, args.startup_delay)
    try:
        fleet.start()
        t0 = time.monotonic()
        results = asyncio.run(run(args, fleet))
        doc = {
            "benchmark": "ondemand",
            "setup": {
                "nodes": {n: f"{c} x {g}" for n, (g, c) in GPUS.items()},
                "startup_delay_s": args.startup_delay,
                "request": "streaming chat, 16 tokens at 200 tokens/s",
                "defaults": "agents and coordinator at production defaults",
                "load_average": os.getloadavg(),
                "seconds": round(time.monotonic() - t0),
            },
            **results,
        }
        print(json.dumps(doc, indent=2))
    except BaseException:
        for d in [fleet.coord, *fleet.agents.values()]:
            if d is not None:
                print(f"--- {d.name} log tail ---\n{d.log_tail(2000)}", file=sys.stderr)
        raise
    finally:
        fleet.stop()
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
