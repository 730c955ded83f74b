"""Route tables: every instance of every known node, with its state and weight, grouped by model.

Failover is a consequence of the table: a DEGRADED, DOWN or
DRAINED endpoint gets weight 0, so the proxies send its share to the READY endpoints. Whether
they may cross GPU classes is the operator's ``cross_class``, which the record carries.

Panic mode (Envoy's): when more than ``panic_threshold`` of a GPU class's nodes look unhealthy,
the likely culprit is the checker or a shared dependency rather than the GPUs, and ejecting
them all turns a partial outage into a total one. Then the class's endpoints that the *agent*
reports READY (on a node that is neither DOWN nor drained) are routed anyway, and the plan
carries an alert text for the caller to raise. An instance loading for the first time
(STARTING or WARMING, never restarted) counts neither way: a cold start is not an outage.

Moving off a drained node (make before break, policy/placement.py rule 7): a replica the
leader placed (``assigned``) on a drained node keeps serving there until its replacement is
READY, so while its model has no READY endpoint anywhere else, such endpoints that the leader
would otherwise route are routed (READY); once another endpoint of the model is READY they are
DRAINED like the rest of the node. A drained node's own (config-file) instances are never
routed: the operator drained them, and nothing replaces them elsewhere.

Pure: no I/O, no clock. Built for 10,000 nodes × 4 instances in well under 200 ms: one pass
over the instances, then a pass over the panic candidates only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from gpufleet.keyspace.records import InstanceRecord, NodeRecord, RouteEndpoint, RouteRecord

from .health import InstanceHealth, NodeHealth, routable_or_new
from .weights import DEFAULT_WEIGHTS, WeightPolicy, endpoint_weight, instance_telemetry


@dataclass(frozen=True)
class FailoverPolicy:
    cross_class: bool = False  # may proxies send an A100 model's traffic to H100 endpoints?
    panic_threshold: float = 0.5  # panic when unhealthy / nodes of a class is *more* than this; 1.0 = never

    def __post_init__(self) -> None:
        if not 0.0 <= self.panic_threshold <= 1.0:
            raise ValueError(f"panic_threshold must be within 0..1, not {self.panic_threshold}")


DEFAULT_FAILOVER = FailoverPolicy()
_FIRST_START = frozenset({"STARTING", "WARMING"})  # with restarts == 0: never served yet


@dataclass
class RoutePlan:
    routes: dict[str, RouteRecord] = field(default_factory=dict)  # by model (served name)
    panic: dict[str, str] = field(default_factory=dict)  # gpu class -> alert text
    weights: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, instance) -> weight, for metrics


def _endpoint_sort_key(e: RouteEndpoint) -> tuple[str, str, str]:
    return (e.gpu_class, e.node, e.instance)


def compute_routes(
    nodes: dict[str, NodeRecord],
    node_health: dict[str, NodeHealth],
    inst_health: dict[tuple[str, str], InstanceHealth],
    drained: set[str],
    epoch: int,
    now: float,
    weights: WeightPolicy = DEFAULT_WEIGHTS,
    failover: FailoverPolicy = DEFAULT_FAILOVER,
) -> RoutePlan:
    """The route table for the current view.

    ``nodes`` holds the last known record of every node to list, DOWN ones included (they are
    listed as DOWN with weight 0); a node without an entry in ``node_health`` counts as READY,
    like a node first seen, and an instance without an entry in ``inst_health`` counts as a new
    instance (routable iff the agent reports READY).

    Endpoint state, first match: node DOWN → DOWN; node drained → DRAINED; node DEGRADED or
    instance not routable → DEGRADED; else READY. Only READY endpoints have a weight, and it is at
    least 1 (a READY endpoint whose formula rounds to 0 is still routable: READY always means
    "may receive traffic", weight only says how much).
    """
    survey = _Survey(weights)
    for name, rec in nodes.items():
        survey.add_node(name, rec, node_health.get(name), name in drained, inst_health)
    panic = _panic_classes(survey.class_nodes, survey.class_healthy, failover.panic_threshold)
    _route_in_panic(survey, panic)
    _route_standbys_of_unserved_models(survey)
    routes = {model: _route_record(model, eps, panic, epoch, now, failover) for model, eps in survey.by_model.items()}
    return RoutePlan(routes=routes, panic=panic, weights=survey.weights)


class _HeldBack(NamedTuple):
    """An endpoint the first pass did not route, with what it takes to weigh it if a later rule does."""

    endpoint: RouteEndpoint
    key: tuple[str, str]  # (node, instance)
    util: float | None
    temp: float | None
    health_ratio: float


class _Survey:
    """The first pass over every instance: its endpoint, by model, with state and weight; and what
    the later rules need: per GPU class the nodes serving it and those with a routable instance
    (panic), the endpoints held back that panic may release, and the drained nodes' standbys."""

    def __init__(self, policy: WeightPolicy) -> None:
        self.policy = policy
        self.by_model: dict[str, list[RouteEndpoint]] = {}
        self.weights: dict[tuple[str, str], int] = {}  # (node, instance) -> weight
        # Per class: the non-drained nodes serving it, and those of them with a routable instance of it.
        self.class_nodes: dict[str, set[str]] = {}
        self.class_healthy: dict[str, set[str]] = {}
        # Per class: endpoints the leader holds back but the agent reports READY (panic may release them).
        self.panic_candidates: dict[str, list[_HeldBack]] = {}
        # Per model: assigned replicas on drained nodes that would be READY but for the drain.
        self.standbys: dict[str, list[_HeldBack]] = {}

    def add_node(
        self,
        name: str,
        rec: NodeRecord,
        nh: NodeHealth | None,
        is_drained: bool,
        inst_health: dict[tuple[str, str], InstanceHealth],
    ) -> None:
        # `==`, not `is`: a caller may hold states as plain strings (StrEnum compares equal).
        node_down = nh is not None and nh.state == "DOWN"
        node_ready = nh is None or nh.state == "READY"
        for inst in rec.instances:
            key = (name, inst.name)
            ih = inst_health.get(key)
            gpu_class, util, temp = instance_telemetry(rec, inst)
            state = _endpoint_state(node_down, is_drained, node_ready, inst, ih)
            weight = self.weight(gpu_class, util, temp, inst.health_ratio) if state == "READY" else 0
            ep = RouteEndpoint(
                node=name, address=rec.address, instance=inst.name, gpu_class=gpu_class, weight=weight, state=state
            )
            self.by_model.setdefault(inst.model, []).append(ep)
            self.weights[key] = weight
            if is_drained:
                if inst.assigned and node_ready and inst.state == "READY" and routable_or_new(ih):
                    self.standbys.setdefault(inst.model, []).append(_HeldBack(ep, key, util, temp, inst.health_ratio))
            else:
                self._count_class(ep, inst, key, util, temp)

    def _count_class(
        self, ep: RouteEndpoint, inst: InstanceRecord, key: tuple[str, str], util: float | None, temp: float | None
    ) -> None:
        """Panic bookkeeping for an endpoint on a node that is not drained."""
        if inst.state in _FIRST_START and not inst.restarts:
            # Loading for the first time (an on-demand model's cold start, a replica just
            # placed): not routable yet, but no sign of an unhealthy node or checker. Counted,
            # a class's only node turned panic on at every cold start.
            return
        gpu_class = ep.gpu_class
        members = self.class_nodes.get(gpu_class)
        if members is None:
            members = self.class_nodes[gpu_class] = set()
            self.class_healthy[gpu_class] = set()
        members.add(ep.node)
        if ep.weight:
            self.class_healthy[gpu_class].add(ep.node)
        elif ep.state == "DEGRADED" and inst.state == "READY":
            self.panic_candidates.setdefault(gpu_class, []).append(_HeldBack(ep, key, util, temp, inst.health_ratio))

    def weight(self, gpu_class: str, util: float | None, temp: float | None, health_ratio: float) -> int:
        """A READY endpoint's weight: at least 1, READY always means "may receive traffic"."""
        return endpoint_weight(gpu_class, util, temp, health_ratio, self.policy) or 1

    def route(self, held: Iterable[_HeldBack]) -> None:
        """Make held-back endpoints READY, with their weight."""
        for h in held:
            h.endpoint.state = "READY"
            h.endpoint.weight = self.weights[h.key] = self.weight(h.endpoint.gpu_class, h.util, h.temp, h.health_ratio)


def _endpoint_state(
    node_down: bool, is_drained: bool, node_ready: bool, inst: InstanceRecord, ih: InstanceHealth | None
) -> str:
    """The first match of: node DOWN → DOWN; drained → DRAINED; node DEGRADED or instance not routable
    → DEGRADED; else READY."""
    if node_down:
        return "DOWN"
    if is_drained:
        return "DRAINED"
    inst_ok = inst.state == "READY" if ih is None else ih.state == "READY"
    return "READY" if node_ready and inst_ok else "DEGRADED"


def _route_in_panic(survey: _Survey, panic: dict[str, str]) -> None:
    """Panic mode: a panicking class's endpoints that the agent reports READY are routed anyway."""
    for gpu_class in panic:
        survey.route(survey.panic_candidates.get(gpu_class, ()))


def _route_standbys_of_unserved_models(survey: _Survey) -> None:
    """Make before break: a drained node's assigned replicas serve while their model has no other
    routed endpoint (after panic mode had its say)."""
    for model, standbys in survey.standbys.items():
        if not any(e.weight for e in survey.by_model[model]):
            survey.route(standbys)


def _route_record(
    model: str, eps: list[RouteEndpoint], panic: dict[str, str], epoch: int, now: float, failover: FailoverPolicy
) -> RouteRecord:
    return RouteRecord(
        model=model,
        epoch=epoch,
        updated_at=now,
        endpoints=sorted(eps, key=_endpoint_sort_key),
        cross_class=failover.cross_class,
        panic_classes=sorted({e.gpu_class for e in eps}.intersection(panic)) if panic else [],
    )


def _panic_classes(
    class_nodes: dict[str, set[str]], class_healthy: dict[str, set[str]], threshold: float
) -> dict[str, str]:
    """Class -> alert text, for the classes whose unhealthy share is above the threshold."""
    panic = {}
    for gpu_class, members in class_nodes.items():
        total = len(members)
        unhealthy = total - len(class_healthy[gpu_class])
        if total and unhealthy / total > threshold:
            panic[gpu_class] = (
                f"panic mode for {gpu_class}: {unhealthy} of {total} nodes unhealthy "
                f"(more than {threshold:.0%}); routing to every endpoint the agent reports READY"
            )
    return panic


def routes_differ(old: RouteRecord | None, new: RouteRecord, min_weight_change: float = 0.0) -> bool:
    """Whether two whole routes differ enough to matter (benchmarks compare successive tables
    with it; the leader writes per slice: policy/slicing.py ``slice_change``, on the same
    endpoint rule).

    ``updated_at`` is ignored (it changes every tick). ``epoch`` counts: a new leader rewrites
    each route once, so readers see the epoch of the leader that owns the table and can ignore
    a deposed leader's writes. A weight that moved by less than ``min_weight_change`` of itself
    changes no proxy's choice measurably and is not worth a write that every watcher receives;
    a weight to or from 0 and every other change (state, endpoints, classes) always is. As
    ``old`` is what was written, small moves add up until one write carries them.
    """
    if old is None:
        return True
    if (
        old.epoch != new.epoch
        or old.schema != new.schema
        or old.model != new.model
        or old.cross_class != new.cross_class
        or old.panic_classes != new.panic_classes
        or len(old.endpoints) != len(new.endpoints)
    ):
        return True
    return endpoints_differ(old.endpoints, new.endpoints, min_weight_change)


def endpoints_differ(old: list[RouteEndpoint], new: list[RouteEndpoint], min_weight_change: float = 0.0) -> bool:
    """Whether two endpoint lists differ enough to write (see routes_differ)."""
    if len(old) != len(new):
        return True
    if old == new:
        return False
    return any(_endpoint_differs(a, b, min_weight_change) for a, b in zip(old, new, strict=True))


def _endpoint_differs(a: RouteEndpoint, b: RouteEndpoint, min_weight_change: float) -> bool:
    if (a.node, a.instance, a.address, a.gpu_class, a.state) != (b.node, b.instance, b.address, b.gpu_class, b.state):
        return True
    if a.weight == b.weight:
        return False
    if a.weight == 0 or b.weight == 0:
        return True
    return abs(a.weight - b.weight) > min_weight_change * max(a.weight, b.weight)


def models_removed(old_models: set[str], plan: RoutePlan) -> set[str]:
    """Models with a route from before but no instance anywhere now: their routes are to delete."""
    return old_models - plan.routes.keys()
