"""The leader's route writes: each model's route as a header and slices, only what changed.

Thin I/O around policy/slicing.py. The writer mirrors the headers and the slices (every
replica does, so a new leader starts from what is in etcd) and keeps what this term wrote,
which is compared before the mirrors catch up with our own writes. A model's writes go in one
transaction when they fit (readers then apply them at once); a bigger rewrite (a new leader
stamping its epoch on 400 slices) is split in order, and readers keep the previous route until
its header and every slice it lists agree (gpufleet/routeslices.py).

A schema-1 route (one value with every endpoint, from before slices) is read as the previous
route and rewritten as header and slices on the first pass: the migration needs nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from gpufleet.etcd import EtcdClient, KeyMirror, Op
from gpufleet.keyspace import Keyspace, decode_or_skip, encode
from gpufleet.keyspace.records import RouteRecord, RouteSlice
from gpufleet.routeslices import decode_slice

from .election import Election
from .metrics import CoordinatorMetrics
from .policy.routes import RoutePlan
from .policy.slicing import DEFAULT_SLICE_LIMITS, SliceLimits, WritePolicy, plan_write

_Record = RouteRecord | RouteSlice


class WriteCount(NamedTuple):
    writes: int  # headers and slices put
    deletes: int  # headers and slices deleted
    bytes: int  # bytes of the values put
    txns: int  # transactions


class RouteWriter:
    def __init__(
        self,
        etcd: EtcdClient,
        keys: Keyspace,
        election: Election,
        metrics: CoordinatorMetrics,
        limits: SliceLimits = DEFAULT_SLICE_LIMITS,
    ) -> None:
        self.keys = keys
        self.election = election
        self.metrics = metrics
        self.limits = limits
        self.headers = KeyMirror(etcd, keys.routes)
        self.slices = KeyMirror(etcd, keys.route_slices)
        # key -> what this term wrote there (None: deleted), until the term ends
        self._written: dict[str, _Record | None] = {}
        # slice key -> when this term last wrote it (monotonic): drifted weights wait for it
        self._written_at: dict[str, float] = {}
        # key -> (mod revision, record): decoding 400 slices on every pass would dominate
        self._decoded: dict[str, tuple[int, _Record | None]] = {}

    def mirrors(self) -> tuple[KeyMirror, KeyMirror]:
        return self.headers, self.slices

    def start_term(self) -> None:
        self._written.clear()
        self._written_at.clear()

    def forget_decoded(self) -> None:
        """etcd's history went backwards: revisions now name other writes."""
        self._decoded.clear()

    async def write(self, plan: RoutePlan, policy: WritePolicy, drift_interval_s: float, now: float) -> WriteCount:
        """Write what changed (``now``: monotonic; a slice's drifted weights are written
        ``drift_interval_s`` after this term last wrote it, or with its next urgent write)."""
        headers, slices = self._current()
        puts: list[Op] = []
        header_puts: list[Op] = []
        deletes: list[Op] = []
        written: dict[str, _Record | None] = {}
        for model, rec in plan.routes.items():
            have = slices.get(model, {})
            due = self._drift_due(model, now - drift_interval_s)
            w, _, _ = plan_write(rec, headers.get(model), have, policy, self.limits, due)
            for s in w.slices:
                key = self.keys.route_slice(model, s.slice)
                puts.append(Op.put(key, encode(s)))
                written[key] = s
            if w.header is not None:
                key = self.keys.route(model)
                header_puts.append(Op.put(key, encode(w.header)))
                written[key] = w.header
            for n in w.deletes:
                key = self.keys.route_slice(model, n)
                deletes.append(Op.delete(key))
                written[key] = None
        for model in headers.keys() - plan.routes.keys():  # no instance anywhere now
            key = self.keys.route(model)
            header_puts.append(Op.delete(key))  # the header goes first: the model is gone at once
            written[key] = None
        for model in slices.keys() - plan.routes.keys():
            for n in slices[model]:
                key = self.keys.route_slice(model, n)
                deletes.append(Op.delete(key))
                written[key] = None
        ops = puts + header_puts + deletes
        if not ops:
            return WriteCount(0, 0, 0, 0)
        txns = await self.election.guarded_writes(ops)
        # Only what was written: the next pass compares with the record in etcd, so weights
        # that each moved a little are written once their moves add up.
        self._written.update(written)
        for key, rec in written.items():
            if isinstance(rec, RouteSlice):
                self._written_at[key] = now
        put_bytes = sum(len(op.request.get("value", "")) * 3 // 4 for op in ops if op.kind == "put")
        n_deletes = sum(1 for v in written.values() if v is None)
        self.metrics.route_writes.inc(len(ops))
        self.metrics.route_write_bytes.inc(put_bytes)
        return WriteCount(len(ops) - n_deletes, n_deletes, put_bytes, txns)

    def _drift_due(self, model: str, written_before: float) -> Callable[[int], bool]:
        def due(n: int) -> bool:
            return self._written_at.get(self.keys.route_slice(model, n), float("-inf")) <= written_before

        return due

    def _current(self) -> tuple[dict[str, RouteRecord], dict[str, dict[int, RouteSlice]]]:
        """What etcd holds (as far as the mirrors and this term's writes tell): headers by model,
        slices by model and number."""
        headers: dict[str, RouteRecord] = {}
        slices: dict[str, dict[int, RouteSlice]] = {}
        for key, rec in self._records():
            if isinstance(rec, RouteRecord):
                headers[Keyspace.name_in(self.keys.routes, key)] = rec
            else:
                slices.setdefault(rec.model, {})[rec.slice] = rec
        return headers, slices

    def _records(self) -> list[tuple[str, _Record]]:
        recs: dict[str, _Record | None] = {}
        for mirror in (self.headers, self.slices):
            for key, kv in mirror.data.items():
                recs[key] = self._decode(key, kv.value, kv.mod_revision, mirror is self.headers)
        recs.update(self._written)
        if len(self._decoded) > 2 * (len(self.headers.data) + len(self.slices.data)) + 100:
            self._decoded = {k: v for k, v in self._decoded.items() if k in recs}
        return [(k, r) for k, r in recs.items() if r is not None]

    def _decode(self, key: str, value: bytes, rev: int, header: bool) -> _Record | None:
        """Decoded once per revision (so a bad record is logged once, too)."""
        hit = self._decoded.get(key)
        if hit is not None and hit[0] == rev:
            return hit[1]
        rec = decode_or_skip(key, value, RouteRecord, rev) if header else decode_slice(self.keys, key, value, rev)
        self._decoded[key] = (rev, rec)
        return rec
