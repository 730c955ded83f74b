"""Faults inside a 3-member etcd cluster, with two coordinators and two agents attached to it.

What users must see:
- the etcd leader killed, and later a follower frozen with SIGSTOP: every client moves to a
  member that answers, no node leaves the routes, the coordinator leader keeps its term;
- the raft leader frozen past every lease: no node leaves the routes and every request is
  answered, even where etcd revokes every lease when the member resumes (its issue 15247);
- quorum lost (two of three members killed): the coordinator leader steps down and nobody
  leads, so no decision is taken on a view that cannot be checked; the agents keep answering
  requests with what they have; when the members return, one coordinator leads again and every
  node is READY without having been failed over (etcd extends every lease when a new raft
  leader takes over, and the agents register again within that time).
"""

from __future__ import annotations

import time
from pathlib import Path

from etcd_fixtures import EtcdCluster, EtcdMember
from helpers import CoordinatorProcess, wait_until

from faults.fleet import (
    CLUSTER,
    KEYS,
    Recorder,
    agent_status,
    chat,
    cluster_agent,
    endpoint_in_use,
    endpoint_state,
    eq,
    stop_all,
)

LEASE_TTL_S = 3  # agents and coordinators alike, in these scenarios


async def node_leases(etcd: EtcdCluster) -> dict[str, int]:
    async with etcd.client() as c:
        return {kv.key_str: kv.lease for kv in (await c.get_prefix(KEYS.nodes)).kvs}


def leader_view(*coords: CoordinatorProcess) -> dict[str, str] | None:
    """The leader's node states, once it has written routes in its term; None before."""
    st = next((s for s in (c.status() for c in coords) if s["is_leader"]), None)
    return {n["node"]: n["state"] for n in st["nodes"]} if st and st["deciding_passes"] >= 2 else None


def registered_since(log_path: Path, offset: int) -> bool:
    with open(log_path, "rb") as f:
        f.seek(offset)
        return b'"etcd membership registered"' in f.read()


def ordered(etcd: EtcdCluster, *first: EtcdMember) -> list[str]:
    return [m.client_url for m in first] + [m.client_url for m in etcd.members if m not in first]


async def test_etcd_leader_killed_then_a_member_frozen_no_spurious_failover(etcd3: EtcdCluster, tmp_path: Path) -> None:
    leader = await etcd3.raft_leader()
    assert leader is not None
    f1 = next(m for m in etcd3.members if m is not leader)
    c1 = CoordinatorProcess(tmp_path, "c1", ordered(etcd3, leader, f1), CLUSTER).start()
    c2: CoordinatorProcess | None = None
    agents = []
    try:
        c1.wait_ready_sync()
        await wait_until(lambda: c1.status()["is_leader"], timeout=20, what="c1 leads")
        c2 = CoordinatorProcess(tmp_path, "c2", ordered(etcd3, f1), CLUSTER).start().wait_ready_sync()
        agents.append(cluster_agent(tmp_path / "a", "a", ordered(etcd3, leader, f1)))
        agents.append(cluster_agent(tmp_path / "b", "b", ordered(etcd3, f1, leader)))
        for node in ("a", "b"):
            await wait_until(lambda n=node: eq(endpoint_state(etcd3, n), "READY"), timeout=30, what=f"{node} READY")
        epoch = c1.status()["epoch"]
        logs = [c1.log_path, c2.log_path, *(a.log_path for a in agents)]

        async with Recorder(etcd3) as seen:
            for fault, member in (("kill", leader), ("sigstop", f1)):
                users = [p for p in logs if endpoint_in_use(p) == member.client_url]
                assert users, f"nobody attached to {member.name}: the fault would prove nothing"
                if fault == "sigstop":
                    await etcd3.lead_elsewhere(member)  # a follower frozen: see lead_elsewhere
                t0 = time.monotonic()
                member.kill() if fault == "kill" else member.sigstop()
                # Held until every client of the member has moved on, and for two lease TTLs: had
                # anyone not moved, a lease would have run out.
                await wait_until(
                    lambda m=member, u=users, t=t0: (
                        all(endpoint_in_use(p) != m.client_url for p in u) and time.monotonic() - t > 2 * LEASE_TTL_S
                    ),
                    timeout=40,
                    what=f"clients off {member.name} ({fault})",
                )
                if fault == "kill":
                    member.start()
                else:
                    member.sigcont()
                await member.wait_healthy()
            for a in agents:
                assert chat(a.base)[0] == 200
        assert seen.states == {"a": ["READY"], "b": ["READY"]}, seen.states
        assert seen.leaders == [(epoch, "c1")], seen.leaders
        assert (c1.status()["is_leader"], c1.status()["epoch"]) == (True, epoch)
    finally:
        stop_all(*agents, c2, c1)


async def test_quorum_lost_decisions_freeze_data_plane_serves_and_recovery_fails_nobody_over(
    etcd3: EtcdCluster, tmp_path: Path
) -> None:
    c1 = CoordinatorProcess(tmp_path, "c1", etcd3.endpoints, CLUSTER).start()
    c2: CoordinatorProcess | None = None
    agents = []
    try:
        c1.wait_ready_sync()
        await wait_until(lambda: c1.status()["is_leader"], timeout=20, what="c1 leads")
        c2 = CoordinatorProcess(tmp_path, "c2", etcd3.endpoints[::-1], CLUSTER).start().wait_ready_sync()
        agents.append(cluster_agent(tmp_path / "a", "a", etcd3.endpoints))
        agents.append(cluster_agent(tmp_path / "b", "b", etcd3.endpoints[::-1]))
        for node in ("a", "b"):
            await wait_until(lambda n=node: eq(endpoint_state(etcd3, n), "READY"), timeout=30, what=f"{node} READY")
        pids = {a.base: {i["name"]: i["pid"] for i in agent_status(a.base)["instances"]} for a in agents}

        async with Recorder(etcd3) as seen:
            lost = etcd3.members[1:]
            marks = {a.log_path: a.log_path.stat().st_size for a in agents}
            t0 = time.monotonic()
            for m in lost:
                m.kill()
            # Decisions freeze: the leader cannot renew, so it steps down, and nobody can win.
            await wait_until(lambda: not c1.status()["is_leader"], timeout=20, what="c1 steps down")
            answered = 0
            while time.monotonic() - t0 < 4 * LEASE_TTL_S:  # the outage outlasts every lease
                for a in agents:
                    assert chat(a.base)[0] == 200  # the data plane does not need etcd
                    answered += 1
                assert not c1.status()["is_leader"] and not c2.status()["is_leader"]
            assert answered >= 2
            for m in lost:
                m.start()
            for m in lost:
                await m.wait_healthy()
            await wait_until(
                lambda: c1.status()["is_leader"] or c2.status()["is_leader"], timeout=30, what="a leader again"
            )
            for a in agents:
                await wait_until(lambda a=a: registered_since(a.log_path, marks[a.log_path]), timeout=30, what="agent")
            # The new term's own view, built from scratch, with its first routes written.
            await wait_until(lambda: leader_view(c1, c2) == {"a": "READY", "b": "READY"}, timeout=30, what="view")
        assert seen.states == {"a": ["READY"], "b": ["READY"]}, seen.states
        assert not (c1.status()["is_leader"] and c2.status()["is_leader"])
        assert set(await node_leases(etcd3)) == {KEYS.node("a"), KEYS.node("b")}
        for a in agents:
            assert {i["name"]: i["pid"] for i in agent_status(a.base)["instances"]} == pids[a.base]
            assert "Traceback" not in a.log_path.read_text()
    finally:
        stop_all(*agents, c2, c1)


async def test_etcd_raft_leader_frozen_past_the_leases_no_failover(etcd3: EtcdCluster, tmp_path: Path) -> None:
    """Every client on the raft leader, frozen for two lease TTLs, then resumed. etcd may then
    revoke every lease (its issue 15247: Debian's 3.4.23 has it in full, PR 16822 mitigates it):
    the coordinator's term can end, but no node may leave the routes and no request may fail."""
    leader = await etcd3.raft_leader()
    assert leader is not None
    first = ordered(etcd3, leader)
    c1 = CoordinatorProcess(tmp_path, "c1", first, CLUSTER).start()
    c2: CoordinatorProcess | None = None
    agents = []
    try:
        c1.wait_ready_sync()
        await wait_until(lambda: c1.status()["is_leader"], timeout=20, what="c1 leads")
        c2 = CoordinatorProcess(tmp_path, "c2", first, CLUSTER).start().wait_ready_sync()
        agents = [cluster_agent(tmp_path / n, n, first) for n in ("a", "b")]
        for node in ("a", "b"):
            await wait_until(lambda n=node: eq(endpoint_state(etcd3, n), "READY"), timeout=30, what=f"{node} READY")
        assert await etcd3.raft_leader() is leader, "the raft leader moved: the fault would prove nothing"

        async with Recorder(etcd3) as seen:
            t0 = time.monotonic()
            leader.sigstop()
            answered = 0
            while time.monotonic() - t0 < 2 * LEASE_TTL_S:  # every lease has run out on the frozen member
                for a in agents:
                    assert chat(a.base)[0] == 200
                    answered += 1
                assert not (c1.status()["is_leader"] and c2.status()["is_leader"])
            assert answered >= 2
            leader.sigcont()
            await leader.wait_healthy()
            await wait_until(lambda: leader_view(c1, c2) == {"a": "READY", "b": "READY"}, timeout=30, what="view")
            for a in agents:
                assert chat(a.base)[0] == 200
        assert seen.states == {"a": ["READY"], "b": ["READY"]}, seen.states
        assert not (c1.status()["is_leader"] and c2.status()["is_leader"])
        assert set(await node_leases(etcd3)) == {KEYS.node("a"), KEYS.node("b")}
    finally:
        stop_all(*agents, c2, c1)
