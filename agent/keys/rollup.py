"""Rolling the usage journal up into the node's usage record, exactly once.

Every ``ROLL_INTERVAL_S`` (and once more at a clean stop) the roller seals the journal's segment,
reads the node's ``UsageRecord`` (``/usage/<node>`` in etcd; ``usage/rolled.json`` standalone),
adds the sealed lines past the record's ``covers`` for this journal, and writes it back with a
compare-and-swap on what it read. Only after the write is acknowledged are those segments
deleted. A write whose outcome is unknown (etcd timed out), a crash between the write and the
delete, a restart that replays the journal: the next roll-up reads ``covers`` again and adds
only what is past it, so no line is counted twice and none is dropped before it is counted.

Size: hours older than ``KEEP_HOURS_S`` are folded into one row per key and model (``hour`` 0),
so totals since the start stay exact while ``gpuctl usage --since`` sees whole hours for the
last week; a record still over ``MAX_RECORD_BYTES`` (etcd refuses values over 1.5 MiB) folds its
oldest hours early, with a warning.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Protocol

import msgspec
import structlog

from gpufleet.backoff import HALF_JITTER, backoff_delay
from gpufleet.etcd import Compare, EtcdClient, EtcdError, Op
from gpufleet.fileio import atomic_write_bytes
from gpufleet.keyspace import Keyspace, decode_or_skip, encode
from gpufleet.keyspace.records import JournalMark, UsageRecord, UsageRow
from gpufleet.tasks import cancel_and_wait

from .journal import Totals, UsageJournal

log = structlog.get_logger("agent.keys.usage")

ROLL_INTERVAL_S = 5.0
KEEP_HOURS_S = 7 * 86400  # hour buckets kept; older ones summed into hour 0
MAX_RECORD_BYTES = 1 << 20
ROLLED_FILE = "rolled.json"  # a standalone agent's record, beside its journal
KEEP_JOURNALS = 16  # journal marks kept per node (one per state directory the node has had)
CAS_ATTEMPTS = 3
FINAL_ROLL_S = 3.0  # at a clean stop; what it cannot write waits in the journal for the next start


class UsageStoreError(Exception):
    """The stored record cannot be read: nothing is written over it."""


def merged(
    record: UsageRecord | None,
    node: str,
    journal_id: str,
    covers: int,
    adding: Totals,
    now: float,
    keep_s: float = KEEP_HOURS_S,
    max_bytes: int = MAX_RECORD_BYTES,
) -> UsageRecord:
    """``record`` plus ``adding``, marked as covering ``journal_id`` up to ``covers`` (pure)."""
    totals: Totals = {}
    for row in record.rows if record is not None else []:
        _add(
            totals, (row.key, row.model, row.hour), [row.requests, row.errors, row.prompt_tokens, row.completion_tokens]
        )
    for k, counts in adding.items():
        _add(totals, k, counts)
    cutoff = int((now - keep_s) // 3600) * 3600
    _fold_before(totals, cutoff)
    journals = dict(record.journals) if record is not None else {}
    journals[journal_id] = JournalMark(covers=covers, at=now)
    if len(journals) > KEEP_JOURNALS:  # the oldest state directories, long gone
        journals = dict(sorted(journals.items(), key=lambda kv: kv[1].at)[-KEEP_JOURNALS:])
    out = UsageRecord(node=node, updated_at=now, journals=journals, rows=_rows(totals))
    while len(encode(out)) > max_bytes:
        hours = sorted({h for (_, _, h) in totals if h > 0})
        if not hours:
            break  # keys × models alone are that many: nothing left to fold
        cutoff = hours[min(len(hours) - 1, 23)] + 3600  # a day at a time
        log.warning("usage record too large; folding hours early", node=node, folded_before=cutoff)
        _fold_before(totals, cutoff)
        out.rows = _rows(totals)
    return out


def _add(totals: Totals, k: tuple[str, str, int], counts: list[int]) -> None:
    into = totals.setdefault(k, [0, 0, 0, 0])
    for i in range(4):
        into[i] += counts[i]


def _fold_before(totals: Totals, cutoff: int) -> None:
    for k in [k for k in totals if 0 < k[2] < cutoff]:
        _add(totals, (k[0], k[1], 0), totals.pop(k))


def _rows(totals: Totals) -> list[UsageRow]:
    return [UsageRow(key, model, hour, *counts) for (key, model, hour), counts in sorted(totals.items())]


class UsageStore(Protocol):
    """Where a node's usage record lives. ``version`` is what ``save`` compares against."""

    async def load(self) -> tuple[UsageRecord | None, object]: ...
    async def save(self, record: UsageRecord, version: object) -> bool: ...  # False: changed meanwhile


class EtcdUsageStore:
    def __init__(self, etcd: EtcdClient, keys: Keyspace, node: str) -> None:
        self.etcd, self.key = etcd, keys.node_usage(node)

    async def load(self) -> tuple[UsageRecord | None, object]:
        kv = await self.etcd.get(self.key)
        if kv is None:
            return None, 0
        rec = decode_or_skip(kv.key_str, kv.value, UsageRecord, kv.mod_revision)
        if rec is None:
            raise UsageStoreError(f"{self.key} does not hold a usage record; fix or remove it with etcdctl")
        return rec, kv.mod_revision

    async def save(self, record: UsageRecord, version: object) -> bool:
        assert isinstance(version, int)
        guard = Compare.absent(self.key) if version == 0 else Compare.mod_revision(self.key, "=", version)
        res = await self.etcd.txn([guard], [Op.put(self.key, encode(record))])
        return res.succeeded


class FileUsageStore:
    """A standalone agent's record: ``rolled.json`` beside the journal, replaced atomically and
    fsynced (file and directory) before the journal's segments go."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def load(self) -> tuple[UsageRecord | None, object]:
        return read_rolled(self.path), None

    async def save(self, record: UsageRecord, version: object) -> bool:
        atomic_write_bytes(self.path, encode(record), 0o600)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True


def read_rolled(path: Path) -> UsageRecord | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return msgspec.json.decode(data, type=UsageRecord)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise UsageStoreError(f"{path}: not a usage record: {e}") from None


class UsageRoller:
    def __init__(
        self, journal: UsageJournal, store: UsageStore, node: str, interval_s: float = ROLL_INTERVAL_S
    ) -> None:
        self.journal, self.store, self.node, self.interval_s = journal, store, node, interval_s
        self._task: asyncio.Task[None] | None = None

    async def roll_once(self) -> None:
        """Seal, add what the record does not cover yet, write it, drop what it now covers."""
        journal = self.journal
        journal.seal()
        for _ in range(CAS_ATTEMPTS):
            if not journal.sealed:
                return
            record, version = await self.store.load()
            mark = record.journals.get(journal.journal_id) if record is not None else None
            covered = mark.covers if mark is not None else 0
            adding, last = journal.after(covered)
            if last > covered:
                new = merged(record, self.node, journal.journal_id, last, adding, time.time())
                if not await self.store.save(new, version):
                    continue  # changed since we read it (a write of ours acknowledged late): read again
                covered = last
            journal.release(covered)
            return
        raise UsageStoreError(f"the usage record of node {self.node} keeps changing under us (another agent?)")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="usage roll-up")

    async def _loop(self) -> None:
        failures = 0
        while True:
            try:
                await self.roll_once()
                if failures:
                    log.info("usage roll-up works again", node=self.node, failed_attempts=failures)
                failures = 0
            except (EtcdError, OSError, UsageStoreError) as e:
                if failures == 0:
                    log.warning("usage roll-up failed; the journal keeps the usage and it is retried", error=str(e))
                failures += 1
            delay = (
                self.interval_s if failures == 0 else backoff_delay(failures - 1, self.interval_s, 60.0, HALF_JITTER)
            )
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Stop the loop, then one last roll-up (bounded): a clean restart leaves nothing behind."""
        await cancel_and_wait(self._task)
        self._task = None
        try:
            async with asyncio.timeout(FINAL_ROLL_S):
                await self.roll_once()
        except (TimeoutError, EtcdError, OSError, UsageStoreError) as e:
            log.warning("last usage roll-up not done; the journal keeps it for the next start", error=str(e))
