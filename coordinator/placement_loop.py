"""The leader's placement loop: registry + node records in, ``/assignments/<node>`` out.

Thin I/O around ``policy.placement.place``. The registry and the assignments are mirrored by
every replica (a new leader starts from what its predecessor assigned, so nothing moves on a
leader change); the leader writes only the assignment records that changed, and the
placement result (``/state/placement``) when it changed, each fenced by its epoch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from gpufleet.etcd import Change, EtcdClient, KeyMirror, Op
from gpufleet.keyspace import Keyspace, decode_or_skip, encode
from gpufleet.keyspace.records import AssignedInstance, AssignmentRecord, ModelRecord, PlacementRecord
from gpufleet.registry import validate_model

from .config import PlacementSection
from .election import Election
from .metrics import CoordinatorMetrics
from .policy.placement import NodeView, PlacementPlan, PlacementPolicy, place

log = structlog.get_logger("coordinator.placement_loop")


class Placer:
    def __init__(
        self,
        cfg: PlacementSection,
        etcd: EtcdClient,
        keys: Keyspace,
        election: Election,
        metrics: CoordinatorMetrics,
        on_change: Callable[[Change], None],
    ) -> None:
        self.cfg = cfg
        self.policy = PlacementPolicy(reschedule_after_s=cfg.reschedule_after_s, memory_budget=cfg.memory_budget)
        self.keys = keys
        self.election = election
        self.metrics = metrics
        self.models = KeyMirror(etcd, keys.models, on_change=on_change)
        self.assignments = KeyMirror(etcd, keys.assignments)
        self.plan: PlacementPlan | None = None
        # This term's own writes, until the mirror shows them (as the leader does for routes).
        self._written: dict[str, list[AssignedInstance]] = {}
        self._status_written: PlacementRecord | None = None
        # Nodes holding assignments that this leader has never seen: when it first noticed.
        self._unknown_since: dict[str, float] = {}
        self._next_run = float("-inf")  # monotonic: the earliest next run without a registry change
        self._registry_revision = -1

    def apply(self, cfg: PlacementSection) -> None:
        """The cluster policy's [placement] changed: the next pass uses it."""
        self.cfg = cfg
        self.policy = PlacementPolicy(reschedule_after_s=cfg.reschedule_after_s, memory_budget=cfg.memory_budget)
        self._next_run = float("-inf")

    def mirrors(self) -> tuple[KeyMirror, KeyMirror]:
        return self.models, self.assignments

    def start_term(self) -> None:
        self._registry_revision = -1  # revisions of an older history (etcd restored) must not match
        self._written.clear()
        self._status_written = None
        self._unknown_since.clear()
        self._next_run = float("-inf")

    def registry(self) -> dict[str, ModelRecord]:
        out = {}
        for key, kv in self.models.data.items():
            rec = decode_or_skip(key, kv.value, ModelRecord, kv.mod_revision)
            if rec is None:
                continue
            problems = validate_model(rec)
            if Keyspace.name_in(self.keys.models, key) != rec.name:
                problems.append("name does not match its key")
            if problems:
                log.warning("invalid model registration skipped", key=key, problems=problems)
                continue
            out[rec.name] = rec
        return out

    def current(self) -> dict[str, list[AssignedInstance]]:
        out = {}
        for key, kv in self.assignments.data.items():
            rec = decode_or_skip(key, kv.value, AssignmentRecord, kv.mod_revision)
            if rec is not None and rec.instances:
                out[Keyspace.name_in(self.keys.assignments, key)] = rec.instances
        for node, instances in self._written.items():
            if instances:
                out[node] = instances
            else:
                out.pop(node, None)
        return out

    async def step(self, views: dict[str, NodeView], epoch: int, now: float) -> list[str]:
        """Place, write what changed; returns the log lines of what moved.

        Runs at most every ``interval_s``, or at once when the registry changed. ``place`` runs
        in a worker thread: it is pure, its inputs are fresh dicts of immutable records, and the
        event loop keeps renewing the leader lease while it computes."""
        if not self.cfg.enabled:
            return []
        mono = time.monotonic()
        registry_changed = self.models.revision != self._registry_revision
        if not registry_changed and mono < self._next_run:
            return []
        self._registry_revision = self.models.revision
        current = self.current()
        for node in current:
            if node not in views:  # assigned, but gone before this term began: DOWN since we noticed
                since = self._unknown_since.setdefault(node, now)
                views[node] = NodeView(record=None, state="DOWN", down_since=since)
            else:
                self._unknown_since.pop(node, None)
        plan = await asyncio.to_thread(place, self.registry(), views, current, now, self.policy)
        took = time.monotonic() - mono
        # A pass that took long (a huge fleet, models that fit nowhere: every node scanned for
        # each) waits 4× its duration, so placement never takes more than a fifth of a core.
        self._next_run = mono + max(self.cfg.interval_s, 5 * took)
        self.metrics.placement_seconds.observe(took)
        self.plan = plan
        ops: list[Op] = []
        wall = time.time()
        for node in sorted(set(current) | set(plan.assignments)):
            want = plan.assignments.get(node, [])
            if want == current.get(node, []):
                continue
            if want:
                ops.append(
                    Op.put(
                        self.keys.assignment(node),
                        encode(AssignmentRecord(node=node, epoch=epoch, updated_at=wall, instances=want)),
                    )
                )
            else:
                ops.append(Op.delete(self.keys.assignment(node)))
        status = PlacementRecord(epoch=epoch, updated_at=wall, models=[plan.status[m] for m in sorted(plan.status)])
        prev = self._status_written
        if prev is None or prev.models != status.models or prev.epoch != epoch:
            ops.append(Op.put(self.keys.placement, encode(status)))
        await self.election.guarded_writes(ops)
        for node in set(current) | set(plan.assignments):
            self._written[node] = plan.assignments.get(node, [])
        self._status_written = status
        unplaced = sum(s.unplaced for s in plan.status.values())
        self.metrics.unplaced_replicas.set(unplaced)
        if ops:
            self.metrics.assignment_writes.inc(len(ops))
        for line in plan.moved:
            log.info("placement", change=line, epoch=epoch)
        for s in plan.status.values():
            if s.unplaced and (prev is None or _reasons(prev, s.model) != s.reasons):
                log.warning("replicas cannot be placed", model=s.model, unplaced=s.unplaced, reasons=s.reasons)
        return plan.moved


def _reasons(rec: PlacementRecord, model: str) -> list[str] | None:
    return next((m.reasons for m in rec.models if m.model == model), None)
