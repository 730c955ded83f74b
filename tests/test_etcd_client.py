"""gpufleet.etcd against real etcd processes (Debian's 3.4 in CI): no mocks.

Module-scoped members are shared by the tests that do not disturb them (each test uses its own
key prefix); tests that kill, stop or restart a member either bring it back before they end or
use a member of their own (starting one takes well under a second).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from etcd_fixtures import (  # noqa: F401 (fixtures)
    USER,
    USER_PASSWORD,
    EtcdCluster,
    etcd,
    etcd_auth,
    etcd_cluster3,
    etcd_tls,
)
from helpers import wait_until

from gpufleet.etcd import (
    Compare,
    Delete,
    EtcdAuthError,
    EtcdClient,
    EtcdCompacted,
    EtcdHistoryLost,
    EtcdLeaseNotFound,
    EtcdNoLeader,
    EtcdTimeout,
    EtcdTLSError,
    EtcdUnavailable,
    KeyMirror,
    Op,
    Put,
    Snapshot,
    list_prefix,
    list_watch,
    prefix_range_end,
)

pytestmark = pytest.mark.timeout(60)


def unique(name: str = "t") -> str:
    return f"/test/{name}-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def etcd_own() -> Iterator[EtcdCluster]:
    """A member of the test's own, for tests that kill, stop or compact it."""
    cluster = EtcdCluster(1).start()
    yield cluster
    cluster.destroy()


@pytest.fixture
async def client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:  # noqa: F811
    async with etcd.client(timeout=5) as c:
        yield c


async def take(it: AsyncIterator, n: int, timeout: float = 10.0) -> list:
    out = []
    async with asyncio.timeout(timeout):
        async for x in it:
            out.append(x)
            if len(out) >= n:
                break
    return out


# --- kv ----------------------------------------------------------------------------------------


async def test_kv_round_trip_is_binary_safe(client: EtcdClient) -> None:
    p = unique("kv")
    r1 = await client.put(p + "text", "héllo")
    assert (await client.get(p + "text")).value_str == "héllo"  # type: ignore[union-attr]
    binary_key = p.encode() + b"\x00\xff\x80bin"
    r2 = await client.put(binary_key, b"\x00\x01\xfe\xff")
    kv = await client.get(binary_key)
    assert kv is not None and kv.key == binary_key and kv.value == b"\x00\x01\xfe\xff"
    assert kv.create_revision == kv.mod_revision == r2.revision > r1.revision and kv.version == 1
    assert await client.get(p + "missing") is None
    r3 = await client.put(binary_key, b"", prev_kv=True)
    assert r3.prev_kv is not None and r3.prev_kv.value == b"\x00\x01\xfe\xff"
    kv = await client.get(binary_key)
    assert kv is not None and kv.value == b"" and kv.version == 2 and kv.mod_revision == r3.revision
    # A read at an older revision sees the older value.
    old = await client.get(binary_key, revision=r2.revision)
    assert old is not None and old.value == b"\x00\x01\xfe\xff"
    d = await client.delete(binary_key, prev_kv=True)
    assert d.deleted == 1 and d.prev_kvs[0].key == binary_key and await client.get(binary_key) is None
    assert (await client.delete(binary_key)).deleted == 0


def test_prefix_range_end_rules() -> None:
    assert prefix_range_end(b"abc") == b"abd"
    assert prefix_range_end("/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"a\xff\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\x00"  # nothing is bigger: to the end of the key space
    assert prefix_range_end(b"") == b"\x00"


async def test_get_prefix_edge_cases(client: EtcdClient) -> None:
    p = unique("range").encode()
    keys = [p + b"a", p + b"a\xff", p + b"a\xff\xff", p + b"a\xff\x00", p + b"b", p + b"\xff", p + b"\xff\xff\x01"]
    for k in keys:
        await client.put(k, k)
    got_a = [kv.key for kv in (await client.get_prefix(p + b"a\xff")).kvs]
    assert got_a == [p + b"a\xff", p + b"a\xff\x00", p + b"a\xff\xff"]  # sorted bytewise; not p+b"b"
    got = [kv.key for kv in (await client.get_prefix(p + b"\xff")).kvs]
    assert got == [p + b"\xff", p + b"\xff\xff\x01"]
    whole = await client.get_prefix(p)
    assert [kv.key for kv in whole.kvs] == sorted(keys) and whole.count == len(keys)
    # A prefix that is a key itself includes it; a sibling with a larger last byte is excluded.
    assert [kv.key for kv in (await client.get_prefix(p + b"a")).kvs] == [p + b"a", *got_a]
    # The empty prefix is the whole key space.
    everything = await client.get_prefix(b"", keys_only=True)
    assert set(keys) <= {kv.key for kv in everything.kvs}
    # limit / keys_only
    page = await client.get_prefix(p, limit=2, keys_only=True)
    assert len(page.kvs) == 2 and page.more and page.count == len(keys)
    assert all(kv.value == b"" for kv in page.kvs)


async def test_paginated_listing_is_one_consistent_snapshot(client: EtcdClient) -> None:
    p = unique("pages")
    for i in range(7):
        await client.put(f"{p}{i}", str(i))
    snap = await list_prefix(client, p, page_size=2)
    assert [kv.value_str for kv in snap.kvs] == [str(i) for i in range(7)]
    # Pages read at a pinned revision ignore later writes.
    first = await client.get_prefix(p, limit=3)
    await client.put(f"{p}9", "late")
    await client.delete(f"{p}6")
    rest = await client.range(first.kvs[-1].key + b"\x00", prefix_range_end(p), revision=first.revision)
    assert [kv.value_str for kv in first.kvs + rest.kvs] == [str(i) for i in range(7)]


async def test_status(etcd: EtcdCluster, client: EtcdClient) -> None:  # noqa: F811
    st = await client.status()
    assert st.version.startswith("3.") and st.leader == st.member_id != 0
    assert st.raft_term >= 1 and st.raft_index > 0 and st.db_size > 0 and st.errors == []
    assert st.endpoint == etcd.endpoints[0]
    assert (await client.status(endpoint=etcd.endpoints[0] + "/")).member_id == st.member_id


async def test_delete_prefix(client: EtcdClient) -> None:
    p = unique("del")
    for i in range(3):
        await client.put(f"{p}{i}", "x")
    await client.put(p[:-1] + "0", "sibling")  # outside the prefix
    assert (await client.delete_prefix(p)).deleted == 3
    assert (await client.get_prefix(p)).kvs == []
    assert await client.get(p[:-1] + "0") is not None


async def test_txn_create_if_absent_and_compares(client: EtcdClient) -> None:
    k = unique("txn") + "leader"
    won = await client.txn([Compare.absent(k)], [Op.put(k, "me")], [Op.get(k)])
    assert won.succeeded and won.responses[0].revision == won.revision
    lost = await client.txn([Compare.absent(k)], [Op.put(k, "other")], [Op.get(k)])
    assert not lost.succeeded
    assert lost.responses[0].kvs[0].value == b"me"  # type: ignore[union-attr]
    kv = await client.get(k)
    assert kv is not None
    # value / version / mod_revision compares, multiple ops in one txn
    ok = await client.txn(
        [Compare.value(k, "==", "me"), Compare.version(k, ">", 0), Compare.mod_revision(k, "==", kv.mod_revision)],
        [Op.put(k, "me2", prev_kv=True), Op.get(k)],
    )
    assert ok.succeeded and ok.responses[0].prev_kv.value == b"me"  # type: ignore[union-attr]
    assert ok.responses[1].kvs[0].value == b"me2"  # type: ignore[union-attr]
    no = await client.txn([Compare.value(k, "!=", "me2")], [Op.delete(k)], [])
    assert not no.succeeded and no.responses == []
    gone = await client.txn([Compare.create_revision(k, ">", 0)], [Op.delete(k, prev_kv=True)])
    assert gone.succeeded and gone.responses[0].deleted == 1  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="operator"):
        Compare.version(k, "<=", 1).to_json()  # type: ignore[arg-type]


# --- leases ------------------------------------------------------------------------------------


async def test_lease_grant_keepalive_ttl_revoke(client: EtcdClient) -> None:
    p = unique("lease")
    lease = await client.lease_grant(30)
    assert lease.id > 0 and lease.ttl == 30
    await client.put(p + "a", "1", lease=lease.id)
    await client.put(p + "b", "2", lease=lease.id)
    assert (await client.get(p + "a")).lease == lease.id  # type: ignore[union-attr]
    assert await client.lease_keepalive_once(lease.id) == 30
    info = await client.lease_time_to_live(lease.id, keys=True)
    assert (
        info.granted_ttl == 30 and 0 < info.ttl <= 30 and sorted(info.keys) == [(p + "a").encode(), (p + "b").encode()]
    )
    await client.lease_revoke(lease.id)
    assert (await client.get_prefix(p)).kvs == []  # revoking deletes the keys
    with pytest.raises(EtcdLeaseNotFound):
        await client.lease_keepalive_once(lease.id)
    with pytest.raises(EtcdLeaseNotFound):
        await client.lease_time_to_live(lease.id)
    with pytest.raises(EtcdLeaseNotFound):
        await client.lease_revoke(lease.id)
    with pytest.raises(EtcdLeaseNotFound):
        await client.put(p + "c", "x", lease=lease.id)
    # A chosen lease id.
    own = await client.lease_grant(10, id=lease.id + 12345)
    assert own.id == lease.id + 12345
    await client.lease_revoke(own.id)


async def test_lease_expiry_deletes_keys(client: EtcdClient) -> None:
    p = unique("expiry")
    lease = await client.lease_grant(1)
    await client.put(p + "k", "v", lease=lease.id)

    async def gone() -> bool:
        return await client.get(p + "k") is None

    await wait_until(gone, timeout=10, what="leased key to expire")
    with pytest.raises(EtcdLeaseNotFound):
        await client.lease_keepalive_once(lease.id)


# --- watch -------------------------------------------------------------------------------------


async def test_watch_sees_puts_and_deletes_in_order(client: EtcdClient) -> None:
    p = unique("watch")
    async with client.watch(p) as w:
        assert w.created_revision > 0
        r1 = await client.put(p + "a", "1")
        r2 = await client.put(p + "b", "2")
        d = await client.delete(p + "a")
        t = await client.txn([], [Op.put(p + "c", "3"), Op.delete(p + "b")])
        await client.put(unique("elsewhere") + "x", "not watched")
        events = []
        async with asyncio.timeout(10):
            async for resp in w:
                events += resp.events
                if len(events) >= 5:
                    break
    got = [(e.type, e.kv.key.decode()[len(p) :], e.kv.mod_revision) for e in events]
    assert got == [
        ("PUT", "a", r1.revision),
        ("PUT", "b", r2.revision),
        ("DELETE", "a", d.revision),
        ("PUT", "c", t.revision),
        ("DELETE", "b", t.revision),
    ]
    assert events[0].kv.value == b"1"


async def test_watch_single_key_and_start_revision(client: EtcdClient) -> None:
    p = unique("replay")
    revs = [(await client.put(p + "k", str(i))).revision for i in range(3)]
    await client.put(p + "k2", "other key")
    async with client.watch(p + "k", prefix=False, start_revision=revs[1], prev_kv=True) as w:
        events = [e for resp in await take(w, 1) for e in resp.events]
        assert [e.kv.value for e in events] == [b"1", b"2"]
        assert events[0].prev_kv is not None and events[0].prev_kv.value == b"0"
        assert w.next_revision == revs[2] + 1


async def test_watch_progress_notifications_advance_the_resume_revision(client: EtcdClient) -> None:
    # Fixture members send progress notifications every second; a quiet watch's resume point
    # then follows the store, so a reconnect does not replay (or hit compaction on) old history.
    p = unique("progress")
    async with client.watch(p) as w:
        start = w.next_revision
        await client.put(unique("elsewhere") + "x", "bump the store revision")
        resp = (await take(w, 1))[0]
        assert resp.progress and resp.events == []
        assert w.next_revision > start


async def test_compaction_cancels_watch_and_list_watch_relists(etcd_own: EtcdCluster) -> None:
    p = unique("compact")
    async with etcd_own.client(timeout=5) as client:
        old = (await client.put(p + "a", "1")).revision
        await client.put(p + "b", "2")
        stream = list_watch(client, p)
        snap = await anext(stream)
        assert isinstance(snap, Snapshot) and [kv.value for kv in snap.kvs] == [b"1", b"2"]
        # While the consumer holds the first snapshot (no watch open yet), history moves on and
        # is compacted past the snapshot: the changes in between are gone from etcd.
        await client.delete(p + "a")
        await client.put(p + "c", "3")
        now = (await client.put(p + "b", "2b")).revision
        await client.compact(now)
        with pytest.raises(EtcdCompacted) as exc:
            async with client.watch(p, start_revision=old) as w:
                await anext(w)
        assert exc.value.compact_revision == now
        with pytest.raises(EtcdCompacted):
            await client.get(p + "a", revision=old)
        # list_watch notices, lists again and hands over a fresh, complete snapshot.
        snap2 = await asyncio.wait_for(anext(stream), 10)
        assert isinstance(snap2, Snapshot) and snap2.revision >= now
        assert {kv.key_str[len(p) :]: kv.value for kv in snap2.kvs} == {"b": b"2b", "c": b"3"}
        # ... and then keeps streaming changes.
        await client.put(p + "d", "4")
        change = await asyncio.wait_for(anext(stream), 10)
        assert isinstance(change, Put) and change.kv.key_str == p + "d"
        await stream.aclose()


async def test_mirror_converges_after_compaction(etcd_own: EtcdCluster) -> None:
    p = unique("mirror")
    async with etcd_own.client(timeout=5) as client:
        await client.put(p + "x", "1")
        await client.put(p + "y", "1")
        # Hold the mirror on its first snapshot (its callback blocks), so its watch would start
        # at a revision that then gets compacted.
        gate = asyncio.Event()
        seen: list[object] = []

        async def on_change(change: object) -> None:
            seen.append(change)
            await gate.wait()

        async with KeyMirror(client, p, on_change=on_change) as mirror:
            await mirror.wait_ready(10)
            assert set(mirror.data) == {p + "x", p + "y"}
            await client.delete(p + "x")
            await client.put(p + "z", "2")
            await client.compact((await client.put(p + "y", "2")).revision)
            gate.set()
            await mirror.wait_for(lambda d: set(d) == {p + "y", p + "z"} and d[p + "y"].value == b"2", 10)
            assert mirror.snapshots == 2
            await client.delete(p + "z")
            await mirror.wait_for(lambda d: set(d) == {p + "y"}, 10)
            assert isinstance(seen[-1], Delete)


# --- etcd restored from a backup, or wiped: the revision goes backwards -----------------------


async def test_watch_resuming_past_a_rewound_revision_raises_history_lost(etcd_own: EtcdCluster) -> None:
    p = unique("rewound")
    async with etcd_own.client(timeout=5) as client:
        for i in range(20):
            await client.put(p + str(i), "x")
        resume = (await client.put(p + "last", "x")).revision + 1
        etcd_own.wipe()
        # etcd itself accepts a watch on the "future" and then says nothing: the blind watch.
        with pytest.raises(EtcdHistoryLost) as exc:
            async with client.watch(p, start_revision=resume) as w:
                await anext(w)
        assert exc.value.resume_revision == resume and exc.value.revision < resume
        assert isinstance(exc.value, EtcdCompacted)  # callers that relist on compaction relist here too


@pytest.mark.parametrize("disaster", ["wipe", "restore"])
async def test_mirror_relists_when_etcd_history_goes_backwards(
    etcd_own: EtcdCluster, disaster: str, tmp_path: Path
) -> None:
    p = unique(disaster)
    async with etcd_own.client(timeout=5) as client:
        await client.put(p + "a", "1")
        await client.put(p + "b", "1")
        backup = etcd_own.snapshot_save(tmp_path / "backup.db")
        # After the backup: history moves on (more revisions than the restore will have).
        await client.delete(p + "a")
        for i in range(10):
            await client.put(p + "c", str(i))
        seen: list[object] = []
        async with KeyMirror(client, p, on_change=seen.append, backoff_initial=0.05, backoff_max=0.5) as mirror:
            await mirror.wait_for(lambda d: set(d) == {p + "b", p + "c"}, 10)
            if disaster == "wipe":
                etcd_own.wipe()
                expected = {p + "new"}
            else:
                etcd_own.restore(backup)
                expected = {p + "a", p + "b", p + "new"}
            # A write to the rewound store, at a revision far below the one the watch resumes at.
            assert (await client.put(p + "new", "1")).revision < mirror.revision
            await mirror.wait_for(lambda d: set(d) == expected, 15)
            assert mirror.rewinds == 1
            assert any(isinstance(c, Snapshot) and c.rewound for c in seen)
            # ... and it keeps following the new history.
            await client.delete(p + "new")
            await mirror.wait_for(lambda d: set(d) == expected - {p + "new"}, 10)


async def test_list_watch_resumes_after_restart_exactly_once(etcd_own: EtcdCluster) -> None:
    p = unique("restart")
    member = etcd_own.members[0]
    async with etcd_own.client(timeout=2) as client:
        gate = asyncio.Event()
        gate.set()
        seen: list[object] = []

        async def consume() -> None:
            async for change in list_watch(client, p, backoff_initial=0.05, backoff_max=0.5, idle_timeout=2):
                await gate.wait()
                seen.append(change)

        def puts() -> list[str]:
            return [c.kv.key_str[len(p) :] for c in seen if isinstance(c, Put)]

        task = asyncio.create_task(consume())
        try:
            await wait_until(lambda: seen, timeout=10, what="the first snapshot")
            for i in range(5):
                await client.put(f"{p}{i:02}", str(i))
            await wait_until(lambda: len(puts()) == 5, timeout=10, what="first puts")
            # The consumer stops taking changes; more are written (some reach our socket before
            # the member dies, some do not), then the member is killed and restarted.
            gate.clear()
            for i in range(5, 10):
                await client.put(f"{p}{i:02}", str(i))
            member.kill()
            member.start()
            await member.wait_healthy()
            for i in range(10, 15):
                await client.put(f"{p}{i:02}", str(i))
            gate.set()
            await wait_until(lambda: len(puts()) >= 15, timeout=20, what="all puts")
            await client.put(p + "zz", "last")  # a marker: nothing after it may be a duplicate
            await wait_until(lambda: "zz" in puts(), timeout=20, what="marker")
        finally:
            task.cancel()
        assert puts() == [f"{i:02}" for i in range(15)] + ["zz"]
        assert isinstance(seen[0], Snapshot) and sum(isinstance(c, Snapshot) for c in seen) == 1
        revs = [c.revision for c in seen if isinstance(c, Put)]
        assert revs == sorted(set(revs))


async def test_watch_on_hung_member_raises_instead_of_waiting_forever(etcd_own: EtcdCluster) -> None:
    member = etcd_own.members[0]
    async with etcd_own.client(timeout=1) as client:
        async with client.watch(unique("hung"), idle_timeout=1.5) as w:
            await take(w, 1)  # a progress notification: the stream is live
            member.sigstop()
            try:
                started = time.monotonic()
                with pytest.raises(EtcdUnavailable, match="silent"):
                    async with asyncio.timeout(10):
                        async for _ in w:
                            pass
                # Silence (up to 1.5 s after the last notification) plus a 1 s liveness check.
                assert time.monotonic() - started < 4
            finally:
                member.sigcont()


async def test_watch_on_killed_member_raises_etcd_unavailable(etcd_own: EtcdCluster) -> None:
    member = etcd_own.members[0]
    async with etcd_own.client(timeout=1) as client:
        w = await client.watch("/gone/").open()
        member.kill()
        try:
            with pytest.raises(EtcdUnavailable):
                async with asyncio.timeout(10):
                    async for _ in w:
                        pass
            with pytest.raises(EtcdUnavailable):
                await client.watch("/gone/").open()
        finally:
            member.start()
            await member.wait_healthy()


async def test_calls_to_a_hung_member_fail_within_the_deadline(etcd_own: EtcdCluster) -> None:
    member = etcd_own.members[0]
    async with etcd_own.client(timeout=1) as client:
        await client.put("/k", "v")
        member.sigstop()
        try:
            for call in (client.get("/k"), client.put("/k", "w"), client.lease_grant(5), client.watch("/k").open()):
                started = time.monotonic()
                with pytest.raises(EtcdTimeout):
                    await call
                assert 0.9 < time.monotonic() - started < 2
            started = time.monotonic()
            with pytest.raises(EtcdTimeout):
                await client.get("/k", timeout=0.3)
            assert time.monotonic() - started < 1
        finally:
            member.sigcont()
        # The timed-out put sat in the stopped member's socket buffer and is usually applied now:
        # "outcome unknown" is meant literally, and is why such writes are not repeated.
        assert (await client.get("/k")).value in (b"v", b"w")  # type: ignore[union-attr]


async def test_unreachable_endpoint_fails_with_reasons() -> None:
    from helpers import free_port

    ep = f"http://127.0.0.1:{free_port()}"
    async with EtcdClient([ep], timeout=0.5) as client:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable) as exc:
            await client.get("/k")
        assert time.monotonic() - started < 1.5
        assert ep in exc.value.reasons and "connect" in exc.value.reasons[ep]


async def test_mirror_survives_a_failing_callback(client: EtcdClient) -> None:
    p = unique("callback")
    calls: list[object] = []

    def on_change(change: object) -> None:
        calls.append(change)
        if len(calls) == 2:
            raise RuntimeError("a consumer bug")

    async with KeyMirror(client, p, on_change=on_change) as mirror:
        await mirror.wait_ready(10)
        await client.put(p + "a", "1")  # the callback raises on this one
        await client.put(p + "b", "2")
        await mirror.wait_for(lambda d: set(d) == {p + "a", p + "b"}, 10)
        await wait_until(lambda: len(calls) == 3, timeout=10, what="the callback for every change")
        assert mirror.revision == (await client.get(p + "b")).mod_revision  # type: ignore[union-attr]


# --- clusters ----------------------------------------------------------------------------------


async def _leader_and_followers(cluster: EtcdCluster) -> tuple[str, list[str]]:
    member = await cluster.raft_leader()
    assert member is not None, "the cluster has no leader"
    return member.client_url, [ep for ep in cluster.endpoints if ep != member.client_url]


async def test_failover_when_current_member_is_killed(etcd_cluster3: EtcdCluster) -> None:  # noqa: F811
    cluster = etcd_cluster3
    leader, followers = await _leader_and_followers(cluster)
    # Put a follower first, so the killed member is the client's current one but not the leader
    # (killing the leader is the next test).
    async with cluster.client(endpoints=[followers[0], leader, followers[1]], timeout=3) as client:
        p = unique("failover")
        lease = await client.lease_grant(30)
        await client.put(p + "k", "1", lease=lease.id)
        assert client.current_endpoint == followers[0]
        victim = cluster.member_at(followers[0])
        victim.kill()
        try:
            started = time.monotonic()
            assert (await client.get(p + "k")).value == b"1"  # type: ignore[union-attr]
            assert client.current_endpoint != followers[0]
            await client.put(p + "k", "2")  # a write fails over too: the connect was refused
            assert await client.lease_keepalive_once(lease.id) == 30
            assert (await client.txn([Compare.value(p + "k", "==", "2")], [Op.put(p + "k", "3")])).succeeded
            assert time.monotonic() - started < 3
            # A watch started now lands on a live member.
            async with client.watch(p) as w:
                assert w.endpoint != followers[0]
        finally:
            victim.start()
            await victim.wait_healthy()


async def test_reads_and_keepalives_survive_leader_loss(etcd_cluster3: EtcdCluster) -> None:  # noqa: F811
    cluster = etcd_cluster3
    leader, followers = await _leader_and_followers(cluster)
    async with cluster.client(endpoints=[leader, *followers], timeout=5) as client:
        p = unique("leaderloss")
        lease = await client.lease_grant(30)
        await client.put(p + "k", "1")
        victim = cluster.member_at(leader)
        victim.kill()
        try:
            # Reads and keep-alives are retried until a new leader is elected (about a second here).
            started = time.monotonic()
            assert (await client.get(p + "k")).value == b"1"  # type: ignore[union-attr]
            assert await client.lease_keepalive_once(lease.id) == 30
            assert time.monotonic() - started < 5
        finally:
            victim.start()
            await victim.wait_healthy()


async def test_member_without_leader_fails_fast(etcd_cluster3: EtcdCluster) -> None:  # noqa: F811
    cluster = etcd_cluster3
    lonely, *others = cluster.members
    async with (
        cluster.client(endpoints=[lonely.client_url], timeout=1) as client,
        cluster.client(endpoints=[lonely.client_url], timeout=1, require_leader=False) as blind,
    ):
        await client.put("/noleader", "v")
        watch = await client.watch("/noleader").open()
        blind_watch = await blind.watch("/noleader").open()
        for m in others:
            m.sigstop()
        try:

            async def leaderless() -> bool:
                return (await blind.status(timeout=0.5)).leader == 0

            await wait_until(leaderless, timeout=10, what="the lonely member to lose its leader")
            started = time.monotonic()
            with pytest.raises(EtcdNoLeader, match="no leader"):
                await client.get("/noleader")
            assert time.monotonic() - started < 1.5
            # Without hasleader the same read just hangs until the deadline...
            with pytest.raises(EtcdTimeout):
                await blind.get("/noleader")
            # ... and a watch without it keeps receiving (stale) progress notifications, while
            # etcd cancels ours.
            with pytest.raises(EtcdNoLeader):
                async with asyncio.timeout(10):
                    async for _ in watch:
                        pass
            assert (await take(blind_watch, 1))[0].progress
        finally:
            for m in others:
                m.sigcont()
            blind_watch.close()
        for m in cluster.members:
            await m.wait_healthy()


# --- TLS ---------------------------------------------------------------------------------------


async def test_tls_with_client_certificate(etcd_tls: EtcdCluster) -> None:  # noqa: F811
    async with etcd_tls.client(timeout=3) as client:
        await client.put("/tls/k", "v")
        assert (await client.get("/tls/k")).value == b"v"  # type: ignore[union-attr]
        async with client.watch("/tls/") as w:
            await client.put("/tls/k", "w")
            assert (await take(w, 1))[0].events[0].kv.value == b"w"


async def test_tls_errors_are_clear(etcd_tls: EtcdCluster) -> None:  # noqa: F811
    tls = etcd_tls.tls
    assert tls is not None
    ep = etcd_tls.endpoints[0]
    cases = [
        ({"ca_file": tls.other_ca, "cert_file": tls.client_cert, "key_file": tls.client_key}, "not trusted by ca_file"),
        ({"ca_file": tls.ca}, "refused the client certificate"),
        (
            {"ca_file": tls.ca, "cert_file": tls.other_client_cert, "key_file": tls.other_client_key},
            "--trusted-ca-file",
        ),
    ]
    for kw, needle in cases:
        async with EtcdClient([ep], timeout=3, **kw) as client:
            started = time.monotonic()
            with pytest.raises(EtcdTLSError, match=needle):
                await client.get("/tls/k")
            assert time.monotonic() - started < 2  # not retried until the deadline
    # etcd's TLS port just drops plain HTTP; the reason says what to check.
    async with EtcdClient([ep.replace("https://", "http://")], timeout=0.5) as client:
        with pytest.raises(EtcdUnavailable, match="write it as https://"):
            await client.get("/tls/k")
    with pytest.raises(EtcdTLSError, match="CA file"):
        EtcdClient([ep], ca_file="/nonexistent/ca.pem")


# --- auth --------------------------------------------------------------------------------------


async def test_auth_user_limited_to_its_prefix(etcd_auth: EtcdCluster) -> None:  # noqa: F811
    with structlog.testing.capture_logs() as logs:
        async with etcd_auth.client(user=USER, password=USER_PASSWORD, timeout=3) as client:
            await client.put("/gpufleet/a", "1")
            assert (await client.get("/gpufleet/a")).value == b"1"  # type: ignore[union-attr]
            assert [kv.key for kv in (await client.get_prefix("/gpufleet/")).kvs] == [b"/gpufleet/a"]
            async with client.watch("/gpufleet/") as w:
                await client.put("/gpufleet/b", "2")
                assert (await take(w, 1))[0].events[0].kv.key == b"/gpufleet/b"
            with pytest.raises(EtcdAuthError, match="permission denied"):
                await client.put("/other/a", "1")
            with pytest.raises(EtcdAuthError, match="permission denied"):
                await client.get("/other/a")
            with pytest.raises(EtcdAuthError, match="permission denied"):
                await client.watch("/other/").open()
            token = client.transport._token
    assert token and token not in repr(logs) and USER_PASSWORD not in repr(logs)


async def test_auth_errors_are_clear(etcd_auth: EtcdCluster) -> None:  # noqa: F811
    async with etcd_auth.client(user=USER, password="wrong-password", timeout=3) as client:
        with pytest.raises(EtcdAuthError, match=f"authentication as user '{USER}' failed") as exc:
            await client.get("/gpufleet/a")
        assert "wrong-password" not in str(exc.value)
    async with EtcdClient(etcd_auth.endpoints, timeout=3) as anonymous:
        with pytest.raises(EtcdAuthError, match="user name is empty"):
            await anonymous.get("/gpufleet/a")


async def test_auth_token_expiry_reauthenticates(etcd_auth: EtcdCluster) -> None:  # noqa: F811
    member = etcd_auth.members[0]
    async with etcd_auth.client(user=USER, password=USER_PASSWORD, timeout=5) as client:
        await client.put("/gpufleet/t", "1")
        first = client.transport._token
        assert first
        # The member forgets a simple token after --auth-token-ttl (2 s) without use; its log says when.
        await wait_until(lambda: f'"token":"{first}"' in member.log_path.read_text(), timeout=15, what="token expiry")
        # Many callers find the token stale at once; they share one re-authentication.
        with structlog.testing.capture_logs() as logs:
            got = await asyncio.gather(*(client.get("/gpufleet/t") for _ in range(10)))
        assert all(kv is not None and kv.value == b"1" for kv in got)
        assert sum(e["event"] == "etcd authenticated" for e in logs) == 1
        second = client.transport._token
        assert second and second != first
        # Across a member restart calls go on working (etcd 3.4 replays the token's grant from its
        # WAL; where it does not, the stale token is renewed the same way).
        member.restart()
        await member.wait_healthy()
        await client.put("/gpufleet/t", "2")
        assert (await client.get("/gpufleet/t")).value == b"2"  # type: ignore[union-attr]
