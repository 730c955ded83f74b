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

And a node cut off by its own namespace: every request entering elsewhere is answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_fixtures import EtcdCluster
from helpers import TOKEN, AgentProcess, CoordinatorProcess, wait_until

from faults.fleet import (
    CLUSTER,
    Recorder,
    agent_status,
    chat,
    cluster_agent,
    endpoint_state,
    eq,
    log_time,
    neq,
    post_json,
    stop_all,
)
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
        stop_all(*agents, c2, c1)


async def test_a_node_cut_off_by_its_network_namespace_loses_no_request(tmp_path: Path) -> None:
    """Agent ``cut`` runs in its own namespace, reached (and reaching etcd) over one veth link.
    Requests enter through ``entry`` (own instance stopped), which forwards by route weight to
    ``cut`` and two others, over kept-alive connections. The link goes down: packets to ``cut``
    vanish without a reset, so an attempt on a kept-alive connection would wait for the proxy's
    total deadline (15 min). Users must see every request answered: attempts on ``cut`` that
    have not answered are abandoned and retried elsewhere once the route marks it DOWN (its
    lease ran out), and new ones go elsewhere. After the link is back, ``cut`` returns READY
    with the same processes."""
    host = Host("node")
    etcd: EtcdCluster | None = None
    agents: dict[str, AgentProcess] = {}
    coord: CoordinatorProcess | None = None
    stop = threading.Event()
    results: list[tuple[float, int | str]] = []
    try:
        link = host.link()
        etcd = EtcdCluster(1)
        etcd.members[0].client_host = link.root_ip
        etcd.start()
        url = etcd.endpoints[0]
        coord = CoordinatorProcess(tmp_path, "c1", [url], CLUSTER).start()
        coord.wait_ready_sync()
        agents["cut"] = cluster_agent(tmp_path / "cut", "cut", url, wrapper=host.prefix, host=link.host_ip)
        for n in ("other1", "other2", "entry"):  # four A100 nodes: two out is not a panic
            agents[n] = cluster_agent(tmp_path / n, n, url)
        assert post_json(agents["entry"].base + "/admin/instances/m/stop", token=TOKEN) == 202
        for n in ("cut", "other1", "other2"):
            await wait_until(lambda n=n: eq(endpoint_state(etcd, n), "READY"), timeout=30, what=f"{n} READY")  # type: ignore[arg-type]
        await wait_until(lambda: neq(endpoint_state(etcd, "entry"), "READY"), timeout=30, what="entry out")  # type: ignore[arg-type]
        server_pid = agent_status(agents["cut"].base)["instances"][0]["pid"]

        def traffic() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    results.append((t0, chat(agents["entry"].base)[0]))
                except OSError as e:
                    results.append((t0, repr(e)))

        workers = [threading.Thread(target=traffic, daemon=True) for _ in range(4)]
        for w in workers:
            w.start()
        await wait_until(lambda: len(results) > 40, timeout=30, what="traffic flowing")
        host.cut(link)
        cut_at = time.monotonic()
        await wait_until(lambda: eq(endpoint_state(etcd, "cut"), "DOWN"), timeout=30, what="cut DOWN")  # type: ignore[arg-type]
        n_after_down = len(results)
        # Held longer than a client waits (10 s): an attempt left hanging on the dead link would
        # not be rescued by TCP retransmitting it once the link is back.
        await wait_until(
            lambda: len(results) > n_after_down + 40 and time.monotonic() - cut_at > 12, timeout=40, what="partition"
        )
        host.heal(link)
        await wait_until(lambda: eq(endpoint_state(etcd, "cut"), "READY"), timeout=60, what="cut back")  # type: ignore[arg-type]
        stop.set()
        for w in workers:
            w.join(30)
        failed = [r for r in results if r[1] != 200]
        assert failed == [], failed[:5]
        assert sum(1 for t, _ in results if t >= cut_at) > 40
        # The same agent and model server came back: the partition was survived, not restarted.
        assert agents["cut"].proc is not None and agents["cut"].proc.poll() is None
        assert agent_status(agents["cut"].base)["instances"][0]["pid"] == server_pid
        log = agents["entry"].log_path.read_text()
        assert '"node_down"' in log or "went DOWN in the routes" in log or "connect" in log
    finally:
        stop.set()
        stop_all(*agents.values(), coord)
        if etcd is not None:
            etcd.destroy()
        host.destroy()
