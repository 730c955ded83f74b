"""The coordinator's route metrics come from the leader's last plan at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest

from coordinator.metrics import CoordinatorMetrics
from coordinator.policy.health import Health, NodeHealth
from coordinator.policy.routes import RoutePlan
from gpufleet.keyspace.records import RouteEndpoint, RouteRecord


def test_weights_nodes_and_panic_are_scraped_from_the_last_plan_and_dropped_off_leadership() -> None:
    m = CoordinatorMetrics()
    eps = [
        RouteEndpoint(node=f"n{i}", address="http://x", instance="i0", gpu_class="A100", weight=100 + i, state="READY")
        for i in range(3)
    ]
    plan = RoutePlan(routes={"m": RouteRecord(model="m", epoch=1, updated_at=0, endpoints=eps)}, panic={"H100": "x"})
    health = {f"n{i}": NodeHealth(Health.READY, 0, 3, "", 0.0) for i in range(3)}
    health["n9"] = NodeHealth(Health.DOWN, 3, 0, "lease", 0.0)
    m.observe_plan(plan, health)
    text = generate_latest(m.registry).decode()
    assert 'gpu_coordinator_endpoint_weight{gpu_class="A100",instance="i0",model="m",node="n2"} 102.0' in text
    assert 'gpu_coordinator_nodes{state="READY"} 3.0' in text and 'gpu_coordinator_nodes{state="DOWN"} 1.0' in text
    assert 'gpu_coordinator_nodes{state="DEGRADED"} 0.0' in text
    assert 'gpu_coordinator_panic{gpu_class="H100"} 1.0' in text
    m.observe_plan(RoutePlan(), health)  # the next pass: the plan replaces the last, nothing lingers
    assert "gpu_coordinator_endpoint_weight{" not in generate_latest(m.registry).decode()
    m.observe_plan(None, {})  # stepped down: a standby shows nothing of its own
    text = generate_latest(m.registry).decode()
    assert "gpu_coordinator_nodes{" not in text and "gpu_coordinator_panic{" not in text
