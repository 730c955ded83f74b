"""Cluster membership against real etcd: agents registered under leases, as operators see it.

Lease TTLs are short here (4 s) to keep the suite fast; the rules are the production ones
(keep-alive every TTL/3 is replaced by an explicit 1 s so that keepalive + 2 × timeout ≤ TTL).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from etcd_fixtures import USER, USER_PASSWORD, EtcdCluster
from helpers import AgentProcess, agent_toml, as_node, cluster_toml, free_port, instance_toml, wait_until

from agent.cluster.assignments import CheckState, ModelFollower, Wanted
from agent.cluster.identity import agent_identity, other_holder
from agent.cluster.publish_policy import Change, PublishPolicy, change_reason, held_for, publish_reason
from agent.config import ModelsSection
from gpufleet.etcd import EtcdClient, EtcdLeaseNotFound, Event, KeyValue
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import AssignedInstance, GpuRecord, InstanceRecord, NodeRecord
from gpufleet.registry import PathCheck

TTL = 4


def node_agent(tmp: Path, endpoints: list[str], cluster: str, node: str = "test-node", extra: str = "") -> AgentProcess:
    port = free_port()
    cluster_part = cluster_toml(endpoints, cluster, lease_ttl_s=TTL, telemetry_min_gap_s=0.5, extra=extra)
    return AgentProcess(tmp, as_node(agent_toml(tmp, port, instance_toml("a")), node) + cluster_part, port)


class KeyEvents:
    """Every PUT/DELETE of one key, recorded by a background watch."""

    def __init__(self, etcd: EtcdClient, key: str) -> None:
        self.events: list[Event] = []
        self._watch = etcd.watch(key, prefix=False)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KeyEvents:
        await self._watch.open()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for resp in self._watch:
            self.events.extend(resp.events)

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await self._watch.aclose()

    def deletes(self) -> int:
        return sum(e.type == "DELETE" for e in self.events)


@pytest.fixture
async def etcd_client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with etcd.client() as c:
        yield c


async def registered(etcd: EtcdClient, key: str) -> NodeRecord | None:
    kv = await etcd.get(key)
    return decode(kv.value, NodeRecord) if kv is not None else None


async def test_register_publish_and_deregister_on_sigterm(
    tmp_path: Path, etcd: EtcdCluster, etcd_client: EtcdClient
) -> None:
    key = Keyspace("reg").node("n1")
    async with node_agent(tmp_path, etcd.endpoints, "reg", "n1") as agent:
        rec = await wait_until(lambda: registered(etcd_client, key), what="node registered")
        assert rec.mode == "cluster" and rec.node == "n1" and rec.gpu_classes == ["A100"]
        assert rec.address == "http://n1:" + str(agent.port)
        # The instance becoming READY is a meaningful change: it is published.
        await agent.wait_state("a", "READY")
        rec = await wait_until(
            lambda: _with(registered(etcd_client, key), lambda r: r.ready and r.instances[0].state == "READY"),
            what="READY published",
        )
        inst = rec.instances[0]
        assert inst.port and inst.model == "a-model" and inst.health_ratio == 1.0
        kv = await etcd_client.get(key)
        assert kv is not None and kv.lease != 0
        lease = kv.lease
        t0 = time.monotonic()
    # SIGTERM revoked the lease: the key is gone at once, not after a TTL.
    assert await etcd_client.get(key) is None
    assert time.monotonic() - t0 < TTL
    assert await lease_gone(etcd_client, lease)


async def lease_gone(etcd: EtcdClient, lease: int) -> bool:
    try:
        return (await etcd.lease_time_to_live(lease)).ttl <= 0
    except EtcdLeaseNotFound:
        return True


async def _with(coro, pred):  # type: ignore[no-untyped-def]
    rec = await coro
    return rec if rec is not None and pred(rec) else None


async def test_sigkill_key_expires_within_ttl(tmp_path: Path, etcd: EtcdCluster, etcd_client: EtcdClient) -> None:
    key = Keyspace("kill").node("n1")
    async with node_agent(tmp_path, etcd.endpoints, "kill", "n1") as agent:
        await wait_until(lambda: registered(etcd_client, key), what="registered")
        assert agent.proc is not None
        agent.proc.kill()
        t0 = time.monotonic()
        await wait_until(lambda: _absent(etcd_client, key), timeout=TTL + 3, what="key expired")
        # TTL + etcd's expiry slack (it checks leases every 500 ms).
        assert time.monotonic() - t0 <= TTL + 1.5


async def _absent(etcd: EtcdClient, key: str) -> bool:
    return await etcd.get(key) is None


async def test_sigstop_shorter_than_ttl_does_not_flap(
    tmp_path: Path, etcd: EtcdCluster, etcd_client: EtcdClient
) -> None:
    key = Keyspace("stop").node("n1")
    async with node_agent(tmp_path, etcd.endpoints, "stop", "n1") as agent:
        await wait_until(lambda: registered(etcd_client, key), what="registered")
        assert agent.proc is not None
        async with KeyEvents(etcd_client, key) as seen:
            agent.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(1.5)  # the fault itself: frozen for less than TTL − keepalive interval
            agent.proc.send_signal(signal.SIGCONT)
            lease = (await etcd_client.get(key)).lease  # type: ignore[union-attr]
            # Wait until a keep-alive after the freeze has refreshed the lease to its full TTL.
            await wait_until(lambda: _ttl_above(etcd_client, lease, TTL - 1.5), timeout=5, what="lease refreshed")
            assert seen.deletes() == 0


async def _ttl_above(etcd: EtcdClient, lease: int, floor: float) -> bool:
    return (await etcd.lease_time_to_live(lease)).ttl >= floor


async def test_sigstop_longer_than_ttl_reregisters(tmp_path: Path, etcd: EtcdCluster, etcd_client: EtcdClient) -> None:
    key = Keyspace("stop2").node("n1")
    async with node_agent(tmp_path, etcd.endpoints, "stop2", "n1") as agent:
        await wait_until(lambda: registered(etcd_client, key), what="registered")
        first = (await etcd_client.get(key)).lease  # type: ignore[union-attr]
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            await wait_until(lambda: _absent(etcd_client, key), timeout=TTL + 3, what="lease expired while frozen")
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        kv = await wait_until(lambda: etcd_client.get(key), timeout=10, what="re-registered")
        assert kv.lease != first
        assert any("etcd membership re-registering" in ln for ln in agent.log_lines())


async def test_same_node_id_restart_takes_over_the_old_lease(
    tmp_path: Path, etcd: EtcdCluster, etcd_client: EtcdClient
) -> None:
    key = Keyspace("takeover").node("n1")
    agent = node_agent(tmp_path, etcd.endpoints, "takeover", "n1")
    async with agent:
        await wait_until(lambda: registered(etcd_client, key), what="registered")
        old = (await etcd_client.get(key)).lease  # type: ignore[union-attr]
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait()
    # The same agent restarted (its state directory, so its identity): it takes over at once.
    async with node_agent(tmp_path, etcd.endpoints, "takeover", "n1") as again:
        kv = await wait_until(lambda: _with(etcd_client.get(key), lambda kv: kv.lease != old), what="new lease")
        # The previous lease is revoked right after the takeover (not left to expire).
        await wait_until(lambda: lease_gone(etcd_client, old), timeout=5, what="old lease revoked")
        async with KeyEvents(etcd_client, key) as seen:
            await wait_until(lambda: _ttl_above(etcd_client, kv.lease, TTL - 1.5), timeout=5)
            assert seen.deletes() == 0
        await wait_until(lambda: any("took over the registration" in ln for ln in again.log_lines()))


async def test_idle_agent_does_not_write_per_probe(tmp_path: Path, etcd: EtcdCluster, etcd_client: EtcdClient) -> None:
    key = Keyspace("quiet").node("n1")
    async with node_agent(tmp_path, etcd.endpoints, "quiet", "n1") as agent:
        await agent.wait_state("a", "READY")
        await wait_until(lambda: _with(registered(etcd_client, key), lambda r: r.ready), what="ready published")
        async with KeyEvents(etcd_client, key) as seen:
            # 3 s = 6 probe intervals and 3 keep-alives; nothing meaningful changes.
            await asyncio.sleep(3)
            assert seen.events == []
            # A simulated GPU heating by 10 °C is meaningful: one write.
            status, _ = await agent.admin("/admin/gpus/0", body={"temperature_c": 60})
            assert status == 200
            await wait_until(lambda: len(seen.events) == 1, timeout=5, what="temperature published")
        rec = await registered(etcd_client, key)
        assert rec is not None and rec.gpus[0].temperature_celsius == 60


async def test_etcd_restart_agent_reregisters(tmp_path: Path) -> None:
    etcd = EtcdCluster(1).start()
    try:
        key = Keyspace("restart").node("n1")
        async with etcd.client() as c, node_agent(tmp_path, etcd.endpoints, "restart", "n1") as agent:
            await wait_until(lambda: registered(c, key), what="registered")
            etcd.members[0].kill()
            await wait_until(
                lambda: any("keepalive failing" in ln or "membership unreachable" in ln for ln in agent.log_lines()),
                timeout=10,
                what="agent noticed",
            )
            # The agent keeps serving locally meanwhile.
            assert (await agent.status())["instances"][0]["name"] == "a"
            etcd.members[0].restart()
            await wait_until(lambda: registered(c, key), timeout=TTL + 15, what="registered after restart")
            await wait_until(
                lambda: any("etcd membership registered" in ln for ln in agent.log_lines()[-50:]), timeout=15
            )
    finally:
        etcd.destroy()


async def test_three_member_cluster_survives_losing_the_agents_member(tmp_path: Path) -> None:
    etcd = EtcdCluster(3).start()
    try:
        key = Keyspace("ha").node("n1")
        async with etcd.client() as c, node_agent(tmp_path, etcd.endpoints, "ha", "n1") as agent:
            await wait_until(lambda: registered(c, key), what="registered")
            lease = (await c.get(key)).lease  # type: ignore[union-attr]
            # The agent talks to the first endpoint it reached: the first member.
            etcd.members[0].kill()
            async with etcd.client(endpoints=etcd.endpoints[1:]) as c2, KeyEvents(c2, key) as seen:
                # Several keep-alive rounds through the surviving members, on the same lease.
                await wait_until(
                    lambda: any("etcd endpoint switched" in ln for ln in agent.log_lines()), timeout=10, what="failover"
                )
                for _ in range(3):
                    await wait_until(lambda: _ttl_above(c2, lease, TTL - 1.5), timeout=5)
                    await asyncio.sleep(1)
                assert seen.deletes() == 0
                kv = await c2.get(key)
                assert kv is not None and kv.lease == lease
    finally:
        etcd.destroy()


async def test_tls_and_prefix_limited_user(tmp_path: Path) -> None:
    etcd = EtcdCluster(1, tls=True, auth=True).start()
    try:
        assert etcd.tls is not None
        (tmp_path / "pw").write_text(USER_PASSWORD + "\n")
        tls = f"""ca_file = "{etcd.tls.ca}"
cert_file = "{etcd.tls.client_cert}"
key_file = "{etcd.tls.client_key}"
username = "{USER}"
password_file = "{tmp_path / "pw"}"
"""
        key = Keyspace("secure").node("n1")
        async with etcd.client() as root, node_agent(tmp_path, etcd.endpoints, "secure", "n1", tls) as agent:
            await wait_until(lambda: registered(root, key), what="registered over TLS as a limited user")
            assert all(USER_PASSWORD not in ln for ln in agent.log_lines())
        # A wrong password: the agent keeps serving and says why it cannot register.
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "pw").write_text("wrong-password")
        bad = tls.replace(str(tmp_path / "pw"), str(tmp_path / "bad" / "pw"))
        async with node_agent(tmp_path / "bad", etcd.endpoints, "secure", "n2", bad) as agent:
            line = await wait_until(
                lambda: next((ln for ln in agent.log_lines() if "etcd membership unreachable" in ln), None),
                timeout=15,
                what="auth failure logged",
            )
            assert "authentication failed" in line.lower() or "invalid" in line.lower(), line
            assert "wrong-password" not in "".join(agent.log_lines())
        # A client certificate from another CA is refused with a clear error (gpuctl, exit 1).
        res = gpuctl(
            "--etcd",
            etcd.endpoints[0],
            "--cluster",
            "secure",
            "--cacert",
            etcd.tls.ca,
            "--cert",
            etcd.tls.other_client_cert,
            "--key",
            etcd.tls.other_client_key,
            "nodes",
        )
        assert res.returncode in (1, 2), res.stderr
        assert "tls" in res.stderr.lower() or "certificate" in res.stderr.lower(), res.stderr
    finally:
        etcd.destroy()


def gpuctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuctl.main", *args], capture_output=True, text=True, timeout=60)


async def test_gpuctl_nodes_skips_malformed_records(tmp_path: Path, etcd: EtcdCluster, etcd_client: EtcdClient) -> None:
    keys = Keyspace("mixed")
    async with node_agent(tmp_path, etcd.endpoints, "mixed", "good") as agent:
        await agent.wait_state("a", "READY")
        await wait_until(lambda: _with(registered(etcd_client, keys.node("good")), lambda r: r.ready))
        await etcd_client.put(keys.node("garbage"), b"{not json")
        await etcd_client.put(keys.node("wrong-type"), b'{"node": 5}')
        res = gpuctl("--etcd", ",".join(etcd.endpoints), "--cluster", "mixed", "nodes")
        assert res.returncode == 0, res.stderr
        assert "good" in res.stdout and "1/1" in res.stdout and "yes" in res.stdout
        assert "garbage" not in res.stdout and "skipped invalid record at /gpufleet/mixed/nodes/garbage" in res.stderr
        res = gpuctl("--etcd", ",".join(etcd.endpoints), "--cluster", "mixed", "-o", "json", "nodes")
        nodes = json.loads(res.stdout)
        assert [n["node"] for n in nodes] == ["good"]
    res = gpuctl("--etcd", f"http://127.0.0.1:{free_port()}", "--timeout", "1", "nodes")
    assert res.returncode == 2 and "etcd unreachable" in res.stderr


def test_config_enforces_keepalive_budget(tmp_path: Path) -> None:
    from agent.config import load_config
    from gpufleet.tomlconfig import ConfigError

    f = tmp_path / "a.toml"
    f.write_text(
        '[gpu]\nsource = "simulated"\n[[gpu.simulated]]\n[cluster]\nendpoints = ["http://127.0.0.1:2379"]\n'
        "lease_ttl_s = 5\nkeepalive_interval_s = 2\ntimeout_s = 2\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "$.cluster.lease_ttl_s: keepalive interval 2s + 2 × timeout_s 2s = 6s exceeds the lease TTL 5s" in str(
        e.value
    )


# --- publish policy: pure ------------------------------------------------------------------


def _node(
    temp: float = 50, util: float = 20, state: str = "READY", ready: bool = True, health: float = 1.0
) -> NodeRecord:
    gpu = GpuRecord(
        index=0, uuid="u", name="A100", gpu_class="A100", temperature_celsius=temp, utilization_percent=util
    )
    inst = InstanceRecord(
        name="a",
        model="m",
        backend="vllm",
        state=state,
        state_since=0,
        port=1,
        gpus=[0],
        gpu_memory_fraction=0.5,
        health_ratio=health,
    )  # type: ignore[arg-type]
    return NodeRecord(
        node="n",
        address="http://n",
        agent_version="0",
        started_at=0,
        updated_at=0,
        gpu_source="sim",
        gpu_classes=["A100"],
        gpus=[gpu],
        instances=[inst],
        ready=ready,
    )


@pytest.mark.parametrize(
    ("prev", "cur", "change"),
    [
        (None, _node(), Change("first record", urgent=True)),
        (_node(), _node(temp=51.9), None),
        (_node(), _node(temp=52), Change("gpu 0 temperature 50 -> 52", urgent=False)),
        (_node(), _node(temp=48), Change("gpu 0 temperature 50 -> 48", urgent=False)),
        (_node(), _node(util=29), None),
        (_node(), _node(util=30), Change("gpu 0 utilization 20 -> 30", urgent=False)),
        (_node(), _node(state="UNHEALTHY", ready=True), Change("instance a READY -> UNHEALTHY", urgent=True)),
        (_node(), _node(ready=False, temp=80), Change("ready True -> False", urgent=True)),
        (_node(), _node(health=0.5), None),
        (_node(), _node(health=0.0), Change("instance a out of rotation", urgent=True)),
        (_node(health=0.0), _node(health=0.5), Change("instance a back in rotation", urgent=True)),
    ],
)
def test_change_reason_table(prev: NodeRecord | None, cur: NodeRecord, change: Change | None) -> None:
    assert change_reason(prev, cur, PublishPolicy()) == change


def test_publish_reason_rate_limits_and_refresh() -> None:
    p = PublishPolicy(interval_s=30, min_gap_s=1, telemetry_gap_s=15)
    assert publish_reason(_node(), _node(), 5, p) is None
    assert publish_reason(_node(), _node(), 30, p) == "periodic refresh"
    # State changes go out at once (after the 1 s burst gap); telemetry waits its 15 s gap.
    assert publish_reason(_node(), _node(ready=False), 0.5, p) is None
    assert publish_reason(_node(), _node(ready=False), 1.0, p) == "ready True -> False"
    assert publish_reason(_node(), _node(temp=70), 14.9, p) is None
    # What is held back, and for how long: the publisher wakes when its gap is over.
    assert held_for(_node(), _node(ready=False), 0.4, p) == pytest.approx(0.6)
    assert held_for(_node(), _node(temp=70), 5.0, p) == pytest.approx(10.0)
    assert held_for(_node(), _node(ready=False), 1.0, p) is None  # due now: publish_reason says so
    assert held_for(_node(), _node(), 0.5, p) is None and held_for(None, _node(), 0.0, p) is None
    assert publish_reason(_node(), _node(temp=70), 15.0, p) == "gpu 0 temperature 50 -> 70"


_ = (os, msgspec)


# --- who holds the node key (agent/cluster/identity.py) ----------------------------------------


def _kv(lease: int, **fields: str) -> KeyValue:
    return KeyValue(key=b"k", value=msgspec.json.encode({"node": "n1", **fields}), mod_revision=5, lease=lease)


@pytest.mark.parametrize(
    ("prev", "holder_address"),
    [
        (None, None),  # absent: ours to create
        (_kv(0, address="http://b:1", agent_id="other"), None),  # no lease keeps it alive
        (_kv(7, address="http://a:1", agent_id="me@boot"), None),  # our own earlier registration
        (_kv(7, address="http://a:1"), None),  # an agent from before identities, at our address
        (_kv(7, address="http://b:1"), "http://b:1"),  # ... at another address
        (_kv(7, address="http://b:1", agent_id="other@boot"), "http://b:1"),  # another agent
        (_kv(7, address="http://a:1", agent_id="other@boot"), "http://a:1"),  # same address, other agent
        (KeyValue(key=b"k", value=b"not json", lease=7), ""),  # unreadable but alive: not taken
    ],
)
def test_other_holder_table(prev: KeyValue | None, holder_address: str | None) -> None:
    holder = other_holder(prev, "n1", "me@boot", "http://a:1")
    assert (holder.address if holder else None) == holder_address
    if holder is not None:
        assert "'n1'" in holder.describe() and f"{holder.lease:x}" in holder.describe()


def test_agent_identity_is_kept_in_the_state_dir(tmp_path: Path) -> None:
    first = agent_identity(str(tmp_path / "state"))
    assert agent_identity(str(tmp_path / "state")) == first  # a restart is the same agent
    assert agent_identity(str(tmp_path / "other")) != first  # another state dir is another agent
    assert (tmp_path / "state" / "agent-id").read_text().strip() == first.split("@")[0]


async def test_refused_agent_runs_no_assigned_replica() -> None:
    """While another agent holds our node_id, its assignment is not ours to run."""
    applied: list[list[str]] = []
    refused = True

    async def apply(configs: list[Any]) -> None:
        applied.append([c.name for c in configs])

    follower = ModelFollower(
        None,  # type: ignore[arg-type]  # mirrors are never started here
        Keyspace("refused"),
        "n1",
        settings=lambda: ModelsSection(),
        apply=apply,
        running=lambda: set(),
        on_change=lambda: None,
        refused=lambda: refused,
    )
    follower.assigned = [AssignedInstance(name="qwen-0", model="qwen", path="/m/qwen", backend="vllm", gpus=[0])]
    follower.checks[Wanted("/m/qwen", None, None)] = CheckState(result=PathCheck(True, False))
    await follower._apply_assignment()
    refused = False
    await follower._apply_assignment()
    refused = True
    await follower._apply_assignment()
    assert applied == [[], ["qwen-0"], []]
