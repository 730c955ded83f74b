"""gpu_coordinator_* metrics, in the coordinator's own registry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .policy.health import NodeHealth
    from .policy.routes import RoutePlan


class _PlanCollector:
    """The leader's last route plan as gauges, built when Prometheus scrapes.

    Not labelled Gauges set on every pass: clearing and setting one child per endpoint was 43 %
    of the leader's CPU at 1,000 nodes (py-spy, bench/scale.py; prometheus_client's ``labels``
    validates and locks per child), more than computing the routes, and it grows with the
    fleet while scrapes stay a few a minute."""

    def __init__(self) -> None:
        self.plan: RoutePlan | None = None
        self.node_states: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        weight = GaugeMetricFamily(
            "gpu_coordinator_endpoint_weight",
            "Routing weight per endpoint.",
            labels=["model", "node", "instance", "gpu_class"],
        )
        nodes = GaugeMetricFamily("gpu_coordinator_nodes", "Nodes by health state.", labels=["state"])
        panic = GaugeMetricFamily(
            "gpu_coordinator_panic", "1 while a GPU class is in panic mode.", labels=["gpu_class"]
        )
        plan = self.plan
        if plan is not None:
            for model, route in plan.routes.items():
                for ep in route.endpoints:
                    weight.add_metric([model, ep.node, ep.instance, ep.gpu_class], ep.weight)
            for cls in plan.panic:
                panic.add_metric([cls], 1)
        for state, n in self.node_states.items():
            nodes.add_metric([state], n)
        yield from (weight, nodes, panic)


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.is_leader = Gauge("gpu_coordinator_is_leader", "1 while this replica leads.", registry=r)
        self.epoch = Gauge("gpu_coordinator_epoch", "Epoch (fencing token) of the current leader term.", registry=r)
        self.elections = Counter(
            "gpu_coordinator_leadership_changes", "Times this replica became or stopped being leader.", registry=r
        )
        self.guard_rejections = Counter(
            "gpu_coordinator_guard_rejections", "Writes refused by the epoch guard (a deposed leader).", registry=r
        )
        self.transitions = Counter(
            "gpu_coordinator_health_transitions", "Health state changes.", ["kind", "state"], registry=r
        )
        self.route_writes = Counter(
            "gpu_coordinator_route_writes", "Route headers and slices written or removed.", registry=r
        )
        self.route_write_bytes = Counter(
            "gpu_coordinator_route_write_bytes",
            "Bytes of route headers and slices written (each is sent again to every agent watching it).",
            registry=r,
        )
        self.compute_seconds = Histogram(
            "gpu_coordinator_route_compute_seconds",
            "Time to judge health and compute every route.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
            registry=r,
        )
        self._plan = _PlanCollector()  # endpoint weights, nodes by state, panic classes
        r.register(self._plan)
        self.placement_seconds = Histogram(
            "gpu_coordinator_placement_seconds",
            "Time to compute the placement of every registered model.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.unplaced_replicas = Gauge(
            "gpu_coordinator_unplaced_replicas", "Replicas of registered models that fit nowhere.", registry=r
        )
        self.assignment_writes = Counter(
            "gpu_coordinator_assignment_writes", "Assignment and placement records written or removed.", registry=r
        )
        self.degradation_level = Gauge(
            "gpu_coordinator_degradation_level", "Cluster degradation level (0 normal .. 3 static).", registry=r
        )
        self.error_rate = Gauge(
            "gpu_coordinator_cluster_error_rate", "Upstream error rate over the degradation window.", registry=r
        )
        self.degradation_changes = Counter(
            "gpu_coordinator_degradation_changes", "Degradation level changes.", registry=r
        )

    def observe_plan(self, plan: RoutePlan | None, node_health: dict[str, NodeHealth]) -> None:
        """The leader's pass result, for the next scrape (None: not leading, nothing to show)."""
        counts: dict[str, int] = {"READY": 0, "DEGRADED": 0, "DOWN": 0} if plan is not None else {}
        for h in node_health.values():
            counts[str(h.state)] = counts.get(str(h.state), 0) + 1
        self._plan.plan, self._plan.node_states = plan, counts
