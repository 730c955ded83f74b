"""Leader election on etcd with fencing, the way Patroni and Kubernetes do it.

- Campaign: one transaction creates ``/leader`` under our lease *only if absent*
  (``create_revision == 0``) and records the term's **epoch** in it and in ``/epoch``.
- Lead: renew the lease every ``retry_period_s``. If no renewal succeeded for
  ``renew_deadline_s`` (< TTL, counted from when the renewal that succeeded was *sent*: etcd
  restarts the TTL somewhere before its answer), stop acting as leader *before* the lease can
  expire and someone else take over. Also step down if the key goes away or stops being ours.
- Fence: every write the leader makes is a transaction guarded by "``/leader`` still exists with
  my create revision and my lease" (:meth:`guarded_txn`); a deposed leader that wakes from a
  freeze cannot write, whatever it believes.
- Stand by: watch the key and campaign when it is deleted (lease expired or revoked).

Epochs survive the operator's disaster recovery. The epoch used to be the key's create
revision, which grows with every term, until etcd is restored from a backup or wiped: then
revisions start over and the next leader's epoch went backwards (3 -> 2), so anything that orders
terms by epoch took the new leader for an old one. Now a campaign picks
``max(/epoch, the highest epoch this coordinator has seen, the store's revision) + 1``: ``/epoch``
carries it across ordinary terms, the coordinators' memory across a restore (they keep running
while etcd is restored), and a file in systemd's ``StateDirectory`` across a restore together
with a restart of every coordinator. The store's revision keeps epochs above those of clusters
that ran an older version (where the epoch was the create revision).

The fence itself does not use the epoch: it compares the key's create revision *and* its lease.
After a restore, a new leader's key can be created at the very revision at which a deposed
leader's key was in the old history; lease ids are never reused, so the two cannot be confused.

``is_leader`` is the one question the leader loop asks before deciding anything; it is true only
while the renew deadline holds, so a frozen process that resumes sees False at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from gpufleet.etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    EtcdHistoryLost,
    EtcdLeaseNotFound,
    KeyValue,
    Op,
    RangeResult,
    TxnResult,
)
from gpufleet.fileio import atomic_write_bytes
from gpufleet.keyspace import Keyspace, decode_or_skip, encode
from gpufleet.keyspace.records import LeaderRecord, epoch_of
from gpufleet.tasks import wait_set

log = structlog.get_logger("coordinator.election")

MAX_TXN_OPS = 100  # etcd's default --max-txn-ops is 128
MAX_TXN_BYTES = 1 << 20  # etcd's default --max-request-bytes is 1.5 MiB


class NotLeader(Exception):
    """A guarded write was refused: our leader key is gone or belongs to a newer epoch."""


def txn_batches(ops: list[Op], max_ops: int = MAX_TXN_OPS, max_bytes: int = MAX_TXN_BYTES) -> list[list[Op]]:
    """``ops`` cut, in order, into runs of at most ``max_ops`` ops and ``max_bytes`` bytes
    (an op bigger than ``max_bytes`` alone is a run of its own: etcd will say if it is too big)."""
    out: list[list[Op]] = []
    run: list[Op] = []
    size = 0
    for op in ops:
        n = op.size
        if run and (len(run) >= max_ops or size + n > max_bytes):
            out.append(run)
            run, size = [], 0
        run.append(op)
        size += n
    if run:
        out.append(run)
    return out


class Election:
    def __init__(
        self,
        etcd: EtcdClient,
        keys: Keyspace,
        me: str,
        address: str,
        *,
        ttl: int = 15,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_change: Callable[[], None] | None = None,
        on_rejected: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        epoch_file: Path | None = None,
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.me = me
        self.address = address
        self.ttl = ttl
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_change = on_change or (lambda: None)
        self.on_rejected = on_rejected or (lambda: None)
        self.clock = clock
        self.epoch: int | None = None
        self.lease_id: int | None = None
        self._key_revision = 0  # create revision of our /leader key: the fence, with our lease
        # The highest epoch this coordinator has seen (led or stood by), kept in ``epoch_file``
        # when there is one: the floor of the next epoch (see top).
        self._epoch_file = epoch_file
        self.highest_epoch = _read_epoch(epoch_file)
        self.leader: str | None = None  # who leads, as far as we know
        self.leader_epoch: int | None = None
        self.elected_at: float | None = None
        self.transitions = 0
        self.guard_rejections = 0
        self._renewed_at = 0.0
        self._deposed = asyncio.Event()

    # --- what the rest of the coordinator asks ------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.epoch is not None and self.clock() - self._renewed_at < self.renew_deadline

    async def guarded_txn(self, ops: list[Op], *, extra: list[Compare] | None = None) -> TxnResult:
        """Run ``ops`` only if we still hold the leader key at our epoch; else NotLeader."""
        epoch = self.epoch
        if epoch is None or not self.is_leader:
            raise NotLeader("not the leader")
        compares = [
            Compare.create_revision(self.keys.leader, "==", self._key_revision),
            Compare.lease(self.keys.leader, "==", self.lease_id or 0),
            *(extra or []),
        ]
        res = await self.etcd.txn(compares, ops, [Op.get(self.keys.leader)])
        if not res.succeeded:
            # Either our key is gone (someone leads at a higher epoch) or an extra compare failed.
            current = await self.etcd.get(self.keys.leader)
            if not self._owns(current):
                self.guard_rejections += 1
                self.on_rejected()
                log.error(
                    "write rejected by the epoch guard; stepping down",
                    epoch=epoch,
                    current_epoch=self._epoch_of(current) if current else None,
                )
                self._step_down("epoch guard rejected a write")
                raise NotLeader(f"epoch {epoch} is no longer the leader")
        return res

    async def guarded_writes(self, ops: list[Op]) -> int:
        """``ops`` through :meth:`guarded_txn`, in order, in transactions within etcd's limits
        (ops per transaction, request bytes); all in one when they fit. Returns how many."""
        txns = 0
        for batch in txn_batches(ops):
            await self.guarded_txn(batch)
            txns += 1
        return txns

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Campaign, lead, stand by, forever (until cancelled)."""
        while True:
            try:
                if await self._campaign():
                    await self._lead()
                else:
                    await self._stand_by()
            except asyncio.CancelledError:
                raise
            except EtcdError as e:
                if self.epoch is not None and not self.is_leader:
                    self._step_down(f"etcd unreachable past the renew deadline: {e}")
                log.warning("election: etcd error, retrying", error=str(e))
                await asyncio.sleep(self.retry_period)
            except Exception as e:  # never let a bug end the election loop
                log.exception("election loop error", error=str(e))
                await asyncio.sleep(self.retry_period)

    async def resign(self) -> None:
        """Graceful stop: revoke our lease so a standby takes over at once."""
        lease, self.lease_id = self.lease_id, None
        if self.epoch is not None:
            self._step_down("resigned")
        if lease is not None:
            with contextlib.suppress(EtcdError):
                await self.etcd.lease_revoke(lease, timeout=2.0)

    async def _campaign(self) -> bool:
        # The lease's TTL runs from some moment between this request and its answer; counting the
        # renew deadline from before it was sent is the safe end (a slow campaign, or a slow
        # renewal below, must not stretch the time we believe we lead past the lease).
        asked_at = self.clock()
        lease = await self.etcd.lease_grant(self.ttl)
        last = await self.etcd.range(self.keys.epoch)
        last_kv = last.kvs[0] if last.kvs else None
        epoch = max(_parse_epoch(last_kv), self.highest_epoch, last.revision) + 1
        record = LeaderRecord(coordinator=self.me, address=self.address, elected_at=time.time(), epoch=epoch)
        res = await self.etcd.txn(
            [
                Compare.create_revision(self.keys.leader, "==", 0),
                # Nobody moved the epoch since we read it (else read it again next campaign).
                Compare.mod_revision(self.keys.epoch, "==", last_kv.mod_revision if last_kv else 0),
            ],
            [Op.put(self.keys.leader, encode(record), lease=lease.id), Op.put(self.keys.epoch, str(epoch))],
            [Op.get(self.keys.leader)],
        )
        if not res.succeeded:
            held = res.responses[0] if res.responses else None
            if isinstance(held, RangeResult) and held.kvs:
                self._saw_epoch(self._epoch_of(held.kvs[0]))  # someone leads: their epoch is a floor
            with contextlib.suppress(EtcdError):
                await self.etcd.lease_revoke(lease.id)
            return False
        self.lease_id = lease.id
        self._key_revision = res.revision  # the put created the key: its create revision is this txn's
        self.epoch = epoch
        self._saw_epoch(epoch)
        self._renewed_at = asked_at
        self.elected_at = time.time()
        self.leader, self.leader_epoch = self.me, self.epoch
        self.transitions += 1
        self._deposed.clear()
        log.info("elected leader", epoch=self.epoch, lease=lease.id, ttl=self.ttl)
        self.on_change()
        return True

    async def _lead(self) -> None:
        """Renew until we cannot; return after stepping down."""
        watcher = asyncio.create_task(self._watch_own_key())
        try:
            while self.epoch is not None:
                try:
                    asked_at = self.clock()  # the renewal counts from here (see _campaign)
                    ttl = await self.etcd.lease_keepalive_once(self.lease_id or 0, timeout=self.retry_period)
                    if ttl <= 0:
                        raise EtcdLeaseNotFound("lease expired")
                    self._renewed_at = asked_at
                except EtcdLeaseNotFound:
                    self._step_down("lease expired")
                    break
                except EtcdError as e:
                    if not self.is_leader:
                        self._step_down(f"could not renew within {self.renew_deadline:g}s: {e}")
                        break
                    log.warning("lease renewal failed; retrying", error=str(e))
                if not self.is_leader:  # e.g. the process was frozen past the deadline
                    self._step_down("renew deadline passed")
                    break
                await wait_set(self._deposed, self.retry_period)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        # Give up the old lease (if it still exists) so it cannot hold a key we no longer own.
        lease, self.lease_id = self.lease_id, None
        if lease is not None:
            with contextlib.suppress(EtcdError):
                await self.etcd.lease_revoke(lease, timeout=2.0)

    async def _watch_own_key(self) -> None:
        """Step down at once if the leader key is deleted or replaced (an operator, a bug, or
        etcd restored from a backup in which the key is someone else's or absent)."""
        epoch = self.epoch
        start = self._key_revision + 1
        while self.epoch == epoch:
            try:
                async with self.etcd.watch(self.keys.leader, prefix=False, start_revision=start) as w:
                    async for resp in w:
                        for ev in resp.events:
                            if ev.type == "DELETE" or not self._owns(ev.kv):
                                self._step_down("leader key deleted or replaced")
                                return
                        start = w.next_revision
            except asyncio.CancelledError:
                raise
            except EtcdHistoryLost:
                # The revisions we watched from belong to a history that is gone: look at the key
                # as the restored store has it, and watch on from there.
                try:
                    current = await self.etcd.range(self.keys.leader)
                except EtcdError:  # not from this watcher task's caller: retry here
                    await asyncio.sleep(self.retry_period)
                    continue
                if not self._owns(current.kvs[0] if current.kvs else None):
                    self._step_down("leader key lost: etcd's history went backwards (restored or wiped)")
                    return
                start = current.revision + 1
            except EtcdError:
                await asyncio.sleep(self.retry_period)

    def _owns(self, kv: KeyValue | None) -> bool:
        """Whether ``kv`` is our leader key: our create revision and our lease (see top)."""
        return (
            kv is not None
            and self.lease_id is not None
            and kv.create_revision == self._key_revision
            and kv.lease == self.lease_id
        )

    def _epoch_of(self, kv: KeyValue) -> int:
        return epoch_of(decode_or_skip(kv.key_str, kv.value, LeaderRecord, kv.mod_revision), kv.create_revision)

    def _saw_epoch(self, epoch: int) -> None:
        """Remember the highest epoch seen, on disk too when there is a place for it."""
        if epoch <= self.highest_epoch:
            return
        self.highest_epoch = epoch
        if self._epoch_file is not None:
            try:
                atomic_write_bytes(self._epoch_file, f"{epoch}\n".encode(), mode=0o600)
            except OSError as e:  # the floor in etcd and in memory still hold
                log.warning("could not record the epoch", path=str(self._epoch_file), error=str(e))

    def _step_down(self, why: str) -> None:
        if self.epoch is None:
            return
        log.warning("stepping down", epoch=self.epoch, reason=why)
        self.epoch = None
        self.leader = None
        self.transitions += 1
        self._deposed.set()
        self.on_change()

    async def _stand_by(self) -> None:
        """Wait until the leader key is gone, then return to campaign."""
        kv = await self.etcd.get(self.keys.leader)
        if kv is None:
            return
        rec = decode_or_skip(kv.key_str, kv.value, LeaderRecord, kv.mod_revision)
        epoch = epoch_of(rec, kv.create_revision)
        self._saw_epoch(epoch)
        if (self.leader, self.leader_epoch) != (rec.coordinator if rec else "?", epoch):
            self.leader, self.leader_epoch = (rec.coordinator if rec else "?"), epoch
            log.info("standing by", leader=self.leader, epoch=self.leader_epoch)
            self.on_change()
        async with self.etcd.watch(self.keys.leader, prefix=False, start_revision=kv.mod_revision + 1) as w:
            async for resp in w:
                if any(ev.type == "DELETE" for ev in resp.events):
                    log.info("leader key gone; campaigning", previous=self.leader, epoch=self.leader_epoch)
                    self.leader, self.leader_epoch = None, None
                    return


def _parse_epoch(kv: KeyValue | None) -> int:
    """``/epoch``'s value; 0 when absent or unreadable (the other floors still hold)."""
    if kv is None:
        return 0
    try:
        return max(0, int(kv.value))
    except ValueError:
        log.warning("unreadable epoch key ignored", key=kv.key_str, value=kv.value[:40])
        return 0


def _read_epoch(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return max(0, int(path.read_text().strip() or 0))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        log.warning("could not read the recorded epoch; starting from etcd's", path=str(path), error=str(e))
        return 0
