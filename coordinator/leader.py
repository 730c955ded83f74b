"""The leader's loop: mirror the cluster, judge health, compute routes, write what changed.

Thin I/O around pure policy (coordinator/policy). Every replica mirrors the keyspace all the
time, so a replica that becomes leader starts from a complete, current picture; it then waits
``grace_s`` before its first failover decision. Instance state changes and nodes coming and
going are acted on as etcd reports them; health *samples* (stale telemetry, temperature) are
taken every ``sample_interval_s``. Every write is a transaction fenced by the leader's epoch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import msgspec
import structlog

from gpufleet.etcd import Compare, EtcdClient, EtcdError, KeyMirror, Op
from gpufleet.keyspace import Keyspace, decode_or_skip
from gpufleet.keyspace.records import DrainRecord, NodeRecord
from gpufleet.policyconfig import ClusterPolicy, encode_policy
from gpufleet.tasks import wait_set

from .config import CoordinatorConfig
from .degradation_loop import DegradationController
from .election import Election, NotLeader
from .keyshare_loop import KeyShareController
from .metrics import CoordinatorMetrics
from .placement_loop import Placer
from .policy.health import Health, HealthPolicy, InstanceHealth, NodeHealth, departed, step_instance, step_node
from .policy.placement import NodeView
from .policy.routes import FailoverPolicy, RoutePlan, compute_routes
from .policy.slicing import WritePolicy
from .policy.weights import CPU_CLASS, WeightPolicy
from .policysync import PolicyState, file_differs, step_policy
from .route_writer import RouteWriter

log = structlog.get_logger("coordinator.leader")

FORGET_DOWN_AFTER_S = 600.0  # a node gone this long leaves the routes entirely


@dataclass
class Decision:
    at: float = 0.0
    epoch: int | None = None
    summary: str = "none yet"
    route_writes: int = 0
    route_deletes: int = 0
    changes: list[str] = field(default_factory=list)


class Leader:
    def __init__(
        self, cfg: CoordinatorConfig, etcd: EtcdClient, election: Election, keys: Keyspace, metrics: CoordinatorMetrics
    ) -> None:
        self.cfg = cfg
        self.etcd = etcd
        self.election = election
        self.keys = keys
        self.metrics = metrics
        self._changed = asyncio.Event()
        self.nodes = KeyMirror(etcd, keys.nodes, on_change=lambda _: self._changed.set())
        self.drains = KeyMirror(etcd, keys.drains, on_change=lambda _: self._changed.set())
        self.routes = RouteWriter(etcd, keys, election, metrics)
        self.placer = Placer(cfg.placement, etcd, keys, election, metrics, on_change=lambda _: self._changed.set())
        self.degradation = DegradationController(cfg.degradation, keys, election, metrics)
        self.keyshares = KeyShareController(keys, election)
        # The cluster's policy (/config), mirrored by every replica and applied by each: the
        # file's sections until etcd's value is seen, and the bootstrap when there is none.
        self.policy_mirror = KeyMirror(etcd, keys.config, on_change=lambda _: self._changed.set())
        self.policy_state = PolicyState(cfg.policy)
        self._file_warned = False
        self._policy_rewinds = 0
        self._apply_policy(cfg.policy)
        # Leadership-scoped state: rebuilt from scratch by every new leader term.
        self.node_health: dict[str, NodeHealth] = {}
        self.inst_health: dict[tuple[str, str], InstanceHealth] = {}
        self.last_seen: dict[str, tuple[NodeRecord, float]] = {}  # (record, monotonic time seen)
        # (mod revision, monotonic time first seen at it): a record's age without trusting clocks.
        self._changed_at: dict[str, tuple[int, float]] = {}
        self.plan: RoutePlan | None = None
        self._unweighted_logged: set[str] = set()
        self._panic_logged: dict[str, str] = {}  # class -> detail last logged (once per change, not per pass)
        self.decision = Decision()
        self._term: int | None = None
        self.deciding_passes = 0  # complete passes after this term's grace period (routes written)
        self._grace_until = 0.0
        self._decoded: dict[str, tuple[int, NodeRecord | None]] = {}
        self._rewinds = 0  # etcd history rewinds already acted on (see _rewound)

    def _apply_policy(self, p: ClusterPolicy) -> None:
        """(Re)build every policy object from the cluster policy's sections."""
        h = p.health
        self.health_policy = HealthPolicy(
            bad_samples=h.bad_samples,
            good_samples=h.good_samples,
            stale_after_s=h.stale_after_s,
            temp_limit_c=h.temp_limit_c,
            eject_base_s=h.eject_base_s,
            eject_max_s=h.eject_max_s,
            eject_forget_after_s=h.eject_forget_after_s,
        )
        self.weight_policy = WeightPolicy(base=dict(p.weights.base), default_base=p.weights.default_base)
        self.route_write_policy = WritePolicy(p.weights.min_weight_change, p.weights.urgent_weight_change)
        self.weight_drift_interval_s = p.weights.weight_drift_interval_s
        self.failover_policy = FailoverPolicy(
            cross_class=p.failover.cross_class, panic_threshold=p.failover.panic_threshold
        )
        self.placer.apply(p.placement)
        self.degradation.apply(p.degradation)
        self._unweighted_logged = set()

    def sync_policy(self) -> bool:
        """Apply the cluster policy's current value (every replica). True when the key is
        absent, i.e. a leader should write the policy that applies (the bootstrap)."""
        if not self.policy_mirror.ready.is_set():
            return False
        if self.policy_mirror.rewinds != self._policy_rewinds:  # etcd restored: revisions name other writes
            self._policy_rewinds = self.policy_mirror.rewinds
            self.policy_state = PolicyState(self.policy_state.policy)
        kv = self.policy_mirror.data.get(self.keys.config)
        step = step_policy(self.policy_state, kv.value if kv else None, kv.mod_revision if kv else 0)
        prev, self.policy_state = self.policy_state, step.state
        if step.invalid is not None:
            log.error(
                "invalid cluster policy in etcd skipped; the last good policy stays",
                key=self.keys.config,
                mod_revision=step.state.seen,
                error=step.invalid,
                applied_revision=step.state.revision,
            )
        elif step.state.revision != prev.revision and step.state.revision:
            if step.changes:
                self._apply_policy(step.state.policy)
                self.poke()
            # The first value seen replaces the file's (at start-up): not a change of policy.
            first, p = not self._file_warned, step.state.policy
            if first or step.changes:
                (log.info if first else log.warning)(
                    "cluster policy from etcd applied" if first else "cluster policy changed; applied",
                    revision=step.state.revision,
                    by=p.updated_by,
                    changes=step.changes,
                )
            if not self._file_warned:
                self._file_warned = True
                for section in file_differs(self.cfg.policy, step.state.policy):
                    log.warning(
                        f"[{section}] in the file differs from the cluster's; the cluster's applies; "
                        "edit with gpuctl config",
                        file=self.cfg.source_path,
                        section=section,
                    )
        return step.absent

    async def _bootstrap_policy(self, epoch: int) -> None:
        """No policy in etcd: write the one that applies (the file's, on a new cluster), only
        while still absent and through the epoch guard."""
        p = msgspec.structs.replace(
            self.policy_state.policy,
            updated_by=f"{self.cfg.id} (bootstrap from {self.cfg.source_path or 'defaults'})",
            updated_at=time.time(),
        )
        res = await self.election.guarded_txn(
            [Op.put(self.keys.config, encode_policy(p))], extra=[Compare.absent(self.keys.config)]
        )
        if res.succeeded:
            log.info("cluster policy written to etcd from this coordinator's file", key=self.keys.config, epoch=epoch)

    def poke(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        registry, assignments = self.placer.mirrors()
        headers, slices = self.routes.mirrors()
        async with self.nodes, self.drains, headers, slices, registry, assignments, self.policy_mirror:
            next_sample = 0.0
            while True:
                wake = next_sample
                if self._term is not None and time.monotonic() < self._grace_until:
                    wake = min(wake, self._grace_until)  # decide as soon as the grace period ends
                timeout = max(0.0, wake - time.monotonic())
                await wait_set(self._changed, timeout)
                self._changed.clear()
                now = time.monotonic()
                sample = now >= next_sample
                if sample:
                    next_sample = now + self.cfg.coordinator.sample_interval_s
                try:
                    absent = self.sync_policy()
                    if absent and self.election.is_leader and self.election.epoch is not None:
                        await self._bootstrap_policy(self.election.epoch)
                    await self._step(sample)
                except NotLeader:
                    pass  # the election has stepped down; the next pass starts over as standby
                except EtcdError as e:
                    log.warning("leader pass failed on etcd; retrying", error=str(e))
                    await asyncio.sleep(1.0)
                except Exception as e:  # a bug must not stop the leader loop
                    log.exception("leader pass failed", error=str(e))
                    await asyncio.sleep(1.0)

    async def _step(self, sample: bool) -> None:
        epoch = self.election.epoch
        if epoch is None or not self.election.is_leader:
            if self._term is not None:
                log.info("no longer leading; dropping leadership state", epoch=self._term)
                self._term = None
                self.metrics.observe_plan(None, {})  # a standby exports no weights of its own
            return
        # _rewound() is always asked: it also takes note of the rewinds a new term starts after.
        rewound = self._rewound()
        if self._term != epoch or rewound:
            await self._start_term(epoch)
        t0 = time.perf_counter()
        # Decisions run on the monotonic clock (see policy/health.py, "Clocks"); the wall clock
        # only stamps what is written for people to read.
        now, now_wall = time.monotonic(), time.time()
        records = self._records(now)
        drained = self._drained()
        changes = self._judge(records, now, sample)
        self.degradation.observe(records, now)
        plan = compute_routes(
            {n: r for n, (r, _) in self.last_seen.items()},
            self.node_health,
            self.inst_health,
            drained,
            epoch,
            now_wall,
            self.weight_policy,
            self.failover_policy,
        )
        self.plan = plan
        self.metrics.compute_seconds.observe(time.perf_counter() - t0)
        self.metrics.observe_plan(plan, self.node_health)
        self._log_panic(plan.panic)
        if time.monotonic() < self._grace_until:
            self.decision = Decision(now_wall, epoch, "grace period: observing, no decisions yet", changes=changes)
            return
        writes, deletes = await self._write_routes(plan, epoch)
        changes += await self.placer.step(self._views(records, drained), epoch, now)
        await self.degradation.step(epoch, time.monotonic())
        await self.keyshares.step(records, epoch, time.monotonic())
        self.deciding_passes += 1
        if writes or deletes or changes:
            self.decision = Decision(
                now_wall, epoch, f"{writes} routes written, {deletes} removed", writes, deletes, changes
            )
            log.info("routes updated", epoch=epoch, written=writes, removed=deletes, changes=changes[:10])

    def _mirrors(self) -> tuple[KeyMirror, ...]:
        return (self.nodes, self.drains, *self.routes.mirrors(), self.policy_mirror, *self.placer.mirrors())

    def _rewound(self) -> bool:
        """Whether etcd's history went backwards (restored from a backup, or wiped) since the
        term started. Then the mirrors have listed again, but what this term remembers is keyed
        by revisions of the old history: what it wrote (``_written``: the restored store may hold
        older routes), when records changed, decoded records. The term starts over, grace period
        included: agents are re-registering, and nothing should be judged DOWN meanwhile."""
        rewinds = sum(m.rewinds for m in self._mirrors())
        if rewinds == self._rewinds:
            return False
        if self._term is not None:
            log.warning("etcd's history went backwards; starting the term over", epoch=self._term)
        self._rewinds = rewinds
        self._decoded.clear()
        self.routes.forget_decoded()
        return True

    async def _start_term(self, epoch: int) -> None:
        """A new term: start from the mirrors' complete picture, then a grace period."""
        await asyncio.gather(*(m.wait_ready() for m in self._mirrors()))
        if self.sync_policy():  # decide nothing under a policy that is not the cluster's
            await self._bootstrap_policy(epoch)
        self.degradation.start_term(await self.etcd.get(self.keys.degradation), time.monotonic())
        self.placer.start_term()
        self.keyshares.start_term()
        self.node_health.clear()
        self.inst_health.clear()
        self.last_seen.clear()
        self._panic_logged = {}
        self._changed_at.clear()
        self.routes.start_term()
        self._term = epoch
        self.deciding_passes = 0
        self._grace_until = time.monotonic() + self.cfg.election.grace_s
        log.info(
            "leading: state synced, grace period started",
            epoch=epoch,
            grace_s=self.cfg.election.grace_s,
            nodes=len(self.nodes.data),
        )

    def _log_panic(self, panic: dict[str, str]) -> None:
        """An error when a GPU class enters panic mode (or its detail changes), a line when it
        leaves: once per change, not on every pass (journalctl -p err stays readable)."""
        for cls, text in panic.items():
            if self._panic_logged.get(cls) != text:
                log.error("panic threshold reached: ejection suspended", gpu_class=cls, detail=text)
        for cls in self._panic_logged.keys() - panic.keys():
            log.info("panic over: ejection resumes", gpu_class=cls)
        self._panic_logged = dict(panic)

    def _note_unweighted(self, rec: NodeRecord) -> None:
        """A GPU class with no base weight gets ``default_base``: say so once per class."""
        for cls in rec.gpu_classes:
            if cls not in self.weight_policy.base and cls != CPU_CLASS and cls not in self._unweighted_logged:
                self._unweighted_logged.add(cls)
                log.warning(
                    "GPU class has no base weight; weighted as default_base (set [weights] base)",
                    gpu_class=cls,
                    node=rec.node,
                    default_base=self.weight_policy.default_base,
                )

    def _records(self, now: float) -> dict[str, NodeRecord]:
        out = {}
        cache = self._decoded
        if len(cache) > 2 * len(self.nodes.data) + 100:
            live = self.nodes.data
            self._decoded = cache = {k: v for k, v in cache.items() if k in live}
        for key, kv in self.nodes.data.items():
            # Decoding every record on every pass dominates at 10,000 nodes; a record only
            # changes with its mod revision.
            hit = cache.get(key)
            if hit is not None and hit[0] == kv.mod_revision:
                rec = hit[1]
            else:
                rec = decode_or_skip(key, kv.value, NodeRecord, kv.mod_revision)
                if rec is not None and hit is not None and hit[1] is not None:
                    # An instance that left the record (stopped by a reload, a replica moved
                    # away) leaves its health history too: when it returns it is a new one.
                    for name in departed(hit[1], rec):
                        self.inst_health.pop((rec.node, name), None)
                cache[key] = (kv.mod_revision, rec)
                if rec is not None:
                    self._note_unweighted(rec)
            if rec is None:
                continue
            if Keyspace.name_in(self.keys.nodes, key) != rec.node:
                log.warning("node record's name does not match its key; skipped", key=key, node=rec.node)
                continue
            out[rec.node] = rec
            self.last_seen[rec.node] = (rec, now)
            changed = self._changed_at.get(rec.node)
            if changed is None or changed[0] != kv.mod_revision:
                self._changed_at[rec.node] = (kv.mod_revision, now)
        return out

    def _drained(self) -> set[str]:
        out = set()
        for key, kv in self.drains.data.items():
            if decode_or_skip(key, kv.value, DrainRecord, kv.mod_revision) is not None:
                out.add(Keyspace.name_in(self.keys.drains, key))
        return out

    def _judge(self, records: dict[str, NodeRecord], now: float, sample: bool) -> list[str]:
        """Advance node and instance health; returns human-readable transitions."""
        changes: list[str] = []
        for node in list(self.last_seen):
            rec = records.get(node)
            prev = self.node_health.get(node)
            if rec is None:
                last_at = self.last_seen[node][1]
                if now - last_at > FORGET_DOWN_AFTER_S:
                    self._forget(node)
                    continue
                if prev is not None and prev.state is Health.DOWN:
                    continue
                new = step_node(prev, None, now, self.health_policy)
                # The node's processes are gone: when it comes back its instances start over,
                # and a clean restart must not count as an instance flapping (ejection).
                for k in [k for k in self.inst_health if k[0] == node]:
                    del self.inst_health[k]
            elif prev is None or prev.state is Health.DOWN or sample:
                age = now - self._changed_at[node][1]
                new = step_node(prev, rec, now, self.health_policy, age=age)
            else:
                new = prev
            if prev is None or new.state is not prev.state:
                changes.append(f"node {node}: {prev.state if prev else 'new'} -> {new.state} ({new.reason})")
                self.metrics.transitions.labels("node", str(new.state)).inc()
            self.node_health[node] = new
            if rec is None:
                continue
            for inst in rec.instances:
                k = (node, inst.name)
                iprev = self.inst_health.get(k)
                inew = step_instance(iprev, inst.state, now, self.health_policy, restarts=inst.restarts)
                if iprev is not None and inew.state is not iprev.state:
                    changes.append(f"instance {node}/{inst.name}: {iprev.state} -> {inew.state} ({inew.reason})")
                    self.metrics.transitions.labels("instance", str(inew.state)).inc()
                self.inst_health[k] = inew
        for line in changes:
            log.info("health transition", change=line)
        return changes

    def _views(self, records: dict[str, NodeRecord], drained: set[str]) -> dict[str, NodeView]:
        """What placement needs to know of each node the leader knows."""
        return {
            node: NodeView(
                record=records.get(node),
                state=str(h.state),
                down_since=h.since if h.state is Health.DOWN else None,
                drained=node in drained,
            )
            for node, h in self.node_health.items()
        }

    def _forget(self, node: str) -> None:
        self.degradation.forget(node)
        self.last_seen.pop(node, None)
        self._changed_at.pop(node, None)
        self.node_health.pop(node, None)
        for k in [k for k in self.inst_health if k[0] == node]:
            del self.inst_health[k]

    async def _write_routes(self, plan: RoutePlan, epoch: int) -> tuple[int, int]:
        count = await self.routes.write(plan, self.route_write_policy, self.weight_drift_interval_s, time.monotonic())
        return count.writes, count.deletes
