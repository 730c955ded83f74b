"""The leading coordinator crashes in the middle of a failover; the next leader completes it.

Two A100 agents; model ``qwen`` on shared storage is registered with one replica, which the
leader places on one of them. The leader is frozen (SIGSTOP), the node holding the replica is
SIGKILLed, and once that node's lease has run out (the failover is due, and nobody has acted:
the route still says READY) the frozen leader is SIGKILLed. What users must see: the standby
takes over, marks the node DOWN in the route, moves the replica to the other A100 after the
reschedule grace (counted from when *it* noticed the node missing), and ``qwen`` answers
again; the dead node's assignment is gone; every write of the new term carries its epoch.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from etcd_fixtures import EtcdCluster
from helpers import (
    SIM_LAUNCHER,
    CoordinatorProcess,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    pid_alive,
    start_agent_sync,
    wait_until,
)

from faults.fleet import CLUSTER, KEYS, chat, endpoint_state, eq, neq, stop_all
from gpufleet.keyspace import decode
from gpufleet.keyspace.records import NodeRecord, PlacementRecord, RouteRecord
from gpufleet.routeslices import read_routes

EXTRA = "[placement]\nreschedule_after_s = 2.0\ninterval_s = 0.5\n"
NODES = ("a100-1", "a100-2")


def model_agent(tmp: Path, node: str, etcd: EtcdCluster, shared: Path):  # type: ignore[no-untyped-def]
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    gpus = '\n[[gpu.simulated]]\nname = "NVIDIA A100-SXM4-80GB"\nmemory_total_gib = 80\ntemperature_c = 50\n'
    text = agent_toml(tmp, port, "", gpus=gpus)
    text = as_node(text, node, f"http://127.0.0.1:{port}") + cluster_toml(etcd.endpoints, CLUSTER)
    text += f"""
[models]
launchers = {{ vllm = {SIM_LAUNCHER} }}
allowed_roots = ["{shared}"]
recheck_interval_s = 1.0
"""
    return start_agent_sync(tmp, text, port, 0)


async def qwen_ready_on(etcd: EtcdCluster) -> tuple[str, ...]:
    out = []
    async with etcd.client() as c:
        for node in NODES:
            kv = await c.get(KEYS.node(node))
            rec = decode(kv.value, NodeRecord) if kv else None
            if rec and any(i.assigned and i.model == "qwen" and i.state == "READY" for i in rec.instances):
                out.append(node)
    return tuple(out)


async def route(etcd: EtcdCluster) -> RouteRecord | None:
    async with etcd.client() as c:
        return (await read_routes(c, KEYS)).get("qwen")


def state_of(r: RouteRecord | None, node: str) -> str | None:
    return next((e.state for e in r.endpoints if e.node == node), None) if r else None


async def test_leader_crash_mid_failover_the_next_leader_completes_it(etcd: EtcdCluster, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "qwen.gguf").write_bytes(b"GGUF" + bytes(2048))
    agents = {n: model_agent(tmp_path / n, n, etcd, shared) for n in NODES}
    c1 = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER, EXTRA).start()
    c2: CoordinatorProcess | None = None
    try:
        c1.wait_ready_sync()
        await wait_until(lambda: c1.status()["is_leader"], timeout=20, what="c1 leads")
        c2 = CoordinatorProcess(tmp_path, "c2", etcd.endpoints, CLUSTER, EXTRA).start().wait_ready_sync()
        gpuctl = [sys.executable, "-m", "gpuctl.main", "--etcd", ",".join(etcd.endpoints), "--cluster", CLUSTER]
        add = [*gpuctl, "models", "add", "qwen", "--path", str(shared / "qwen.gguf"), "--classes", "A100"]
        r = subprocess.run([*add, "--min-vram-gib", "20"], capture_output=True, text=True, timeout=30)  # noqa: ASYNC221
        assert r.returncode == 0, r.stderr
        [victim] = await wait_until(lambda: qwen_ready_on(etcd), timeout=60, what="qwen placed and READY")
        survivor = next(n for n in NODES if n != victim)
        await wait_until(lambda: eq(endpoint_state(etcd, victim, "qwen"), "READY"), timeout=30, what="qwen routed")
        old_epoch = c1.status()["epoch"]

        assert c1.proc is not None
        c1.proc.send_signal(signal.SIGSTOP)
        agent = agents[victim]
        assert agent.proc is not None
        async with etcd.client() as c:
            rec = decode((await c.get(KEYS.node(victim))).value, NodeRecord)  # type: ignore[union-attr]
        [server_pid] = [i.pid for i in rec.instances if i.model == "qwen"]
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        # No orphan: the model server dies with its agent (PDEATHSIG), it does not hold the GPU.
        await wait_until(lambda: not pid_alive(server_pid), timeout=10, what="the model server gone")  # type: ignore[arg-type]

        async def victim_key_gone() -> bool:
            async with etcd.client() as c:
                return await c.get(KEYS.node(victim)) is None

        await wait_until(victim_key_gone, timeout=20, what="the victim's lease expired")
        # Mid-failover: the node is gone, the route still sends traffic there, nobody acted.
        assert await endpoint_state(etcd, victim, "qwen") == "READY"
        c1.proc.send_signal(signal.SIGKILL)
        c1.proc.wait()
        crashed = time.monotonic()

        await wait_until(lambda: c2.status()["is_leader"], timeout=30, what="c2 leads")  # type: ignore[union-attr]
        new_epoch = c2.status()["epoch"]
        assert new_epoch > old_epoch
        # No traffic to the victim: DOWN in the route, or (the new leader never saw it alive)
        # left out of it; with no other replica yet, the route goes until there is one.
        await wait_until(
            lambda: neq(endpoint_state(etcd, victim, "qwen"), "READY"), timeout=30, what="the route fails over"
        )
        await wait_until(lambda: eq(qwen_ready_on(etcd), (survivor,)), timeout=60, what=f"qwen on {survivor}")
        # The new leader waited its own reschedule grace, counted from when it noticed the node
        # missing (it never saw it alive), before it moved the replica.
        assert time.monotonic() - crashed >= 2.0
        moves = [ln for ln in c2.log_lines() if '"placement"' in ln and f"removed qwen from {victim}" in ln]
        assert moves and "node DOWN for" in moves[0], moves
        assert chat(agents[survivor].base, "qwen")[0] == 200

        async with etcd.client() as c:
            assert await c.get(KEYS.assignment(victim)) is None
            placement = decode((await c.get(KEYS.placement)).value, PlacementRecord)  # type: ignore[union-attr]
        assert placement.epoch == new_epoch
        [qwen] = [m for m in placement.models if m.model == "qwen"]
        assert qwen.nodes == [survivor] and qwen.unplaced == 0
        r_now = await route(etcd)
        assert r_now is not None and r_now.epoch == new_epoch
        assert state_of(r_now, survivor) == "READY" and state_of(r_now, victim) in (None, "DOWN")
    finally:
        stop_all(*agents.values(), c2, c1)
