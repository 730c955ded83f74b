"""A real partition with network namespaces: one etcd member cut off from its peers.

Member m2 runs in its own network namespace with two veth links to the root namespace: one
for raft traffic with m0 and m1, one for clients. Cutting the peer link leaves m2 in a
minority of one, still answering clients. The processes attached to it must never act on what
it can no longer know:

- a read through m2 alone fails; it never returns the value from before the partition (our
  client's reads are linearizable and carry ``hasleader``), and a client that lists other
  members gets the current value from them;
- a coordinator that can reach only m2 stops leading *before* the coordinator on the majority
  side is elected (no split brain), and follows it after the partition heals;
- an agent that prefers m2 but lists the others moves to them and is never failed over;
- agents keep answering requests throughout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_fixtures import EtcdCluster
from helpers import CoordinatorProcess, wait_until

from faults.fleet import CLUSTER, Recorder, chat, cluster_agent, endpoint_state, eq, log_time
from faults.netns import Host, Link, requires_netns
from gpufleet.etcd import EtcdClient, EtcdError

pytestmark = requires_netns


@pytest.fixture
def minority() -> Iterator[tuple[EtcdCluster, Host, Link]]:
    """Three members; m2 in a namespace of its own, its raft traffic on the returned link."""
    host = Host("m2")
    cluster: EtcdCluster | None = None
    try:
        peer, client = host.link(), host.link()
        cluster = EtcdCluster(3)
        m0, m1, m2 = cluster.members
        for m in (m0, m1):
            m.client_host = m.peer_host = peer.root_ip
        m2.peer_host, m2.client_host, m2.prefix = peer.host_ip, client.host_ip, host.prefix
        cluster.start()
        yield cluster, host, peer
    finally:
        if cluster is not None:
            cluster.destroy()
        host.destroy()


async def read(endpoints: list[str], key: str) -> bytes | None:
    async with EtcdClient(endpoints, timeout=1.0) as c:
        kv = await c.get(key)
        return kv.value if kv else None


async def read_or_none(endpoints: list[str], key: str) -> bytes | None:
    try:
        return await read(endpoints, key)
    except EtcdError:
        return None


async def test_minority_member_clients_never_act_on_stale_reads(
    minority: tuple[EtcdCluster, Host, Link], tmp_path: Path
) -> None:
    etcd, host, peer = minority
    m0, m1, m2 = etcd.members
    majority = [m0.client_url, m1.client_url]
    c1 = CoordinatorProcess(tmp_path, "c1", [m2.client_url], CLUSTER).start()
    c2: CoordinatorProcess | None = None
    agents = []
    try:
        c1.wait_ready_sync()
        await wait_until(lambda: c1.status()["is_leader"], timeout=20, what="c1 (on m2 only) leads")
        c2 = CoordinatorProcess(tmp_path, "c2", majority, CLUSTER).start().wait_ready_sync()
        agents.append(cluster_agent(tmp_path / "a", "a", [m2.client_url, *majority]))
        agents.append(cluster_agent(tmp_path / "b", "b", majority))
        for node in ("a", "b"):
            await wait_until(lambda n=node: eq(endpoint_state(etcd, n), "READY"), timeout=30, what=f"{node} READY")
        epoch = c1.status()["epoch"]
        async with EtcdClient(majority, timeout=2.0) as writer:
            await writer.put("/probe", "before")
            assert await read([m2.client_url], "/probe") == b"before"

            async with Recorder(etcd) as seen:
                host.cut(peer)
                t_cut = time.monotonic()

                async def written() -> bool:
                    try:
                        await writer.put("/probe", "after")
                        return True
                    except EtcdError:
                        return False  # the majority may be electing a new raft leader

                await wait_until(written, timeout=20, what="a write on the majority side")
                # m2 alone: an error, never the old value.
                for _ in range(3):
                    with pytest.raises(EtcdError):
                        await read([m2.client_url], "/probe")
                assert await read([m2.client_url, *majority], "/probe") == b"after"

                await wait_until(lambda: c2.status()["is_leader"], timeout=30, what="c2 leads")  # type: ignore[union-attr]
                assert log_time(c1.log_path, "stepping down") < log_time(c2.log_path, "elected leader")
                assert not c1.status()["is_leader"] and c2.status()["epoch"] > epoch
                # Held for two agent lease TTLs: agent a, attached to m2, must have moved on.
                while time.monotonic() - t_cut < 6:
                    for a in agents:
                        assert chat(a.base)[0] == 200
                assert await endpoint_state(etcd, "a") == "READY"

                host.heal(peer)
                await m2.wait_healthy()
                await wait_until(lambda: c1.status()["leader"] == "c2", timeout=30, what="c1 follows c2")
                await wait_until(lambda: read_or_none([m2.client_url], "/probe"), timeout=20, what="m2 serves")
                assert await read([m2.client_url], "/probe") == b"after"
            # Only READY: the leader change did not take either node out of the routes.
            assert seen.states == {"a": ["READY"], "b": ["READY"]}, seen.states
            assert [c for _, c in (x for x in seen.leaders if x)] == ["c1", "c2"], seen.leaders
        assert c2.status()["is_leader"] and not c1.status()["is_leader"]
    finally:
        for a in agents:
            a.stop()
        if c2 is not None:
            c2.stop()
        c1.stop()
