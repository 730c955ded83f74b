"""The leader's placement loop: registry + node records in, ``/assignments/<node>`` out.

Thin I/O around ``policy.placement.place``. The registry and the assignments are mirrored by
every replica (a new leader starts from what its predecessor assigned, so nothing moves on a
leader change); the leader writes only the assignment records that changed, and the
placement result (``/state/placement``) when it changed, each fenced by its epoch.

Before placing, it decides the replica count of on-demand models (policy/ondemand.py) and of
autoscaled ones (policy/autoscale.py), logs each decision once with its reason and keeps it in
the model's placement status. A scale-down by autoscaling names the replica to stop (one that
serves nothing): placement is run on the assignments without it, so ``place()`` keeps the
others rather than dropping by its own order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import structlog

from gpufleet.etcd import Change, EtcdClient, KeyMirror, Op
from gpufleet.keyspace import Keyspace, decode_or_skip, encode
from gpufleet.keyspace.records import AssignedInstance, AssignmentRecord, ModelRecord, PlacementRecord
from gpufleet.registry import autoscaled, max_replicas, on_demand, validate_model

from .config import PlacementSection
from .election import Election
from .metrics import CoordinatorMetrics
from .policy.autoscale import AutoscaleState, initial, model_loads
from .policy.autoscale import step as autoscale_step
from .policy.ondemand import DemandSeen, Scale, busy_nodes, changed, scale
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
        self.registry_mirror = KeyMirror(etcd, keys.models, on_change=on_change)  # /models/: the registry
        self.assignments = KeyMirror(etcd, keys.assignments)
        self.plan: PlacementPlan | None = None
        # This term's own writes, until the mirror shows them (as the leader does for routes).
        self._written: dict[str, list[AssignedInstance]] = {}
        self._status_written: PlacementRecord | None = None
        # Nodes holding assignments that this leader has never seen: when it first noticed.
        self._unknown_since: dict[str, float] = {}
        self._next_run = float("-inf")  # monotonic: the earliest next run without a registry change
        self._registry_revision = -1
        # On-demand models (policy/ondemand.py): each node's demand entries and when this term
        # saw them change; the scaling decision in force and its text for the placement status.
        self._demand: dict[tuple[str, str], DemandSeen] = {}
        self._scales: dict[str, Scale] = {}
        self._scaling: dict[str, str] = {}
        # Autoscaled models (policy/autoscale.py): each one's state, and this pass's decisions
        # (model -> reason) and replicas to stop (model -> node).
        self._auto: dict[str, AutoscaleState] = {}
        self._decided: dict[str, str] = {}
        self._victims: dict[str, str] = {}
        self._registry_cache: tuple[int, int, dict[str, ModelRecord]] | None = None  # (revision, rewinds, registry)
        self._assignments_cache: tuple[int, int, dict[str, list[AssignedInstance]]] | None = None

    def apply(self, cfg: PlacementSection) -> None:
        """The cluster policy's [placement] changed: the next pass uses it."""
        self.cfg = cfg
        self.policy = PlacementPolicy(reschedule_after_s=cfg.reschedule_after_s, memory_budget=cfg.memory_budget)
        self._next_run = float("-inf")

    def mirrors(self) -> tuple[KeyMirror, KeyMirror]:
        return self.registry_mirror, self.assignments

    def start_term(self) -> None:
        self._registry_revision = -1  # revisions of an older history (etcd restored) must not match
        self._written.clear()
        self._status_written = None
        self._unknown_since.clear()
        self._next_run = float("-inf")
        self._demand.clear()  # entries found now count as seen now: see policy/ondemand.py
        self._scales.clear()
        self._scaling.clear()
        self._auto.clear()  # rebuilt from the assignments the predecessor left (autoscale.initial)

    def registry(self) -> dict[str, ModelRecord]:
        """The valid registrations, decoded once per registry change (every leader pass asks:
        on-demand models are decided on each)."""
        mirror = self.registry_mirror
        cached = self._registry_cache
        if cached is not None and cached[:2] == (mirror.revision, mirror.rewinds):
            return dict(cached[2])
        out = self._decode_registry()
        self._registry_cache = (mirror.revision, mirror.rewinds, out)
        return dict(out)

    def _decode_registry(self) -> dict[str, ModelRecord]:
        out = {}
        for key, kv in self.registry_mirror.data.items():
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
        mirror = self.assignments
        cached = self._assignments_cache
        if cached is not None and cached[:2] == (mirror.revision, mirror.rewinds):
            out = dict(cached[2])
        else:  # decoded once per change: autoscaled models ask on every leader pass
            out = {}
            for key, kv in mirror.data.items():
                rec = decode_or_skip(key, kv.value, AssignmentRecord, kv.mod_revision)
                if rec is not None and rec.instances:
                    out[Keyspace.name_in(self.keys.assignments, key)] = rec.instances
            self._assignments_cache = (mirror.revision, mirror.rewinds, dict(out))
        for node, instances in self._written.items():
            if instances:
                out[node] = instances
            else:
                out.pop(node, None)
        return out

    async def step(self, views: dict[str, NodeView], epoch: int, now: float) -> list[str]:
        """Place, write what changed; returns the log lines of what moved.

        Runs at most every ``interval_s``, or at once when the registry changed or an on-demand
        model's scaling decision did (a cold start waits on it). ``now``: the monotonic clock."""
        mono = time.monotonic()
        if not self.cfg.enabled:
            return []
        registry = self.registry()
        scales = self._decide(registry, views, now)
        rescaled = {n for n, sc in scales.items() if changed(self._scales.get(n), sc)}
        if not self._due(mono) and not rescaled:
            return []
        models = {
            n: msgspec.structs.replace(m, replicas=scales[n].replicas) if n in scales else m
            for n, m in registry.items()
        }
        current = self.current()
        self._view_unknown_nodes(views, current, now)
        plan = await self._place(models, views, self._without_victims(current), now, mono)
        wall = time.time()
        self._rescaled(scales, rescaled, registry, epoch, wall)
        for name, text in self._scaling.items():
            if name in plan.status:
                blocked = self._auto[name].blocked if name in self._auto else ""
                text = f"{text}; {blocked}" if blocked else text
                plan.status[name] = msgspec.structs.replace(plan.status[name], scaling=text)
        status = PlacementRecord(epoch=epoch, updated_at=wall, models=[plan.status[m] for m in sorted(plan.status)])
        prev = self._status_written
        ops = self._assignment_ops(plan, current, epoch, wall)
        if prev is None or prev.models != status.models or prev.epoch != epoch:
            ops.append(Op.put(self.keys.placement, encode(status)))
        await self.election.guarded_writes(ops)
        self._wrote(plan, current, status, len(ops))
        _log_plan(plan, prev, epoch)
        return plan.moved

    def _decide(self, registry: dict[str, ModelRecord], views: dict[str, NodeView], now: float) -> dict[str, Scale]:
        """Note the demand entries that changed (on this leader's clock) and decide the replica
        count of every on-demand and every autoscaled model."""
        seen = self._demand
        for node, view in views.items():
            for model, value in view.record.model_demand.items() if view.record is not None else ():
                prev = seen.get((node, model))
                if prev is None or prev.value != value:
                    seen[(node, model)] = DemandSeen(node, value, now)
        wanted = {n: m for n, m in registry.items() if on_demand(m)}
        auto = {n: m for n, m in registry.items() if autoscaled(m)}
        for key, d in list(seen.items()):  # forget entries no decision can use any more
            m = wanted.get(key[1])
            view = views.get(key[0])
            # One still in its node's record stays (forgotten, it would count as new next pass).
            listed = view is not None and view.record is not None and key[1] in view.record.model_demand
            if not listed and (m is None or now - d.seen_at > m.idle_unload_after_s):
                del seen[key]
        self._decided, self._victims = {}, {}
        for name in [n for n in self._auto if n not in auto]:
            del self._auto[name]
        if not wanted and not auto:
            return {}
        demand: dict[str, list[DemandSeen]] = {}
        for (_, model), d in seen.items():
            demand.setdefault(model, []).append(d)
        busy: dict[str, dict[str, float]] | None = None  # scanned only when some model lacks demand
        out = {}
        for n, m in wanted.items():
            sc = scale(m, demand.get(n, []), {}, now)
            if not sc.wanted:
                if busy is None:
                    busy = busy_nodes(v.record for v in views.values() if v.record is not None)
                sc = scale(m, demand.get(n, []), busy.get(n, {}), now)
            out[n] = sc
        if auto:
            self._autoscale(auto, views, now, out)
        return out

    def _autoscale(
        self, auto: dict[str, ModelRecord], views: dict[str, NodeView], now: float, out: dict[str, Scale]
    ) -> None:
        """Step each autoscaled model's state (policy/autoscale.py) while it is wanted; ``out``
        gets its count. An on-demand model that went idle starts over at ``replicas``."""
        current = self.current()
        records = [v.record for v in views.values() if v.record is not None]
        loads = model_loads(auto, records, current)
        for n, m in auto.items():
            sc = out.get(n) or Scale(m.replicas, True, "always on")
            if not sc.wanted:
                self._auto.pop(n, None)
                out[n] = sc
                continue
            state = self._auto.get(n)
            reason = sc.reason
            if state is None:
                state = initial(m, loads[n].assigned)
                if not on_demand(m):
                    reason = f"{state.target} assigned when this leader's term began"
            st = autoscale_step(m, state, loads[n], now)
            self._auto[n] = st.state
            if st.state.blocked and st.state.blocked != state.blocked:
                log.info("model autoscaling waits", model=n, replicas=st.state.target, why=st.state.blocked)
            if st.decision:
                self._decided[n] = reason = st.decision
            if st.victim is not None:
                self._victims[n] = st.victim
            out[n] = Scale(st.state.target, True, reason)

    def _without_victims(self, current: dict[str, list[AssignedInstance]]) -> dict[str, list[AssignedInstance]]:
        """The assignments as placement is to see them: without the replicas this pass's
        scale-downs stop (each one serving nothing), so that the serving ones are kept."""
        if not self._victims:
            return current
        out = dict(current)
        for model, node in self._victims.items():
            out[node] = [a for a in out.get(node, []) if a.model != model]
        return out

    def _rescaled(
        self, scales: dict[str, Scale], rescaled: set[str], registry: dict[str, ModelRecord], epoch: int, wall: float
    ) -> None:
        """Log each scaling decision once, and keep its text for the placement status."""
        for name in sorted(rescaled):
            sc, prev, m = scales[name], self._scales.get(name), registry[name]
            at = time.strftime("%H:%M:%S", time.gmtime(wall))
            verb = "wanted" if sc.wanted else "idle"
            if autoscaled(m):
                count = f"{sc.replicas} of {m.replicas}-{max_replicas(m)} replicas since {at} UTC"
                if name in self._decided:  # the decision's text says which way, and why
                    self._scaling[name] = f"{sc.reason}; {count}"
                else:
                    self._scaling[name] = f"{verb}: {count} ({sc.reason})"
                log.info(
                    "model autoscaled" if name in self._decided else "model scaled",
                    model=name,
                    replicas=sc.replicas,
                    previous=prev.replicas if prev is not None else None,
                    wanted=sc.wanted,
                    reason=sc.reason,
                    stopping=self._victims.get(name),
                    epoch=epoch,
                )
                continue
            self._scaling[name] = f"{verb}: {sc.replicas} of {m.replicas} replicas since {at} UTC ({sc.reason})"
            log.info(
                "on-demand model scaled",
                model=name,
                replicas=sc.replicas,
                previous=prev.replicas if prev is not None else None,
                wanted=sc.wanted,
                reason=sc.reason,
                epoch=epoch,
            )
        self._scales = scales
        for name in [n for n in self._scaling if n not in scales]:
            del self._scaling[name]

    def _due(self, mono: float) -> bool:
        """Whether a pass runs now: the registry changed, or ``interval_s`` (stretched after a long
        pass) is over."""
        if self.registry_mirror.revision == self._registry_revision and mono < self._next_run:
            return False
        self._registry_revision = self.registry_mirror.revision
        return True

    def _view_unknown_nodes(
        self, views: dict[str, NodeView], current: dict[str, list[AssignedInstance]], now: float
    ) -> None:
        """A node holding assignments but gone before this term began is DOWN since we noticed."""
        for node in current:
            if node not in views:
                since = self._unknown_since.setdefault(node, now)
                views[node] = NodeView(record=None, state="DOWN", down_since=since)
            else:
                self._unknown_since.pop(node, None)

    async def _place(
        self,
        models: dict[str, ModelRecord],
        views: dict[str, NodeView],
        current: dict[str, list[AssignedInstance]],
        now: float,
        started: float,
    ) -> PlacementPlan:
        """``place`` in a worker thread: it is pure, its inputs are fresh dicts of immutable
        records, and the event loop keeps renewing the leader lease while it computes."""
        plan = await asyncio.to_thread(place, models, views, current, now, self.policy)
        took = time.monotonic() - started
        # A pass that took long (a huge fleet, models that fit nowhere: every node scanned for
        # each) waits 4× its duration, so placement never takes more than a fifth of a core.
        self._next_run = started + max(self.cfg.interval_s, 5 * took)
        self.metrics.placement_seconds.observe(took)
        self.plan = plan
        return plan

    def _assignment_ops(
        self, plan: PlacementPlan, current: dict[str, list[AssignedInstance]], epoch: int, wall: float
    ) -> list[Op]:
        """A put for each node whose assignments changed, a delete for each that has none left."""
        ops: list[Op] = []
        for node in sorted(set(current) | set(plan.assignments)):
            want = plan.assignments.get(node, [])
            if want == current.get(node, []):
                continue
            if want:
                rec = AssignmentRecord(node=node, epoch=epoch, updated_at=wall, instances=want)
                ops.append(Op.put(self.keys.assignment(node), encode(rec)))
            else:
                ops.append(Op.delete(self.keys.assignment(node)))
        return ops

    def _wrote(
        self, plan: PlacementPlan, current: dict[str, list[AssignedInstance]], status: PlacementRecord, writes: int
    ) -> None:
        """Remember this term's writes until the mirror shows them; update the metrics."""
        for node in set(current) | set(plan.assignments):
            self._written[node] = plan.assignments.get(node, [])
        self._status_written = status
        self.metrics.unplaced_replicas.set(sum(s.unplaced for s in plan.status.values()))
        if writes:
            self.metrics.assignment_writes.inc(writes)


def _log_plan(plan: PlacementPlan, prev: PlacementRecord | None, epoch: int) -> None:
    """Every move; a model that cannot be placed, when its reasons changed."""
    for line in plan.moved:
        log.info("placement", change=line, epoch=epoch)
    for s in plan.status.values():
        if s.unplaced and (prev is None or _reasons(prev, s.model) != s.reasons):
            log.warning("replicas cannot be placed", model=s.model, unplaced=s.unplaced, reasons=s.reasons)


def _reasons(rec: PlacementRecord, model: str) -> list[str] | None:
    return next((m.reasons for m in rec.models if m.model == model), None)
