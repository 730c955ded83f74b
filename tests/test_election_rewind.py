"""Leader election when etcd's history goes backwards (restored from a backup, or wiped).

In-process elections against a real etcd of the test's own: epochs keep growing across the
disaster (from ``/epoch``, from what a coordinator has seen, from its state file), and the fence
tells a deposed leader's key from a new one created at the same revision of the new history.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_fixtures import EtcdCluster

from coordinator.election import Election, NotLeader
from gpufleet.etcd import Op
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import LeaderRecord

pytestmark = pytest.mark.timeout(60)
KEYS = Keyspace("rewind")


@pytest.fixture
def etcd_own() -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(1).start()
    yield cluster
    cluster.destroy()


def election(etcd, name: str, epoch_file: Path | None = None) -> Election:  # type: ignore[no-untyped-def]
    return Election(etcd, KEYS, name, f"http://{name}", ttl=5, renew_deadline=4, retry_period=1, epoch_file=epoch_file)


async def test_epochs_keep_growing_when_etcd_is_wiped(etcd_own: EtcdCluster, tmp_path: Path) -> None:
    state = tmp_path / "state" / "epoch"
    async with etcd_own.client(timeout=5) as etcd:
        for i in range(30):  # a cluster with some history: revisions well above what a wipe leaves
            await etcd.put(f"/other/{i}", "x")
        a = election(etcd, "a", state)
        assert await a._campaign()
        first = a.epoch
        assert first is not None and first > 30
        kv = await etcd.get(KEYS.leader)
        assert kv is not None and decode(kv.value, LeaderRecord).epoch == first
        await a.resign()

        b = election(etcd, "b")  # keeps running across the wipe: remembers in memory
        assert await b._campaign() and b.epoch is not None and b.epoch > first
        await b.resign()
        etcd_own.wipe()
        assert await b._campaign(), "an empty store: b leads again"
        assert b.epoch is not None and b.highest_epoch == b.epoch
        second = b.epoch
        assert second > first, "the epoch went backwards across the wipe"
        await b.resign()

        etcd_own.wipe()  # ... and once more, now with every coordinator restarted: only a's file knows
        restarted = election(etcd, "a", state)
        assert restarted.highest_epoch == first
        assert await restarted._campaign() and restarted.epoch is not None and restarted.epoch > first
        # A newcomer that never saw any of it still gets above the restarted one: /epoch.
        third = restarted.epoch
        await restarted.resign()
        newcomer = election(etcd, "c")
        assert await newcomer._campaign() and newcomer.epoch is not None and newcomer.epoch > third


async def test_standby_learns_the_epoch_it_must_exceed(etcd_own: EtcdCluster) -> None:
    async with etcd_own.client(timeout=5) as etcd:
        a, b = election(etcd, "a"), election(etcd, "b")
        assert await a._campaign()
        assert not await b._campaign()
        assert b.highest_epoch == a.epoch


async def test_a_deposed_leader_is_fenced_when_a_restore_reuses_its_key_revision(
    etcd_own: EtcdCluster, tmp_path: Path
) -> None:
    """A backup from before ``a`` was elected is restored; ``b`` is then elected at the very
    revision at which ``a``'s key had been created. ``a`` still believes it leads (its renew
    deadline has not passed): its writes must be refused."""
    async with etcd_own.client(timeout=5) as etcd:
        await etcd.put("/other/x", "x")
        backup = etcd_own.snapshot_save(tmp_path / "backup.db")
        a, b = election(etcd, "a"), election(etcd, "b")
        assert await a._campaign()
        await a.guarded_txn([Op.put(KEYS.route("x"), b"from-a-1")])
        a_key = await etcd.get(KEYS.leader)
        assert a_key is not None
        b.highest_epoch = a.epoch or 0  # b stood by under a (as _stand_by records it)
        etcd_own.restore(backup)
        assert await b._campaign()
        b_key = await etcd.get(KEYS.leader)
        assert b_key is not None and b_key.create_revision == a_key.create_revision  # the same revision
        assert b.epoch is not None and a.epoch is not None and b.epoch > a.epoch
        assert a.is_leader
        with pytest.raises(NotLeader):
            await a.guarded_txn([Op.put(KEYS.route("x"), b"from-a-2")])
        assert not a.is_leader and a.guard_rejections == 1
        assert await etcd.get(KEYS.route("x")) is None  # the restored store never had a's write
        await b.guarded_txn([Op.put(KEYS.route("x"), b"from-b")])
