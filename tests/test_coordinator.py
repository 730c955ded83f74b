"""gpu-coordinator end to end: real etcd, two coordinators, three agents (A100, A100, H100)
with simulated GPUs and model servers, traffic through the agents' proxies.

The fleet is shared by the tests of this module, in order; each test leaves it as it found
it (or, for the destructive ones at the end, as the next test expects). Short TTLs keep it
fast: agent lease 3 s, coordinator lease 3 s / renew deadline 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from etcd_fixtures import EtcdCluster
from helpers import (
    TOKEN,
    AgentProcess,
    CoordinatorProcess,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    instance_toml,
    start_agent_sync,
    wait_until,
)

from coordinator.election import Election, NotLeader
from coordinator.policy.weights import instance_weight
from gpufleet.etcd import EtcdClient, Op
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import NodeRecord, RouteRecord, RouteSlice
from gpufleet.routeslices import RouteAssembly, read_routes

CLUSTER = "fleet"
KEYS = Keyspace(CLUSTER)
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GPUS = {
    "a100-1": 'name = "NVIDIA A100-SXM4-80GB"',
    "a100-2": 'name = "NVIDIA A100-SXM4-80GB"',
    "h100-1": 'name = "NVIDIA H100 80GB HBM3"',
}
COORD_EXTRA = "[health]\neject_base_s = 0.5\neject_max_s = 2\n"


@dataclass
class Fleet:
    etcd: EtcdCluster
    tmp: Path
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    coords: dict[str, CoordinatorProcess] = field(default_factory=dict)

    def client(self) -> EtcdClient:
        return self.etcd.client()

    def leader(self) -> CoordinatorProcess | None:
        for c in self.coords.values():
            try:
                if c.proc and c.proc.poll() is None and c.status()["is_leader"]:
                    return c
            except OSError:
                continue
        return None


def start_agent(fleet: Fleet, node: str) -> AgentProcess:
    tmp = fleet.tmp / node
    tmp.mkdir(exist_ok=True)
    port = free_port()
    gpus = f"\n[[gpu.simulated]]\n{GPUS[node]}\nmemory_total_gib = 80\ntemperature_c = 50\nutilization_percent = 20\n"
    text = agent_toml(tmp, port, instance_toml("m", model="m", gpus="[0]", fraction=0.5), gpus=gpus)
    text = as_node(text, node, f"http://127.0.0.1:{port}")
    text += cluster_toml(fleet.etcd.endpoints, CLUSTER, telemetry_min_gap_s=0.2)
    text += """
[proxy.limits.m]
max_concurrency = 2
max_queue = 64
"""
    return start_agent_sync(tmp, text, port, ready_instances=1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(EtcdCluster(1).start(), tmp_path_factory.mktemp("fleet"))
    try:
        for node in GPUS:
            f.agents[node] = start_agent(f, node)
        for ident in ("c1", "c2"):
            f.coords[ident] = CoordinatorProcess(f.tmp, ident, f.etcd.endpoints, CLUSTER, COORD_EXTRA).start()
        for c in f.coords.values():
            c.wait_ready_sync()
        yield f
    finally:
        for c in f.coords.values():
            c.stop()
        for a in f.agents.values():
            a.proc.send_signal(signal.SIGCONT) if a.proc else None
            a.stop()
        f.etcd.destroy()


async def route(etcd: EtcdClient, model: str = "m") -> RouteRecord | None:
    return (await read_routes(etcd, KEYS)).get(model)


def ep(r: RouteRecord, node: str):  # type: ignore[no-untyped-def]
    return next(e for e in r.endpoints if e.node == node)


async def route_where(etcd: EtcdClient, pred, timeout: float = 20, what: str = "") -> RouteRecord:  # type: ignore[no-untyped-def]
    async def check() -> RouteRecord | None:
        r = await route(etcd)
        return r if r is not None and pred(r) else None

    return await wait_until(check, timeout=timeout, what=what or "route condition")


def all_ready(r: RouteRecord) -> bool:
    return len(r.endpoints) == 3 and all(e.state == "READY" for e in r.endpoints)


async def post_many(base: str, n: int, concurrency: int = 8) -> list[int]:
    async with aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with sem, http.post(base + CHAT, json=BODY) as r:
                await r.read()
                return r.status

        return await asyncio.gather(*(one() for _ in range(n)))


def routed_to(agent: AgentProcess, since: int) -> list[str]:
    out = []
    for line in agent.log_lines()[since:]:
        e = json.loads(line)
        if e.get("event") == "request" and e.get("path") == CHAT:
            out.append(e["instance"])
    return out


def routed_at_least(agent: AgentProcess, since: int, n: int) -> list[str] | None:
    got = routed_to(agent, since)
    return got if len(got) >= n else None


async def admin(agent: AgentProcess, path: str, body: object = None) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(agent.base + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as r,
    ):
        return r.status


async def test_one_leader_and_weights_follow_the_formula(fleet: Fleet) -> None:
    leader = await wait_until(fleet.leader, timeout=20, what="a leader")
    standby = next(c for c in fleet.coords.values() if c is not leader)
    st = standby.status()
    assert not st["is_leader"] and st["leader"] == leader.ident
    async with fleet.client() as etcd:
        r = await route_where(etcd, all_ready, what="all three endpoints READY")
        assert r.epoch == leader.status()["epoch"]
        for e in r.endpoints:
            kv = await etcd.get(KEYS.node(e.node))
            node = decode(kv.value, NodeRecord)  # type: ignore[union-attr]
            inst = next(i for i in node.instances if i.name == e.instance)
            assert e.weight == instance_weight(node, inst), e
        # The formula by hand: A100, 20 % load, 50 °C, all probes passing: 220 × 0.88 × 1 × 1.
        assert ep(r, "a100-1").weight == 193 and ep(r, "a100-1").gpu_class == "A100"
        assert ep(r, "h100-1").weight == int(380 * 0.88)


async def test_heating_an_a100_lowers_then_caps_its_weight(fleet: Fleet) -> None:
    agent = fleet.agents["a100-1"]
    async with fleet.client() as etcd:
        await route_where(etcd, all_ready)
        assert await admin(agent, "/admin/gpus/0", {"temperature_c": 80}) == 200
        r = await route_where(etcd, lambda r: ep(r, "a100-1").weight == int(220 * 0.88 * 0.5), what="80 °C weight")
        assert ep(r, "a100-2").weight == 193  # the other A100 is untouched
        assert await admin(agent, "/admin/gpus/0", {"temperature_c": 87}) == 200
        r = await route_where(etcd, lambda r: ep(r, "a100-1").weight <= int(0.3 * 220), what="85 °C cap")
        assert ep(r, "a100-1").state == "READY"
        assert await admin(agent, "/admin/gpus/0", {"temperature_c": 50}) == 200
        await route_where(etcd, lambda r: ep(r, "a100-1").weight == 193, what="cooled down")


def gpuctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuctl.main", *args], capture_output=True, text=True, timeout=60)


async def test_drain_and_undrain(fleet: Fleet) -> None:
    etcd_args = ["--etcd", ",".join(fleet.etcd.endpoints), "--cluster", CLUSTER]
    async with fleet.client() as etcd:
        res = gpuctl(*etcd_args, "drain", "a100-1", "--reason", "maintenance")
        assert res.returncode == 0, res.stderr
        r = await route_where(etcd, lambda r: ep(r, "a100-1").state == "DRAINED", what="drained")
        assert ep(r, "a100-1").weight == 0
        status = json.loads(gpuctl(*etcd_args, "-o", "json", "status").stdout)
        assert next(n for n in status["nodes"] if n["node"] == "a100-1")["state"] == "DRAINED"
        assert status["leader"]["epoch"] == r.epoch
        assert gpuctl(*etcd_args, "undrain", "a100-1").returncode == 0
        await route_where(etcd, all_ready, what="undrained")
        text = gpuctl(*etcd_args, "routes").stdout
        assert "a100-1" in text and "READY" in text
        row = next(ln for ln in text.splitlines() if "a100-1" in ln)
        assert row.split()[-1] == "@0000", text  # the slice that lists the endpoint


async def test_gpuctl_check_on_a_live_cluster(fleet: Fleet) -> None:
    async with fleet.client() as etcd:
        await route_where(etcd, all_ready)
    res = gpuctl("--etcd", ",".join(fleet.etcd.endpoints), "--cluster", CLUSTER, "-o", "json", "check")
    results = {r["name"]: r for r in json.loads(res.stdout)}
    # The test etcd speaks plain http: that one check fails, so the command exits 1.
    assert res.returncode == 1
    assert results["etcd spoken to over TLS"]["status"] == "FAIL"
    for name in (
        "etcd endpoints healthy, with a raft leader, no alarms",
        "a coordinator leads",
        "the leader's /readyz and /metrics answer",
        "every instance READY",
        "GPU memory at or below 85%",
        "every model has 2+ READY endpoints (failover possible)",
        "agents' /metrics answer",
        "agents' admin API protected by a token",
    ):
        assert results[name]["status"] == "PASS", results[name]
    assert results["gpu-agent.service watchdog active"]["status"] in ("SKIP", "PASS")


async def test_failover_goes_to_the_same_class_only(fleet: Fleet) -> None:
    """a100-2's own instance is down: requests entering there go to the other A100, never the H100."""
    entry = fleet.agents["a100-2"]
    async with fleet.client() as etcd:
        await route_where(etcd, all_ready)
        assert await admin(entry, "/admin/instances/m/stop") == 202
        await route_where(etcd, lambda r: ep(r, "a100-2").state != "READY", what="a100-2 out of the route")
        mark = len(entry.log_lines())
        assert await post_many(entry.base, 30) == [200] * 30
        # Access-log lines are written just after each response ends: wait for all 30.
        targets = await wait_until(lambda: routed_at_least(entry, mark, 30), what="30 access-log lines")
        assert len(targets) == 30 and all(t.startswith("a100-1/") for t in targets), set(targets)
        assert await admin(entry, "/admin/instances/m/start") == 202
        await route_where(etcd, all_ready, what="a100-2 back")


async def test_saturated_model_overflows_to_the_same_class(fleet: Fleet) -> None:
    """a100-2 serves at most 2 requests of m at once; the overflow goes to the other A100 rather
    than queueing, never to the H100, and nothing is refused."""
    entry = fleet.agents["a100-2"]
    async with fleet.client() as etcd:
        await route_where(etcd, all_ready)
    mark = len(entry.log_lines())
    assert await post_many(entry.base, 48, concurrency=12) == [200] * 48
    targets = await wait_until(lambda: routed_at_least(entry, mark, 48), what="48 access-log lines")
    assert "m" in targets and "a100-1/m" in targets, set(targets)
    assert not any(t.startswith("h100") for t in targets)


async def test_guarded_write_of_a_deposed_leader_is_rejected(fleet: Fleet) -> None:
    """In-process: two elections; the first loses its lease behind its back (as when frozen)."""
    keys = Keyspace("guard")
    async with fleet.client() as etcd:
        a = Election(etcd, keys, "a", "http://a", ttl=5, renew_deadline=4, retry_period=1)
        b = Election(etcd, keys, "b", "http://b", ttl=5, renew_deadline=4, retry_period=1)
        assert await a._campaign() and a.is_leader
        assert not await b._campaign()
        await a.guarded_txn([Op.put(keys.route("x"), b"from-a-1")])
        await etcd.lease_revoke(a.lease_id or 0)  # what expiry does while a is frozen
        assert await b._campaign()
        assert b.epoch is not None and a.epoch is not None and b.epoch > a.epoch
        assert a.is_leader  # a still believes it leads (its renew deadline has not passed)...
        with pytest.raises(NotLeader):
            await a.guarded_txn([Op.put(keys.route("x"), b"from-a-2")])  # ...but cannot write
        assert not a.is_leader and a.guard_rejections == 1
        kv = await etcd.get(keys.route("x"))
        assert kv is not None and kv.value == b"from-a-1"


async def test_leadership_counts_from_when_the_lease_was_asked_for_not_answered(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd starts a lease's TTL somewhere between the request and its answer: a campaign or a
    renewal that took long must not stretch the time a leader believes it leads past its lease.
    In-process, on a clock the test moves: each slow call takes 1.5 s of it."""
    keys = Keyspace("asked")
    now = [100.0]
    async with fleet.client() as etcd:
        e = Election(etcd, keys, "a", "http://a", ttl=5, renew_deadline=2, retry_period=0.05, clock=lambda: now[0])
        txn, keepalive = etcd.txn, etcd.lease_keepalive_once
        renewed, held = asyncio.Event(), asyncio.Event()

        async def slow_txn(*args: Any, **kwargs: Any) -> Any:
            now[0] += 1.5
            return await txn(*args, **kwargs)

        async def slow_keepalive(*args: Any, **kwargs: Any) -> int:
            if renewed.is_set():  # the second renewal never ends: the test reads the clock meanwhile
                held.set()
                await asyncio.Event().wait()
            now[0] += 1.5
            ttl = await keepalive(*args, **kwargs)
            renewed.set()
            return ttl

        monkeypatch.setattr(etcd, "txn", slow_txn)
        monkeypatch.setattr(etcd, "lease_keepalive_once", slow_keepalive)
        assert await e._campaign()  # the lease was asked for at 100, the key written at 101.5
        now[0] = 102.1
        assert not e.is_leader  # 2 s after the lease was asked for, not after the campaign ended
        now[0] = 101.9
        assert e.is_leader
        leading = asyncio.create_task(e._lead())
        try:
            await asyncio.wait_for(held.wait(), 10)  # renewed: asked at 101.9, answered at 103.4
            now[0] = 103.95
            assert not e.is_leader  # 2.05 s after the renewal was asked for
            now[0] = 103.85
            assert e.is_leader
        finally:
            leading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leading
            await e.resign()


async def test_leader_sigkill_standby_leads_within_ttl_plus_2s(fleet: Fleet) -> None:
    leader = await wait_until(fleet.leader, timeout=20, what="a leader")
    old_epoch = leader.status()["epoch"]
    assert leader.proc is not None
    leader.proc.kill()
    t0 = time.monotonic()
    new = await wait_until(fleet.leader, timeout=10, interval=0.05, what="standby takes over")
    took = time.monotonic() - t0
    assert new is not leader and took <= 3 + 2, took
    assert new.status()["epoch"] > old_epoch
    leader.proc.wait()
    leader.stop()
    fleet.coords[leader.ident] = CoordinatorProcess(fleet.tmp, leader.ident, fleet.etcd.endpoints, CLUSTER, COORD_EXTRA)
    fleet.coords[leader.ident].start().wait_ready_sync()
    async with fleet.client() as etcd:
        await route_where(etcd, lambda r: all_ready(r) and r.epoch == new.status()["epoch"], what="routes re-stamped")


async def test_frozen_leader_is_fenced_and_steps_down(fleet: Fleet) -> None:
    leader = await wait_until(fleet.leader, timeout=20, what="a leader")
    old_epoch = leader.status()["epoch"]
    async with fleet.client() as etcd:
        start_rev = (await etcd.get_prefix(KEYS.routes)).revision + 1
        assert leader.proc is not None
        leader.proc.send_signal(signal.SIGSTOP)
        try:
            new = await wait_until(
                lambda: next((c for c in fleet.coords.values() if c is not leader and c.status()["is_leader"]), None),
                timeout=10,
                what="standby takes over from the frozen leader",
            )
            # Make the new leader write: heat a GPU so a weight changes.
            assert await admin(fleet.agents["h100-1"], "/admin/gpus/0", {"temperature_c": 75}) == 200
            new_epoch = new.status()["epoch"]
            await route_where(etcd, lambda r: r.epoch == new_epoch and ep(r, "h100-1").weight < 334, what="new write")
        finally:
            leader.proc.send_signal(signal.SIGCONT)
        await wait_until(lambda: not leader.status()["is_leader"], timeout=10, what="old leader knows it is deposed")
        assert any("stepping down" in ln for ln in leader.log_lines())
        assert await admin(fleet.agents["h100-1"], "/admin/gpus/0", {"temperature_c": 50}) == 200
        await route_where(etcd, lambda r: ep(r, "h100-1").weight == int(380 * 0.88), what="cooled")
        # Epoch audit: every route write (header or slice) since the freeze, in revision order.
        # Once the new epoch has written, no write of the old epoch ever lands.
        epochs = []
        routes = RouteAssembly(KEYS)
        async with etcd.watch(KEYS.prefix, start_revision=start_rev) as w:
            async for resp in w:
                for ev in resp.events:
                    if ev.type == "PUT" and routes.model_of(ev.kv.key_str) is not None:
                        typ = RouteRecord if ev.kv.key_str.startswith(KEYS.routes) else RouteSlice
                        epochs.append(decode(ev.kv.value, typ).epoch)
                if resp.events and resp.events[-1].kv.mod_revision >= (await etcd.get_prefix(KEYS.routes)).revision:
                    break
        assert new_epoch in epochs
        first_new = epochs.index(new_epoch)
        assert all(e == new_epoch for e in epochs[first_new:]), epochs
        assert old_epoch < new_epoch


async def test_agents_keep_routing_with_etcd_stopped(fleet: Fleet) -> None:
    entry = fleet.agents["a100-2"]
    async with fleet.client() as etcd:
        await route_where(etcd, all_ready)
        assert await admin(entry, "/admin/instances/m/stop") == 202
        await route_where(etcd, lambda r: ep(r, "a100-2").state != "READY", what="a100-2 out")
    fleet.etcd.members[0].kill()
    try:
        mark = len(entry.log_lines())
        assert await post_many(entry.base, 10) == [200] * 10
        targets = await wait_until(lambda: routed_at_least(entry, mark, 10), what="10 access-log lines")
        assert all(t.startswith("a100-1/") for t in targets)
    finally:
        fleet.etcd.members[0].restart()
    assert await admin(entry, "/admin/instances/m/start") == 202
    async with fleet.client() as etcd:
        await route_where(etcd, all_ready, timeout=30, what="cluster recovered")


async def test_sigkill_of_an_a100_agent_during_traffic(fleet: Fleet) -> None:
    victim, other, h100 = fleet.agents["a100-1"], fleet.agents["a100-2"], fleet.agents["h100-1"]
    async with fleet.client() as etcd:
        await route_where(etcd, all_ready)
        statuses: list[int] = []

        async def traffic() -> None:
            for _ in range(8):
                statuses.extend(await post_many(other.base, 10) + await post_many(h100.base, 10))

        async def kill() -> None:
            await wait_until(lambda: len(statuses) >= 40, timeout=30, interval=0.01)
            assert victim.proc is not None
            victim.proc.kill()

        await asyncio.gather(traffic(), kill())
        assert statuses == [200] * len(statuses)
        t0 = time.monotonic()
        r = await route_where(etcd, lambda r: ep(r, "a100-1").state == "DOWN", timeout=15, what="a100-1 DOWN")
        assert time.monotonic() - t0 < 3 + 3
        assert ep(r, "a100-1").weight == 0 and ep(r, "a100-2").state == "READY" and ep(r, "h100-1").state == "READY"


_ = os
