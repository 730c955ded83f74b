#!/usr/bin/env python3
"""Scale: 1,000 agents and 1,000 route watchers on one etcd, old single-value routes vs slices;
and the leader's route pass at 10,000 nodes, in-process.

Process run (``--layout old|sliced|subset|all``; each layout on a fresh etcd):
- agents: ``--agents`` real ``ClusterPublisher`` (lease, keep-alive, publish policy) fed by the
  synthetic 8-GPU hosts of ``etcd_load.py`` (4 instances of one model each, telemetry
  random-walking every 5 s), sharing one etcd client so 1,000 fit in this process;
- two real coordinator processes with the production defaults;
- ``--watchers`` route watchers in processes of ``--per-process`` (bench/scale_watchers.py): the
  agents' real ``RouteTable``, each on its own etcd client, following the model as an agent that
  serves it does: every slice ("sliced"), or ``--subset`` of them as agents do by default
  ("subset", ``[cluster] route_subset_slices``).
The "old" layout runs the coordinators and the watchers from commit ``--old-commit`` (one value
per model holding every endpoint; every agent mirrors all of ``/routes/``), extracted with
``git archive``; the agents' node records did not change, so the publishers are today's code.

Measured over ``--seconds`` of steady state: etcd bytes sent to its clients per second and CPU
(its own /metrics and /proc), the leader's and the standby's CPU, each watcher's CPU and memory
(its process's, shared among its watchers), the route's size in etcd. Then ``--trials`` times:
one node's GPUs jump to 88 °C (over the 85 °C cap); from its record in etcd to the capped
weight (<= 0.3 x 220) at every watcher that follows the node's slice (every watcher, but with
subsets): the farthest watcher's time per trial (p50/p99/max over trials) and the median
watcher's. Lease expiries over the whole run (etcd's
``etcd_debugging_server_lease_expired_total``) and the agents' re-registrations must be 0. A
layout that cannot keep up fails within bounded time (``--sync-timeout``, 30 s per trial) and
says what happened.

In-process (``--inprocess 1000 10000``): synthetic nodes x 4 endpoints of one model; per pass
with one node changed: ``compute_routes`` and ``plan_write`` (slice diff) times, bytes the leader
writes per change (slices) vs the old single value, and the watch traffic that change fans out
to a fleet where every node serves the model. Prints JSON.

    .venv/bin/python bench/scale.py --agents 1000 --watchers 1000 --seconds 60 --trials 5
    .venv/bin/python bench/scale.py --inprocess 1000 10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import EtcdMember, cpu_seconds, free_port, pct
from etcd_load import PROBE_S, FakeNode

from agent.cluster.publisher import ClusterPublisher
from agent.cluster.subset import subset_window
from agent.config import ClusterSection
from coordinator.policy.health import step_instance, step_node
from coordinator.policy.routes import compute_routes
from coordinator.policy.slicing import WritePolicy, plan_write
from gpufleet import tomlwrite
from gpufleet.etcd import EtcdClient, EtcdError
from gpufleet.keyspace import Keyspace, decode, encode
from gpufleet.keyspace.records import NodeRecord, RouteRecord, RouteSlice
from gpufleet.logsetup import configure_logging
from gpufleet.policyconfig import WeightsSection
from gpufleet.routeslices import read_routes
from gpufleet_dev.localfleet import CoordinatorProcess

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = "scale"
MODEL = "qwen3-32b"
HOT_C = 88.0
CAPPED = 0.3 * 220  # the hot cap: a node's weight at most 30 % of the base weight
OLD_COMMIT = "210956f"  # the last commit with one route value per model
TRIAL_TIMEOUT_S = 30.0
METRICS = {
    "sent_bytes": "etcd_network_client_grpc_sent_bytes_total",
    "puts": "etcd_mvcc_put_total",
    "lease_expired": "etcd_debugging_server_lease_expired_total",
}


# --- etcd, processes ----------------------------------------------------------------------


def etcd_metrics(url: str) -> dict[str, float]:
    """The counters of METRICS from etcd's /metrics (0 for one this etcd does not expose)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    values = dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
    alias = {"etcd_mvcc_put_total": "etcd_debugging_mvcc_put_total"}
    out = {}
    for name, metric in METRICS.items():
        raw = values.get(metric, values.get(alias.get(metric, ""), "0"))
        out[name] = float(raw)
    return out


def start_etcd(base: Path) -> EtcdMember:
    """A fresh single-member etcd with watch progress notifications every 10 s, as ansible
    deploys it (the test harness's 1 s would add a message per second to each of the watchers'
    ~4,000 watch streams)."""
    member = EtcdMember("bench", base, extra_args=["--experimental-watch-progress-notify-interval", "10s"])
    member.start()
    member.wait_healthy_sync(30)
    return member


def leader_writes(port: int) -> dict[str, float]:
    """The coordinator's route writes (headers, slices, deletes; the old one: whole values) and,
    where it counts them, the bytes put."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    values = dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
    return {
        "writes": float(values.get("gpu_coordinator_route_writes_total", 0)),
        "bytes": float(values.get("gpu_coordinator_route_write_bytes_total", 0)),
    }


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def extract_tree(commit: str, dest: Path) -> Path:
    """The source tree of ``commit``, without touching the repository's worktrees."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def start_coordinator(tmp: Path, ident: str, url: str, code: Path | None) -> CoordinatorProcess:
    """A coordinator with the defaults of a deployment (warnings only); from the source tree
    ``code`` when given (``python -m`` imports from the working directory first)."""
    port = free_port()
    coordinator = {"id": ident, "listen_port": port, "log_format": "json", "log_level": "warning"}
    text = tomlwrite.dumps({"coordinator": coordinator, "etcd": {"endpoints": [url], "cluster": CLUSTER}})
    wrapper = ["env", "-C", str(code), f"PYTHONPATH={code}"] if code else None
    return CoordinatorProcess(tmp, ident, [url], CLUSTER, wrapper=wrapper, port=port, config_text=text).start()


def leader_of(procs: dict[str, CoordinatorProcess]) -> str | None:
    return next((ident for ident, p in procs.items() if p.is_leader()), None)


# --- the agents ---------------------------------------------------------------------------


class Agents:
    """``n`` publishers on one client, their hosts probed every 5 s; counts re-registrations."""

    def __init__(self, n: int, etcd: EtcdClient, url: str) -> None:
        cfg = ClusterSection(endpoints=[url], cluster=CLUSTER, timeout_s=2.0)
        rng = random.Random(7)
        self.nodes = [FakeNode(i, rng) for i in range(n)]
        self.registrations = 0
        agents = self

        class CountingPublisher(ClusterPublisher):
            async def _register(self) -> None:
                await super()._register()
                agents.registrations += 1

        self.pubs = [CountingPublisher(cfg, f"sim-{i:04d}", self.nodes[i].record, client=etcd) for i in range(n)]
        self._prober: asyncio.Task[None] | None = None

    def start(self) -> None:
        for p in self.pubs:
            p._task = asyncio.create_task(p._run())
        self._prober = asyncio.create_task(self._probe_forever())

    async def _probe_forever(self) -> None:
        while True:
            for i, node in enumerate(self.nodes):
                node.step()
                self.pubs[i].poke()
                await asyncio.sleep(PROBE_S / len(self.nodes))

    def set_temperature(self, i: int, celsius: float | None) -> None:
        self.nodes[i].forced_temperature = celsius
        self.nodes[i].step()
        self.pubs[i].poke()

    async def stop(self) -> int:
        """Cancel the publishers; how many had not ended 30 s later (a run goes on without them)."""
        tasks = [t for t in [self._prober, *(p._task for p in self.pubs)] if t is not None]
        for t in tasks:
            t.cancel()
        _, pending = await asyncio.wait(tasks, timeout=30)
        return len(pending)


# --- the watchers -------------------------------------------------------------------------


class WatcherProcess:
    """One bench/scale_watchers.py process and its event stream."""

    def __init__(self, proc: asyncio.subprocess.Process, count: int) -> None:
        self.proc, self.count = proc, count
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.started: dict = {}
        self.synced_at: float | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            event = json.loads(line)
            if event["event"] == "started":
                self.started = event
            elif event["event"] == "synced":
                self.synced_at = event["t"]
            else:
                await self.events.put(event)

    def send(self, **cmd: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    async def stop(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.send(cmd="stop")
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


class Watchers:
    """``total`` watchers in processes of ``per_process``, importing from ``code``."""

    def __init__(
        self, total: int, per_process: int, code: Path, pinned: bool, url: str, endpoints: int, subset: int
    ) -> None:
        self.sizes = [min(per_process, total - k) for k in range(0, total, per_process)]
        self.code, self.pinned, self.url, self.endpoints = code, pinned, url, endpoints
        self.subset = subset  # route_subset_slices of the sliced layout's watchers (0: every slice)
        self.procs: list[WatcherProcess] = []
        self._ids = 0

    async def start(self, log_dir: Path, timeout: float, url: str, groups: list[dict]) -> bool:
        """Start the processes one at a time, each once the previous one's watchers are synced
        (as agents join a fleet, not all in the same second); what each group took, and the
        lease expiries so far (into ``groups``). Stops early when a group does not sync within
        ``timeout`` (all of them together); whether every watcher synced."""
        for k, count in enumerate(self.sizes):
            argv = [sys.executable, str(ROOT / "bench" / "scale_watchers.py"), "--url", self.url]
            argv += ["--cluster", CLUSTER, "--model", MODEL, "--endpoints", str(self.endpoints)]
            argv += ["--count", str(count), "--name", f"w{k:02d}", "--code", str(self.code)]
            argv += ["--pinned", "--subset", str(self.subset)] if self.pinned else []
            with open(log_dir / f"watchers-{k:02d}.log", "ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, limit=1 << 24
                )
            self.procs.append(WatcherProcess(proc, count))
            t0 = time.monotonic()
            synced = await self.wait_synced(max(1.0, timeout - sum(g["sync_s"] for g in groups)))
            expired = (await metrics_async(url))["lease_expired"]
            groups.append({"watchers": sum(w.count for w in self.procs), "sync_s": round(time.monotonic() - t0, 1)})
            groups[-1]["lease_expiries_so_far"] = expired
            if not synced:
                return False
        return True

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.procs]

    def synced(self) -> int:
        return sum(w.count for w in self.procs if w.synced_at is not None)

    async def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        started = sum(w.count for w in self.procs)
        while self.synced() < started and time.monotonic() < deadline:  # noqa: ASYNC110 - a benchmark's poll
            await asyncio.sleep(0.2)
        return self.synced() == started

    async def seen(self, node: str, capped: bool, timeout: float) -> tuple[list[float], int]:
        """Ask every process to report when each of its watchers that follows ``node``'s slice
        (all of them, but with subsets) sees ``node`` capped (or not); returns the call's future
        result: (every such watcher's time, those that did not see it)."""
        self._ids += 1
        for w in self.procs:
            w.send(cmd="watch", id=self._ids, node=node, capped=capped, threshold=CAPPED, timeout=timeout)
        return await self._collect(self._ids, timeout + 10)

    async def _collect(self, ident: int, timeout: float) -> tuple[list[float], int]:
        async def one(w: WatcherProcess) -> tuple[list[float], int]:
            try:
                event = await asyncio.wait_for(w.events.get(), timeout)
            except TimeoutError:  # the process is stuck or gone
                return [], w.count
            assert event["id"] == ident, event
            return event["times"], event["missing"]

        answers = await asyncio.gather(*(one(w) for w in self.procs))
        return [t for times, _ in answers for t in times], sum(missing for _, missing in answers)

    def usage(self) -> tuple[float, int]:
        """(CPU seconds of every watcher process, the RSS they added since their imports, KB)."""
        cpu = sum(cpu_seconds(p) for p in self.pids())
        added = sum(rss_kb(w.proc.pid) - w.started.get("rss_kb", 0) for w in self.procs)
        return cpu, added

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.procs))


# --- one layout ---------------------------------------------------------------------------


async def wait_routed(etcd: EtcdClient, endpoints: int, timeout: float) -> bool:
    """Until the model's route in etcd lists every endpoint (either layout; read_routes reads both)."""
    keys = Keyspace(CLUSTER)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            route = (await read_routes(etcd, keys)).get(MODEL)
            if route is not None and len(route.endpoints) == endpoints:
                return True
        await asyncio.sleep(1)
    return False


async def route_bytes(etcd: EtcdClient) -> dict[str, int]:
    """The model's route as stored: the header (or the whole value) and its slices."""
    keys = Keyspace(CLUSTER)
    kv = await etcd.get(keys.route(MODEL))
    slices = (await etcd.get_prefix(keys.model_slices(MODEL))).kvs
    out = {"route_value_bytes": len(kv.value) if kv else 0, "slices": len(slices)}
    if slices:
        out["largest_slice_bytes"] = max(len(s.value) for s in slices)
    return out


async def published_hot(etcd: EtcdClient, key: str) -> None:
    """Until the node's record in etcd shows its GPUs at HOT_C (bounded)."""
    async with asyncio.timeout(TRIAL_TIMEOUT_S):
        while True:
            kv = await etcd.get(key)
            rec = decode(kv.value, NodeRecord) if kv else None
            if rec and all(g.temperature_celsius == HOT_C for g in rec.gpus):
                return
            await asyncio.sleep(0.005)


async def capped_written(etcd: EtcdClient, node: str, layout: str) -> float:
    """When (monotonic) the leader's write that caps ``node`` reached etcd, from a watch of the
    route's keys (a slice, or the old layout's single value): the farthest watcher's time is
    this leader part plus the fan-out after it."""
    keys = Keyspace(CLUSTER)
    prefix = keys.route(MODEL) if layout == "old" else keys.model_slices(MODEL)
    watch = etcd.watch(prefix, prefix=layout != "old", progress_notify=False)
    try:
        async for resp in watch:
            now = time.monotonic()
            for ev in resp.events:
                if ev.type != "PUT":
                    continue
                rec = decode(ev.kv.value, RouteRecord if layout == "old" else RouteSlice)
                weights = [e.weight for e in rec.endpoints if e.node == node]
                if weights and max(weights) <= CAPPED:
                    return now
    finally:
        watch.close()
    raise EtcdError("watch ended")


async def capped_in_etcd(etcd: EtcdClient, node: str) -> bool | None:
    """Whether the route in etcd has ``node`` capped (tells a slow leader from a slow fan-out)."""
    with contextlib.suppress(EtcdError, TimeoutError):
        route = (await read_routes(etcd, Keyspace(CLUSTER))).get(MODEL)
        weights = [e.weight for e in route.endpoints if e.node == node] if route else []
        return bool(weights) and max(weights) <= CAPPED
    return None


async def trial(etcd: EtcdClient, agents: Agents, watchers: Watchers, i: int) -> dict:
    """Heat node ``i``; the times its capped weight reached the watchers, from its record in
    etcd; then cool it again and wait (bounded) until the watchers see it restored."""
    name = f"sim-{i:04d}"
    key = Keyspace(CLUSTER).node(name)
    capped = asyncio.create_task(watchers.seen(name, True, TRIAL_TIMEOUT_S))
    written = asyncio.create_task(capped_written(etcd, name, "sliced" if watchers.pinned else "old"))
    await asyncio.sleep(0.2)  # the watch commands are read before the change
    t0 = time.monotonic()
    agents.set_temperature(i, HOT_C)
    try:
        await published_hot(etcd, key)
    except (TimeoutError, EtcdError) as e:  # a collapsing run: the agent cannot publish
        capped.cancel()
        written.cancel()
        return {"publish_s": None, "farthest_s": None, "missing": None, "seen": 0, "error": repr(e)}
    t1 = time.monotonic()
    times, missing = await capped
    leader_s = None
    with contextlib.suppress(TimeoutError, EtcdError):
        async with asyncio.timeout(1.0):
            leader_s = await written - t1
    written.cancel()
    in_etcd = await capped_in_etcd(etcd, name) if missing else None
    restored = asyncio.create_task(watchers.seen(name, False, 2 * TRIAL_TIMEOUT_S))
    await asyncio.sleep(0.2)
    agents.set_temperature(i, None)
    _, not_restored = await restored
    delays = [t - t1 for t in times]
    return {
        "publish_s": t1 - t0,
        "farthest_s": max(delays) if delays and not missing else None,
        "median_s": statistics.median(delays) if delays else None,
        "leader_s": leader_s,
        "missing": missing,
        "seen": len(times),
        "capped_in_etcd_at_timeout": in_etcd,
        "not_restored": not_restored,
    }


def summarize(trials: list[dict]) -> dict:
    ok = [t for t in trials if t["farthest_s"] is not None]
    farthest = [t["farthest_s"] for t in ok]
    out: dict = {"trials": len(trials), "completed": len(ok)}
    if farthest:
        out["etcd_to_farthest_watcher_s"] = {
            "p50": round(pct(farthest, 50), 3),
            "p99": round(pct(farthest, 99), 3),
            "max": round(max(farthest), 3),
        }
        out["etcd_to_median_watcher_s_p50"] = round(pct([t["median_s"] for t in ok], 50), 3)
        leader = [t["leader_s"] for t in ok if t["leader_s"] is not None]
        if leader:  # the leader's part of the farthest watcher's time: record in etcd -> capped write
            out["etcd_to_capped_write_s"] = {"p50": round(pct(leader, 50), 3), "max": round(max(leader), 3)}
        out["telemetry_change_to_etcd_s_max"] = round(max(t["publish_s"] for t in ok), 3)
        out["watchers_of_the_node_per_trial"] = sorted(t["seen"] for t in ok)  # all, unless subsets
    failed = [t for t in trials if t["farthest_s"] is None]
    if failed:
        keys = ("missing", "seen", "capped_in_etcd_at_timeout", "error")
        out["failed_trial"] = {k: failed[0][k] for k in keys if k in failed[0]}
        out["failed_trial"]["timeout_s"] = TRIAL_TIMEOUT_S
    return out


async def run_layout(args: argparse.Namespace, layout: str, n_watchers: int, code: Path, tmp: Path) -> dict:
    """One layout's process run on a fresh etcd; bounded in time whatever happens."""
    tmp.mkdir(parents=True)
    member = start_etcd(tmp / "etcd")
    url = member.client_url
    old = layout == "old"
    procs = {ident: start_coordinator(tmp, ident, url, code if old else None) for ident in ("c1", "c2")}
    endpoints = 4 * args.agents
    result: dict = {"layout": layout, "agents": args.agents, "endpoints": endpoints, "watchers": n_watchers}
    subset = args.subset if layout == "subset" else 0
    watchers = Watchers(n_watchers, args.per_process, code, not old, url, endpoints, subset)
    try:
        async with EtcdClient([url], timeout=10.0) as etcd:
            agents = Agents(args.agents, etcd, url)
            agents.start()
            bound = asyncio.timeout(args.layout_timeout)
            try:
                async with bound:
                    await measure(args, result, etcd, member.pid, procs, agents, watchers)
            except TimeoutError as e:
                if bound.expired():
                    result["error"] = f"stopped after {args.layout_timeout:.0f} s in phase {result['phase']!r}"
                else:  # a request of the benchmark's own (etcd's or the leader's /metrics) had no answer
                    result["error"] = f"phase {result['phase']!r}: {e!r}"
            except EtcdError as e:
                result["error"] = f"phase {result['phase']!r}: {e!r}"
            finally:
                result["agent_registrations_beyond_first"] = agents.registrations - args.agents
                result["lease_expiries"]["end"] = (await metrics_async(url))["lease_expired"]
                await watchers.stop()
                if stuck := await agents.stop():
                    result["publishers_not_ended_30s_after_cancel"] = stuck
    finally:
        for p in procs.values():
            p.stop()
        member.stop()
    return result


async def measure(
    args: argparse.Namespace,
    result: dict,
    etcd: EtcdClient,
    etcd_pid: int,
    procs: dict[str, CoordinatorProcess],
    agents: Agents,
    watchers: Watchers,
) -> None:
    """The phases of a layout's run, each noted in ``result`` as it starts (a run stopped by
    ``--layout-timeout`` says where)."""
    url, n_watchers = watchers.url, sum(watchers.sizes)
    expiries = result["lease_expiries"] = {}
    result["phase"] = "agents registering, route complete in etcd"
    if not await wait_routed(etcd, watchers.endpoints, 180):
        result["error"] = "the route never listed every endpoint"
        return
    expiries["before_watchers"] = (await metrics_async(url))["lease_expired"]
    result["phase"] = "watchers joining"
    result["watcher_groups"] = groups = []
    synced = await watchers.start(tmp_of(procs), args.sync_timeout, url, groups)
    result["watchers_code"] = watchers.procs[0].started.get("routes_module")
    result["watchers_synced"] = watchers.synced()
    await asyncio.sleep(10)  # past the sync burst
    expiries["after_sync"] = (await metrics_async(url))["lease_expired"]
    result["phase"] = "steady"
    result |= await steady(args, etcd, url, etcd_pid, procs, watchers)
    expiries["after_steady"] = (await metrics_async(url))["lease_expired"]
    if not synced:
        result["error"] = f"{watchers.synced()} of {n_watchers} watchers synced in {args.sync_timeout:.0f} s"
        return
    result["phase"] = "trials"
    result |= await trials(args, etcd, agents, watchers)
    result["phase"] = "done"


def tmp_of(procs: dict[str, CoordinatorProcess]) -> Path:
    return next(iter(procs.values())).tmp


async def metrics_async(url: str) -> dict[str, float]:
    """etcd_metrics off the event loop: the agents' keep-alives run on it."""
    return await asyncio.to_thread(etcd_metrics, url)


async def steady(
    args: argparse.Namespace,
    etcd: EtcdClient,
    url: str,
    etcd_pid: int,
    procs: dict[str, CoordinatorProcess],
    watchers: Watchers,
) -> dict:
    """Rates and CPU over ``--seconds`` with nothing but the fleet's own churn."""
    leader = await asyncio.to_thread(leader_of, procs)
    standby = next((i for i in procs if i != leader), "c2")
    pids = {i: p.pid for i, p in procs.items()} | {"etcd": etcd_pid, "agents_process": os.getpid()}
    port = procs[leader or "c1"].port
    m0, lw0, w0 = await metrics_async(url), await asyncio.to_thread(leader_writes, port), time.monotonic()
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    wcpu0, _ = watchers.usage()
    await asyncio.sleep(args.seconds)
    m1, lw1, w1 = await metrics_async(url), await asyncio.to_thread(leader_writes, port), time.monotonic()
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    wcpu1, rss_added = watchers.usage()
    window, n = w1 - w0, sum(watchers.sizes)
    cpu = {k: round(100 * (cpu1[k] - cpu0[k]) / window, 1) for k in pids}
    return {
        "window_s": round(window, 1),
        "leader": leader,
        "etcd_sent_MB_per_s": round((m1["sent_bytes"] - m0["sent_bytes"]) / window / 1e6, 3),
        "etcd_writes_per_s": round((m1["puts"] - m0["puts"]) / window, 1),
        "leader_route_writes_per_s": round((lw1["writes"] - lw0["writes"]) / window, 2),
        "leader_route_KB_per_s": round((lw1["bytes"] - lw0["bytes"]) / window / 1e3, 1),
        "cpu_percent": {
            "etcd": cpu["etcd"],
            "leader": cpu.get(leader or "c1"),
            "standby": cpu[standby],
            "agents_process": cpu["agents_process"],
            "all_watchers": round(100 * (wcpu1 - wcpu0) / window, 1),
            "per_watcher": round(100 * (wcpu1 - wcpu0) / window / n, 3),
        },
        "rss_per_watcher_kb": round(rss_added / n),
        **await route_bytes(etcd),
    }


async def trials(args: argparse.Namespace, etcd: EtcdClient, agents: Agents, watchers: Watchers) -> dict:
    # Lightly loaded nodes: their normal weight is well above the cap, so "capped" and
    # "restored" are both unambiguous.
    coolest = sorted(range(len(agents.nodes)), key=lambda k: sum(agents.nodes[k].load))[: args.trials]
    done = []
    for i in coolest:
        done.append(await trial(etcd, agents, watchers, i))
        if done[-1]["farthest_s"] is None:
            break  # this layout does not keep up; the next trial would only wait as long
    return summarize(done)


# --- 10,000 nodes in-process --------------------------------------------------------------


def heated(rec: NodeRecord) -> NodeRecord:
    gpus = [msgspec.structs.replace(g, temperature_celsius=HOT_C) for g in rec.gpus]
    return msgspec.structs.replace(rec, gpus=gpus)


def inprocess(n: int, runs: int, rate: float, subset: int) -> dict:
    """The leader's route pass and slice diff at ``n`` nodes x 4 endpoints, one node heated per
    pass; bytes written per change and the watch traffic it fans out (every node serves the
    model: with every agent following every slice, and with each following its subset of
    ``subset`` slices, counted from the agents' actual windows)."""
    rng = random.Random(n)
    records = {r.node: r for r in (FakeNode(i, rng).record() for i in range(n))}
    node_health: dict = {}
    inst_health: dict = {}
    w = WeightsSection()
    policy = WritePolicy(w.min_weight_change, w.urgent_weight_change)
    header: RouteRecord | None = None
    slices: dict[int, RouteSlice] = {}
    compute, diff, written, slices_written, whole_value, fanned = [], [], [], [], [], []
    followers: dict[int, int] = {}
    now = time.time()
    order = sorted(records)
    for run in range(runs + 1):  # run 0 lays the route out and warms the health state up
        if run:
            name = order[(run * 7919) % n]
            records[name] = heated(records[name])
        now += 0.1
        for name, rec in records.items():
            node_health[name] = step_node(node_health.get(name), rec, now)
            for inst in rec.instances:
                inst_health[(name, inst.name)] = step_instance(inst_health.get((name, inst.name)), inst.state, now)
        t0 = time.perf_counter()
        rec = compute_routes(records, node_health, inst_health, set(), 7, now).routes[MODEL]
        t1 = time.perf_counter()
        write, header, slices = plan_write(rec, header, slices, policy)
        values = [encode(s) for s in write.slices] + ([encode(write.header)] if write.header else [])
        t2 = time.perf_counter()
        if not run:  # every agent's window of the layout (a pass changes no slice list here)
            for node in order:
                window = subset_window(node, MODEL, header.slices, subset) or header.slices
                for s in window:
                    followers[s] = followers.get(s, 0) + 1
        if run:
            fanned.append(sum(len(encode(s)) * followers.get(s.slice, n) for s in write.slices))
            compute.append(t1 - t0)
            diff.append(t2 - t1)
            written.append(sum(len(v) for v in values))
            slices_written.append(len(write.slices))
            whole_value.append(len(encode(rec)))
    ms = lambda v: {"median_ms": round(1e3 * statistics.median(v), 2), "p99_ms": round(1e3 * pct(v, 99), 2)}  # noqa: E731
    sliced, old = statistics.median(written), statistics.median(whole_value)
    subset_fan_out = statistics.median(fanned)
    return {
        "nodes": n,
        "endpoints": len(rec.endpoints),
        "slices": len(slices),
        "passes": runs,
        "compute_routes": ms(compute),
        "plan_write_and_encode": ms(diff),
        "slices_written_per_change_max": max(slices_written),
        "bytes_written_per_change": {"sliced": round(sliced), "old_single_value": round(old)},
        "subset_followers_per_slice": {"min": min(followers.values()), "max": max(followers.values())},
        "fan_out_per_change_MB": {
            "subset": round(subset_fan_out / 1e6, 2),
            "sliced": round(sliced * n / 1e6, 1),
            "old": round(old * n / 1e6, 1),
        },
        f"watch_traffic_at_{rate:g}_changes_per_s_MB_per_s": {
            "subset": round(subset_fan_out * rate / 1e6, 2),
            "sliced": round(sliced * n * rate / 1e6, 1),
            "old": round(old * n * rate / 1e6, 1),
        },
    }


# --- main ---------------------------------------------------------------------------------


async def process_runs(args: argparse.Namespace, tmp: Path) -> list[dict]:
    layouts = ["old", "sliced", "subset"] if args.layout == "all" else [args.layout]
    old_code = extract_tree(args.old_commit, tmp / "old-tree") if "old" in layouts else ROOT
    results = []
    for layout in layouts:
        for n in args.old_watchers if layout == "old" and args.old_watchers else args.watchers:
            code = old_code if layout == "old" else ROOT
            result = await run_layout(args, layout, n, code, tmp / f"{layout}-{n}")
            print(json.dumps(result), file=sys.stderr, flush=True)  # as it comes: a long run
            results.append(result)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--layout",
        choices=["old", "sliced", "subset", "all"],
        default="all",
        help="sliced: every watcher follows every slice; subset: --subset slices each, as agents do by default",
    )
    ap.add_argument("--subset", type=int, default=4, help="the subset layout's route_subset_slices")
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--watchers", type=int, nargs="+", default=[1000], help="a run per count and layout")
    ap.add_argument("--per-process", type=int, default=100, help="watchers per watcher process")
    ap.add_argument("--old-watchers", type=int, nargs="*", default=[], help="the old layout's counts instead")
    ap.add_argument("--old-commit", default=OLD_COMMIT)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--sync-timeout", type=float, default=120, help="for all watchers to join")
    ap.add_argument("--layout-timeout", type=float, default=480, help="a layout run's bound, teardown aside")
    ap.add_argument("--inprocess", type=int, nargs="*", help="node counts for the in-process run instead")
    ap.add_argument("--passes", type=int, default=50, help="in-process passes per node count")
    ap.add_argument("--change-rate", type=float, default=1.0, help="route changes per second, for the arithmetic")
    args = ap.parse_args()
    configure_logging("console", "error")
    if args.inprocess:
        results = [inprocess(n, args.passes, args.change_rate, args.subset) for n in args.inprocess]
        print(json.dumps({"benchmark": "scale-inprocess", "results": results}, indent=2))
        return
    with tempfile.TemporaryDirectory() as d:
        results = asyncio.run(process_runs(args, Path(d)))
    goals = "0 lease expiries, etcd CPU <= 60 %, farthest watcher p99 <= 1 s, leader CPU <= 50 %"
    print(json.dumps({"benchmark": "scale", "goals": goals, "results": results}, indent=2))


if __name__ == "__main__":
    main()
