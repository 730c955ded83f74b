#!/usr/bin/env python3
"""Failover: a node killed under load, a coordinator leader killed, route recomputation at scale.

A real fleet on loopback: one etcd, two gpu-coordinators and five gpu-agents with simulated GPUs,
each agent supervising one simulated vLLM server of model ``m``. Coordinators and agents run
with the production defaults (coordinator lease 15 s / renew deadline 10 s / retry 2 s, grace
10 s, health sampled every 5 s; agent lease 10 s, keep-alive every 10/3 s; probes every 5 s).

Agents: a100-1, a100-2, a100-3 serve ``m``; a100-4 is the entry node, its own instance stopped
through the admin API, so every request entering there is forwarded by route weight to the
other A100s (failover stays within the GPU class; h100-1 never sees them). Four A100 nodes, not
three: with three, one DOWN plus the stopped entry would be 2 of 3 unhealthy, over the panic
threshold (0.5), and the route would be in panic mode; with four it is 2 of 4, which is not.

1. **Node SIGKILL under load.** Paced load (``--rate`` requests/s from ``--workers`` workers,
   non-streaming chat, 2 tokens) through a100-4; then SIGKILL the a100-1 agent (its model server
   dies with it by PDEATHSIG). Measured, with the kill time as zero:
   - ``route_down_s``: until ``/gpufleet/<cluster>/routes/m`` shows a100-1 DOWN (polled every
     20 ms). Bounded by what is left of the agent's 10 s lease, plus etcd's expiry check
     (500 ms), plus the coordinator's watch and write.
   - ``last_attempt_at_victim_s``: the last time the entry agent tried a100-1, from its JSON
     logs: access-log lines (``"instance": "a100-1/m"``, the attempt that answered) and
     ``upstream attempt failed`` lines (attempts that failed and were retried elsewhere). Log
     timestamps (µs, same host clock) rather than client timing, because only the proxy knows
     where a request went and which attempts failed.
   - failed requests (non-200 at the client) and their share; retried requests; latency.
2. **Node SIGTERM under load** (graceful: the agent revokes its lease before it stops its
   instances): the same numbers. a100-1 is restarted first; ``readmission_s`` is how long the
   leader keeps a returning node out (DEGRADED until 3 good samples, 5 s apart).
3. **Leader takeover.** SIGKILL the leading coordinator: time until the standby's
   ``/v1/status`` says ``is_leader: true`` (polled every 20 ms); expected ≈ the lease left (up
   to 15 s) + etcd's expiry check. Then the new leader's first route write (after its 10 s grace
   period). Then SIGTERM (resign: the lease is revoked at once).
4. **Route recomputation** in-process for 1,000 and 10,000 synthetic nodes (8 GPUs, 4
   instances, 20 models): ``compute_routes`` alone (goal ≤ 20 ms / ≤ 200 ms), and a whole
   leader pass without I/O: decode every node record, ``step_node`` and ``step_instance`` for
   each, ``compute_routes``, ``routes_differ`` against the previous table.

    .venv/bin/python bench/failover.py [--quick] [--rate 100] [--workers 8] [--keep-logs]

Needs ``etcd`` on PATH. Only 127.0.0.1 is used. Prints one JSON document. Every process started
is stopped at the end (process groups; model-server PIDs are checked too), also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port, pct

from coordinator.policy.health import step_instance, step_node
from coordinator.policy.routes import compute_routes, routes_differ
from gpufleet import tomlwrite
from gpufleet.etcd import EtcdClient
from gpufleet.keyspace import Keyspace, decode, encode
from gpufleet.keyspace.records import GpuRecord, InstanceLoad, InstanceRecord, NodeRecord, RouteRecord
from gpufleet.logsetup import configure_logging
from gpufleet.routeslices import read_routes
from gpufleet_dev.localetcd import ETCD_BIN, EtcdMember
from gpufleet_dev.localfleet import Daemon, get_json, wait_for

CLUSTER = "bench"
KEYS = Keyspace(CLUSTER)
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TOKEN = "bench-admin-token-0123456789abcdef"
A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"
AGENTS = {"a100-1": A100, "a100-2": A100, "a100-3": A100, "a100-4": A100, "h100-1": H100}
ENTRY, VICTIM = "a100-4", "a100-1"
ARTICLE_001_MEAN_RECOVERY_S = 23.0


# --- processes ---------------------------------------------------------------------------------


class Proc(Daemon):
    """A daemon of the local-fleet harness in its own session, from a fixed argv. Signals go to the
    daemon alone: its model servers must die by the daemon's own lifelines, as in production;
    ``stop()`` then SIGKILLs whatever is left in the session."""

    stop_timeout = 40.0

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        super().__init__(log_path, new_session=True)
        self.name, self._argv = name, argv

    def argv(self) -> list[str]:
        return list(self._argv)

    def send(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    signal = send

    def alive(self) -> bool:
        return self.running()

    def stop(self, timeout: float | None = None) -> None:
        if self.proc is None:
            return
        super().stop(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # the session we created; empty unless something forked


@dataclass
class Agent:
    node: str
    dir: Path
    port: int
    proc: Proc

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def model_pids(self) -> set[int]:
        try:
            st = get_json(self.base + "/v1/status")
        except OSError:
            return set()
        return {i["pid"] for i in st["instances"] if i.get("pid")}


@dataclass
class Coordinator:
    ident: str
    port: int
    proc: Proc

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        return get_json(self.base + "/v1/status")


@dataclass
class Fleet:
    tmp: Path
    python: str
    etcd_url: str = ""
    etcd: EtcdMember | None = None
    agents: dict[str, Agent] = field(default_factory=dict)
    coords: dict[str, Coordinator] = field(default_factory=dict)
    model_pids: set[int] = field(default_factory=set)  # every simulated server seen; checked at the end

    # etcd -------------------------------------------------------------------------------------

    def start_etcd(self) -> None:
        """A member of the local-fleet harness (data and log under tmp/bench*)."""
        if ETCD_BIN is None:
            sys.exit("no etcd on PATH (run scripts/bootstrap)")
        self.etcd = EtcdMember("bench", self.tmp, new_session=True).start()
        self.etcd_url = self.etcd.client_url
        self.etcd.wait_healthy_sync(30)

    # agents -----------------------------------------------------------------------------------

    def agent_config(self, node: str, d: Path, port: int, model_port: int) -> str:
        token = d / "admin-token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        gpu = {"name": AGENTS[node], "memory_total_gib": 80, "temperature_c": 50, "utilization_percent": 20}
        instance = {
            "name": "m",
            "backend": "vllm",
            "launcher": ["{python}", "-m", "gpufleet_dev.simulated_server", "serve"],
            "model": "m",
            "port": model_port,
            "gpus": [0],
            "gpu_memory_fraction": 0.5,
            "args": ["--tokens-per-second", "0", "--disable-uvicorn-access-log"],
        }
        doc = {
            "agent": {
                "node_id": node,
                "listen_port": port,
                "advertise_url": f"http://127.0.0.1:{port}",
                "state_dir": d / "state",
                "log_dir": d / "logs",
                "admin_token_file": token,
                "log_format": "json",
                "log_level": "info",
            },
            "gpu": {"source": "simulated", "simulated": [gpu]},
            "instances": [instance],
            "cluster": {"endpoints": [self.etcd_url], "cluster": CLUSTER},
        }
        return tomlwrite.dumps(doc)

    def start_agent(self, node: str) -> Agent:
        """Start (or restart, same config and ports) one agent; wait with wait_agent_ready."""
        if node in self.agents:
            a = self.agents[node]
        else:
            d = self.tmp / node
            d.mkdir()
            port = free_port()
            (d / "agent.toml").write_text(self.agent_config(node, d, port, free_port()))
            argv = [self.python, "-m", "agent", "--config", str(d / "agent.toml")]
            a = Agent(node, d, port, Proc(node, argv, d / "agent.log"))
            self.agents[node] = a
        a.proc.start()
        return a

    def wait_agent_ready(self, a: Agent, timeout: float = 90) -> None:
        def ready() -> bool:
            st = get_json(a.base + "/v1/status")
            self.model_pids |= {i["pid"] for i in st["instances"] if i.get("pid")}
            return all(i["state"] == "READY" for i in st["instances"])

        wait_for(ready, timeout, f"{a.node} READY", [a.proc], interval=0.1)

    # coordinators -----------------------------------------------------------------------------

    def start_coordinator(self, ident: str) -> Coordinator:
        if ident in self.coords:
            c = self.coords[ident]
        else:
            port = free_port()
            cfg = self.tmp / f"{ident}.toml"
            coordinator = {
                "id": ident,
                "listen_port": port,
                "advertise_url": f"http://127.0.0.1:{port}",
                "log_format": "json",
                "log_level": "info",
            }
            cfg.write_text(
                tomlwrite.dumps(
                    {"coordinator": coordinator, "etcd": {"endpoints": [self.etcd_url], "cluster": CLUSTER}}
                )
            )
            argv = [self.python, "-m", "coordinator", "--config", str(cfg)]
            c = Coordinator(ident, port, Proc(ident, argv, self.tmp / f"{ident}.log"))
            self.coords[ident] = c
        c.proc.start()
        return c

    def wait_coordinator_ready(self, c: Coordinator, timeout: float = 60) -> None:
        def ready() -> bool:
            try:
                return get_json(c.base + "/readyz").get("status") == "ready"
            except OSError:
                return False  # 503 while syncing raises HTTPError (an OSError)

        wait_for(ready, timeout, f"coordinator {c.ident} ready", [c.proc])

    def start_all(self) -> None:
        """etcd, every agent (READY), then c1 and c2 (ready): the fleet the benchmarks run on."""
        self.start_etcd()
        for node in AGENTS:
            self.start_agent(node)
        for a in self.agents.values():
            self.wait_agent_ready(a)
        for ident in ("c1", "c2"):
            self.start_coordinator(ident)
        for c in self.coords.values():
            self.wait_coordinator_ready(c)

    def leader(self) -> Coordinator | None:
        for c in self.coords.values():
            if c.proc.alive():
                with contextlib.suppress(OSError):
                    if c.status()["is_leader"]:
                        return c
        return None

    # teardown ---------------------------------------------------------------------------------

    def stop_all(self) -> list[str]:
        """Stop everything; returns what had to be killed by PID at the end (should be empty)."""
        for c in self.coords.values():
            with contextlib.suppress(Exception):
                c.proc.stop(20)
        for a in self.agents.values():
            with contextlib.suppress(Exception):
                self.model_pids |= a.model_pids() if a.proc.alive() else set()
                a.proc.stop(40)
        if self.etcd is not None:
            self.etcd.stop(10)
        leftovers = []
        for pid in sorted(self.model_pids):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"simulated_server" in cmdline:
                leftovers.append(f"simulated server pid {pid}")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)  # model servers lead their own session
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return leftovers


# --- route table in etcd -----------------------------------------------------------------------


async def route(etcd: EtcdClient) -> RouteRecord | None:
    return (await read_routes(etcd, KEYS)).get("m")


def ep_state(r: RouteRecord | None, node: str) -> str | None:
    if r is None:
        return None
    return next((e.state for e in r.endpoints if e.node == node), None)


async def wait_route(etcd: EtcdClient, pred: Any, timeout: float, what: str) -> RouteRecord:
    deadline = time.monotonic() + timeout
    r = None
    while time.monotonic() < deadline:
        r = await route(etcd)
        if r is not None and pred(r):
            return r
        await asyncio.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout}s waiting for route: {what}; last: {r}")


def serving_ready(r: RouteRecord) -> bool:
    return all(ep_state(r, n) == "READY" for n in AGENTS if n != ENTRY)


# --- load --------------------------------------------------------------------------------------


@dataclass
class Sample:
    start: float  # wall clock
    end: float
    status: int  # 0: client-side error (connection, timeout)


async def load(base: str, rate: float, workers: int, stop: asyncio.Event, out: list[Sample]) -> None:
    """Open-loop-ish paced load: each worker sends at rate/workers per second and never bursts to
    catch up (a slow answer delays only its worker's next request)."""
    interval = workers / rate
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=workers)) as http:

        async def worker(i: int) -> None:
            nxt = time.monotonic() + i * interval / workers
            while not stop.is_set():
                delay = nxt - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        return
                t0 = time.time()
                try:
                    async with http.post(base + CHAT, json=BODY) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                out.append(Sample(t0, time.time(), status))
                nxt = max(nxt + interval, time.monotonic())

        await asyncio.gather(*(worker(i) for i in range(workers)))


def log_events(path: Path, offset: int) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    out = []
    for line in data.splitlines():
        if not line.startswith(b"{"):
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if "timestamp" in e:
            e["_t"] = datetime.fromisoformat(e["timestamp"]).timestamp()
            out.append(e)
    return out


def ms(v: float) -> float:
    return round(v * 1000, 1)


async def node_loss(
    fleet: Fleet, etcd: EtcdClient, how: str, rate: float, workers: int, pre: float, post: float
) -> dict:
    """Load through the entry agent; SIGKILL or SIGTERM the victim agent; measure."""
    entry, victim = fleet.agents[ENTRY], fleet.agents[VICTIM]
    victim_target = f"{VICTIM}/m"
    victim_model = victim.model_pids()
    offset = entry.proc.log_path.stat().st_size
    samples: list[Sample] = []
    stop = asyncio.Event()
    loader = asyncio.create_task(load(entry.base, rate, workers, stop, samples))
    sig = signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM
    try:
        await asyncio.sleep(pre)
        kill_at = time.time()
        victim.proc.signal(sig)
        exit_task = asyncio.create_task(asyncio.to_thread(_wait_exit, victim.proc, 60))
        down_at = None
        panic: set[str] = set()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            r = await route(etcd)
            if r is not None:
                panic.update(r.panic_classes)
            if ep_state(r, VICTIM) == "DOWN":
                down_at = time.time()
                break
            await asyncio.sleep(0.02)
        if down_at is None:
            raise RuntimeError(f"route never showed {VICTIM} DOWN")
        await asyncio.sleep(post)
    finally:
        stop.set()
        await loader
    exited, exited_at = await exit_task
    await asyncio.sleep(0.5)
    model_gone = all(not Path(f"/proc/{p}").exists() or b"simulated_server" not in _cmdline(p) for p in victim_model)

    events = log_events(entry.proc.log_path, offset)
    requests = [e for e in events if e.get("event") == "request" and e.get("path") == CHAT]
    failed_attempts = [e for e in events if e.get("event") == "upstream attempt failed"]
    at_victim = [e["_t"] for e in requests if e.get("instance") == victim_target]
    at_victim += [e["_t"] for e in failed_attempts if e.get("instance") == victim_target]
    served_by_victim = [e["_t"] for e in requests if e.get("instance") == victim_target and e.get("status") == 200]
    after = [e for e in requests if e["_t"] >= kill_at]
    targets_after: dict[str, int] = {}
    for e in after:
        targets_after[e.get("instance") or "none"] = targets_after.get(e.get("instance") or "none", 0) + 1

    before = [s for s in samples if s.end < kill_at]
    during = [s for s in samples if s.end >= kill_at and s.start <= down_at]
    later = [s for s in samples if s.start > down_at]
    failed = [s for s in samples if s.status != 200]
    lat = lambda ss: (  # noqa: E731
        {"n": len(ss), "p50_ms": ms(pct([s.end - s.start for s in ss], 50)),
         "p99_ms": ms(pct([s.end - s.start for s in ss], 99)), "max_ms": ms(max(s.end - s.start for s in ss))}
        if ss else {"n": 0}
    )  # fmt: skip
    span = max(s.end for s in samples) - min(s.start for s in samples)
    return {
        "signal": how,
        "route_down_s": round(down_at - kill_at, 3),
        "last_attempt_at_victim_s": round(max(at_victim) - kill_at, 3) if at_victim else None,
        "last_success_from_victim_s": round(max(served_by_victim) - kill_at, 3) if served_by_victim else None,
        "failed_attempts_at_victim_after_kill": sum(
            1 for e in failed_attempts if e.get("instance") == victim_target and e["_t"] >= kill_at
        ),
        "requests": len(samples),
        "achieved_rate_per_s": round(len(samples) / span, 1),
        "failed_requests": len(failed),
        "failed_share": round(len(failed) / len(samples), 5) if samples else None,
        "failed_statuses": sorted({s.status for s in failed}),
        "retried_requests_after_kill": sum(1 for e in after if e.get("retries")),
        "served_after_kill_by": dict(sorted(targets_after.items())),
        "latency_before_kill": lat(before),
        "latency_kill_to_route_down": lat(during),
        "latency_after_route_down": lat(later),
        "panic_classes_seen": sorted(panic),
        "victim_agent_exit_code": exited,
        "victim_agent_exited_s": round(exited_at - kill_at, 3),
        "victim_model_server_gone": model_gone,
    }


def _wait_exit(p: Proc, timeout: float) -> tuple[int, float]:
    assert p.proc is not None
    code = p.proc.wait(timeout)
    return code, time.time()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def readmission(fleet: Fleet, etcd: EtcdClient) -> dict:
    """Restart the victim; when does each part of the leader's view let it back in?

    The node is DEGRADED from the moment its key is back until ``good_samples`` (3) good samples,
    5 s apart. Its instance starts over with no ejection history: the leader forgets a DOWN
    node's instances, so a clean restart does not count as flapping."""
    t0 = time.monotonic()
    fleet.start_agent(VICTIM)
    fleet.wait_agent_ready(fleet.agents[VICTIM])
    marks: dict[str, float] = {"agent_restart_to_instance_ready_s": time.monotonic() - t0}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "agent_restart_to_route_ready_s" not in marks:
        r = await route(etcd)
        now = time.monotonic() - t0
        state = ep_state(r, VICTIM)
        if state not in (None, "DOWN"):
            marks.setdefault("agent_restart_to_route_not_down_s", now)
        if r is not None and serving_ready(r):
            marks["agent_restart_to_route_ready_s"] = now
        leader = fleet.leader()
        if leader is not None and "agent_restart_to_leader_node_ready_s" not in marks:
            with contextlib.suppress(OSError):
                nodes = {n["node"]: n for n in leader.status()["nodes"]}
                if nodes.get(VICTIM, {}).get("state") == "READY" and "agent_restart_to_route_not_down_s" in marks:
                    marks["agent_restart_to_leader_node_ready_s"] = time.monotonic() - t0
        await asyncio.sleep(0.05)
    if "agent_restart_to_route_ready_s" not in marks:
        raise RuntimeError(f"{VICTIM} not back in the route after 120 s")
    return {k: round(v, 2) for k, v in marks.items()}


# --- leader takeover ---------------------------------------------------------------------------


async def takeover(fleet: Fleet, etcd: EtcdClient, how: str) -> dict:
    old = fleet.leader()
    if old is None:
        raise RuntimeError("no leader")
    standby = next(c for c in fleet.coords.values() if c is not old)
    old_epoch = old.status()["epoch"]
    timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        t0 = time.monotonic()
        old.proc.signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
        took = None
        polls = 0
        while time.monotonic() - t0 < 60:
            polls += 1
            try:
                async with http.get(standby.base + "/v1/status") as r:
                    st = await r.json()
                if st["is_leader"]:
                    took = time.monotonic() - t0
                    break
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.02)
        if took is None:
            raise RuntimeError(f"standby {standby.ident} did not take over")
        new_epoch = st["epoch"]
        r = await wait_route(etcd, lambda r: r.epoch == new_epoch, 60, "route re-stamped by the new leader")
        restamped = time.monotonic() - t0
    await asyncio.to_thread(old.proc.proc.wait, 30)  # type: ignore[union-attr]
    return {
        "signal": how,
        "standby_is_leader_s": round(took, 3),
        "routes_restamped_by_new_leader_s": round(restamped, 3),
        "epoch": [old_epoch, new_epoch],
        "route_endpoints_ready_after": sum(e.state == "READY" for e in r.endpoints),
        "old_leader_exit_code": old.proc.proc.returncode,  # type: ignore[union-attr]
    }


# --- route computation -------------------------------------------------------------------------


def synthetic_nodes(n: int, rng: random.Random) -> dict[str, NodeRecord]:
    classes = [("NVIDIA A100-SXM4-80GB", "A100")] * 6 + [("NVIDIA H100 80GB HBM3", "H100")] * 3
    classes += [("NVIDIA L40S", "L40S")]
    now = time.time()
    out = {}
    for i in range(n):
        gname, gcls = classes[i % len(classes)]
        gpus = [
            GpuRecord(
                index=g, uuid=f"GPU-{i}-{g}", name=gname, gpu_class=gcls,
                memory_total_bytes=80 << 30, memory_used_bytes=60 << 30, memory_free_bytes=20 << 30,
                utilization_percent=round(rng.uniform(0, 100)), temperature_celsius=round(rng.uniform(40, 80)),
                power_watts=300.0,
            )
            for g in range(8)
        ]  # fmt: skip
        insts = [
            InstanceRecord(
                name=f"i{k}", model=f"model-{(i * 4 + k) % 20:02d}", backend="vllm",
                state="READY" if rng.random() > 0.01 else "RESTARTING", state_since=now - 3600,
                port=8000 + k, gpus=[2 * k, 2 * k + 1], gpu_memory_fraction=0.9, pid=1000 + k,
                health_ratio=1.0 if rng.random() > 0.05 else 0.85,
                load=InstanceLoad(requests_running=rng.randint(0, 8), requests_waiting=0, kv_cache_usage_ratio=0.4),
                requests_total=rng.randint(0, 10**6),
            )
            for k in range(4)
        ]  # fmt: skip
        name = f"node-{i:05d}"
        out[name] = NodeRecord(
            node=name, address=f"http://10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:8080", mode="cluster",
            agent_version="bench", started_at=now - 86400, updated_at=now, gpu_source="nvml",
            gpu_classes=[gcls], gpus=gpus, instances=insts, ready=True,
        )  # fmt: skip
    return out


def route_compute(n: int, runs: int) -> dict:
    rng = random.Random(n)
    nodes = synthetic_nodes(n, rng)
    raw = {name: encode(rec) for name, rec in nodes.items()}
    drained = {f"node-{i:05d}" for i in range(0, n, 97)}  # ~1 % drained
    node_health: dict = {}
    inst_health: dict = {}
    compute, judge, decoding, whole = [], [], [], []
    prev_plan = None
    now = time.time()
    for run in range(runs + 1):  # run 0 warms up (first-seen health, caches)
        now += 0.1  # records stay fresh (agents refresh every 30 s; stale after 90 s)
        t0 = time.perf_counter()
        records = {name: decode(v, NodeRecord) for name, v in raw.items()}
        t1 = time.perf_counter()
        for name, rec in records.items():
            node_health[name] = step_node(node_health.get(name), rec, now)
            for inst in rec.instances:
                k = (name, inst.name)
                inst_health[k] = step_instance(inst_health.get(k), inst.state, now)
        t2 = time.perf_counter()
        plan = compute_routes(records, node_health, inst_health, drained, 7, now)
        t3 = time.perf_counter()
        changed = sum(routes_differ(prev_plan.routes.get(m) if prev_plan else None, r) for m, r in plan.routes.items())
        t4 = time.perf_counter()
        prev_plan = plan
        if run:
            decoding.append(t1 - t0)
            judge.append(t2 - t1)
            compute.append(t3 - t2)
            whole.append(t4 - t0)
        assert run == 0 or changed == 0, changed
    stats = lambda v: {"median_ms": ms(statistics.median(v)), "p99_ms": ms(pct(v, 99))}  # noqa: E731
    return {
        "nodes": n,
        "endpoints": sum(len(r.endpoints) for r in prev_plan.routes.values()),  # type: ignore[union-attr]
        "models": len(prev_plan.routes),  # type: ignore[union-attr]
        "runs": runs,
        "compute_routes": stats(compute),
        "step_node_and_instances": stats(judge),
        "decode_node_records": stats(decoding),
        "whole_pass_without_io": stats(whole),
        "goal_compute_routes_ms": 20 if n <= 1000 else 200,
    }


# --- main --------------------------------------------------------------------------------------


async def fleet_scenarios(fleet: Fleet, args: argparse.Namespace, out: dict) -> None:
    pre, post = (3.0, 3.0) if args.quick else (5.0, 5.0)
    t_start = time.monotonic()
    fleet.start_all()
    async with EtcdClient([fleet.etcd_url], timeout=2.0) as etcd:
        entry = fleet.agents[ENTRY]
        async with (
            aiohttp.ClientSession() as http,
            http.post(entry.base + "/admin/instances/m/stop", headers={"Authorization": f"Bearer {TOKEN}"}) as r,
        ):
            if r.status != 202:
                raise RuntimeError(f"stopping the entry's instance: {r.status} {await r.text()}")
        # The first routes come after the leader's grace period (10 s).
        await wait_route(
            etcd, lambda r: serving_ready(r) and ep_state(r, ENTRY) != "READY", 60, "serving A100s READY, entry out"
        )
        out["fleet_start_s"] = round(time.monotonic() - t_start, 1)

        out["node_sigkill"] = await node_loss(fleet, etcd, "SIGKILL", args.rate, args.workers, pre, post)

        if not args.quick:
            out["node_readmission"] = await readmission(fleet, etcd)
            out["node_sigterm"] = await node_loss(fleet, etcd, "SIGTERM", args.rate, args.workers, pre, post)

        takeovers = {}
        if not args.quick:
            takeovers["sigkill"] = await takeover(fleet, etcd, "SIGKILL")
            killed = next(c for c in fleet.coords.values() if not c.proc.alive())
            fleet.start_coordinator(killed.ident)
            fleet.wait_coordinator_ready(killed)
        takeovers["sigterm"] = await takeover(fleet, etcd, "SIGTERM")
        out["leader_takeover"] = takeovers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the SIGTERM node and SIGKILL leader runs; fewer runs")
    ap.add_argument("--rate", type=float, default=100.0, help="requests/s through the entry agent (all workers)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20, help="route computation runs per size")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary directory with every log")
    args = ap.parse_args()
    configure_logging("console", "warning")  # our etcd client's own logs go to stderr, not into the JSON
    runs = min(args.runs, 5) if args.quick else args.runs
    t0 = time.monotonic()
    out: dict[str, Any] = {
        "benchmark": "failover",
        "cpus": os.cpu_count(),
        "settings": {
            "agents": {n: ("H100" if "H100" in g else "A100") for n, g in AGENTS.items()},
            "entry": f"{ENTRY} (own instance stopped; forwards by route weight)",
            "victim": VICTIM,
            "load": f"{args.rate:g} req/s from {args.workers} workers, non-streaming chat, max_tokens 2",
            "agent_lease_ttl_s": 10,
            "coordinator": "lease 15 s, renew deadline 10 s, retry 2 s, grace 10 s, sample every 5 s",
        },
    }
    # In-process first, while the machine is otherwise idle.
    out["route_compute"] = [route_compute(n, runs) for n in args.nodes]
    tmp = Path(tempfile.mkdtemp(prefix="gpufleet-failover-"))
    fleet = Fleet(tmp, sys.executable)
    try:
        asyncio.run(fleet_scenarios(fleet, args, out))
    finally:
        leftovers = fleet.stop_all()
        out["leftover_processes_killed_at_end"] = leftovers
        if args.keep_logs:
            out["logs"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out["reference"] = {
        "article_001_mean_recovery_s": ARTICLE_001_MEAN_RECOVERY_S,
        "note": "article 001's recovery is from a GPU failure to traffic flowing elsewhere; here requests "
        "never stop flowing (retry before the first byte), and the route marks the node DOWN within the "
        "agent's lease TTL (SIGKILL) or at once (SIGTERM)",
    }
    out["total_runtime_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
