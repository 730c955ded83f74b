"""The operator's disaster recovery: etcd wiped, or restored from a backup, under traffic.

Two agents serving ``m``, two coordinators, requests through both agents the whole time. Then
etcd loses its data (``wipe``: a new, empty cluster on the same addresses) or is restored with
``etcdctl snapshot restore`` from a backup taken earlier (``restore``: after the backup the
leader changed and an operator drained a node, so the restored store's revision is below what
the watches have seen). etcd accepts a watch that resumes at such a "future" revision and then says
nothing until its new counter gets there: before the fix every watch went blind — a node added
afterwards was never routed, an agent never saw its own drain — and the next leader's epoch
went backwards.

What users must see: no request fails; a leader at a *higher* epoch than any before; the route
rebuilt with both nodes READY (none left DEGRADED); a node that joins afterwards is routed; an
agent drained afterwards knows it. Recovery times are printed for docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from etcd_fixtures import EtcdCluster
from helpers import CoordinatorProcess, wait_until

from faults.fleet import CLUSTER, KEYS, agent_status, chat, cluster_agent, eq, stop_all
from gpufleet.keyspace import decode
from gpufleet.keyspace.records import LeaderRecord
from gpufleet.routeslices import read_routes


class Traffic:
    """Chat requests through each agent in turn, from a thread, until stopped; counts failures."""

    def __init__(self, bases: list[str]) -> None:
        self.bases = bases
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            base = self.bases[i % len(self.bases)]
            i += 1
            try:
                status, _ = chat(base)
                if status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"{base}: {status}")
            except Exception as e:  # every failure is what the test counts
                self.failed.append(f"{base}: {e}")


async def route_states(etcd: EtcdCluster) -> dict[str, str]:
    async with etcd.client() as c:
        r = (await read_routes(c, KEYS)).get("m")
    return {e.node: e.state for e in r.endpoints} if r else {}


def leading(*coordinators: CoordinatorProcess | None) -> dict[str, Any] | None:
    for c in coordinators:
        if c is not None and c.proc is not None and c.proc.poll() is None:
            try:
                st = c.status()
            except OSError:
                continue
            if st.get("is_leader"):
                return st
    return None


def gpuctl(etcd: EtcdCluster, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gpuctl.main", "--etcd", ",".join(etcd.endpoints), "--cluster", CLUSTER]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("disaster", ["wipe", "restore"])
async def test_fleet_recovers_when_etcd_history_goes_backwards(
    etcd: EtcdCluster, tmp_path: Path, disaster: str
) -> None:
    a = cluster_agent(tmp_path / "a", "a", etcd.endpoints)
    b = cluster_agent(tmp_path / "b", "b", etcd.endpoints)
    c1 = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    c2: CoordinatorProcess | None = None
    newcomer = None
    try:
        c1.wait_ready_sync()
        await wait_until(lambda: leading(c1), timeout=20, what="c1 leads")
        c2 = CoordinatorProcess(tmp_path, "c2", etcd.endpoints, CLUSTER).start().wait_ready_sync()
        both_ready = {"a": "READY", "b": "READY"}
        await wait_until(lambda: eq(route_states(etcd), both_ready), timeout=30, what="m routed on a and b")
        backup = etcd.snapshot_save(tmp_path / "backup.db")
        if disaster == "restore":
            # After the backup the leader changes (c1 resigns, c2 leads at a higher epoch) and
            # an operator drains b: the backup knows neither. Restored, b is not drained (the
            # restored store is the truth; before the fix, b's agent kept believing it was).
            c1.stop()
            await wait_until(lambda: leading(c2), timeout=20, what="c2 leads")
            assert gpuctl(etcd, "drain", "b", "--reason", "after the backup").returncode == 0
            await wait_until(lambda: agent_status(b.base)["cluster"]["drained"], timeout=15, what="b drained")
            await wait_until(
                lambda: eq(route_states(etcd), {"a": "READY", "b": "DRAINED"}), timeout=15, what="b DRAINED"
            )
        before = leading(c1, c2)
        assert before is not None
        epoch_before = before["epoch"]

        with Traffic([a.base, b.base]) as traffic:
            t0 = time.monotonic()
            if disaster == "wipe":
                etcd.wipe()
            else:
                etcd.restore(backup)
            back = time.monotonic()
            after = await wait_until(
                lambda: (st := leading(c1, c2)) is not None and st["epoch"] > epoch_before and st,
                timeout=30,
                what="a leader at a higher epoch than before",
            )
            t_leader = time.monotonic() - back
            await wait_until(lambda: eq(route_states(etcd), both_ready), timeout=30, what="m routed again")
            t_routes = time.monotonic() - back
            assert not agent_status(b.base)["cluster"]["drained"], "b still believes the drain the backup lacks"

            # Watches are not blind: a node that joins now is routed ...
            newcomer = cluster_agent(tmp_path / "n", "n", etcd.endpoints)
            joined = time.monotonic()
            everyone = {**both_ready, "n": "READY"}
            await wait_until(lambda: eq(route_states(etcd), everyone), timeout=30, what="the newcomer routed")
            t_join = time.monotonic() - joined
            # ... and an agent drained now knows it (its own drain mirror sees the new history).
            assert gpuctl(etcd, "drain", "a", "--reason", "after the restore").returncode == 0
            drained = time.monotonic()
            await wait_until(lambda: agent_status(a.base)["cluster"]["drained"], timeout=15, what="a sees its drain")
            t_drain = time.monotonic() - drained
            await wait_until(lambda: eq(route_states(etcd), {**everyone, "a": "DRAINED"}), timeout=15, what="a DRAINED")
            assert gpuctl(etcd, "undrain", "a").returncode == 0
            await wait_until(lambda: not agent_status(a.base)["cluster"]["drained"], timeout=15, what="a undrained")

        assert not traffic.failed, traffic.failed[:5]
        assert traffic.ok > 0
        async with etcd.client() as client:
            kv = await client.get(KEYS.leader)
            assert kv is not None and decode(kv.value, LeaderRecord).epoch == after["epoch"]
            # The epoch to beat is in etcd too, for coordinators that never saw the old ones.
            floor = await client.get(KEYS.epoch)
            assert floor is not None and int(floor.value) >= after["epoch"]
        logs = "\n".join(c1.log_lines() + (c2.log_lines() if c2 else []) + b.log_lines())
        assert "etcd's history went backwards" in logs, "no watch noticed"
        print(
            f"\n{disaster}: etcd back after {back - t0:.1f}s; then leader at epoch {after['epoch']} "
            f"(was {epoch_before}) in {t_leader:.1f}s, routes rebuilt in {t_routes:.1f}s, a new node routed "
            f"{t_join:.1f}s after it started, a drain seen in {t_drain:.1f}s; {traffic.ok} requests, none failed"
        )
    finally:
        stop_all(newcomer, a, b, c2, c1)
