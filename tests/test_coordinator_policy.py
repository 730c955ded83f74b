"""Pure coordinator policy: weights, node and instance health, route tables (no I/O, no clock)."""

from __future__ import annotations

import msgspec
import pytest

from coordinator.policy import (
    DEFAULT_FAILOVER,
    DEFAULT_HEALTH,
    DEFAULT_WEIGHTS,
    FailoverPolicy,
    Health,
    HealthPolicy,
    InstanceHealth,
    NodeHealth,
    WeightPolicy,
    compute_routes,
    endpoint_weight,
    instance_telemetry,
    instance_weight,
    models_removed,
    node_sample,
    routable,
    routes_differ,
    step_instance,
    step_node,
)
from coordinator.policy.health import departed
from gpufleet.keyspace.records import GpuRecord, InstanceRecord, NodeRecord, RouteRecord

NOW = 10_000.0


def step(
    prev: NodeHealth | None, record: NodeRecord | None, now: float, policy: HealthPolicy = DEFAULT_HEALTH
) -> NodeHealth:
    """step_node, with the test records' ``updated_at`` standing for when the record last changed."""
    return step_node(prev, record, now, policy, age=now - record.updated_at if record else 0.0)


# --- builders ------------------------------------------------------------------------------------


def gpu(
    index: int,
    gpu_class: str = "A100",
    util: float | None = 10.0,
    temp: float | None = 60.0,
    lost: bool = False,
) -> GpuRecord:
    return GpuRecord(
        index=index,
        uuid=f"GPU-{index}",
        name=f"NVIDIA {gpu_class}",
        gpu_class=gpu_class,
        utilization_percent=util,
        temperature_celsius=temp,
        lost=lost,
    )


def inst(
    name: str = "i0", model: str = "qwen3", gpus: list[int] | None = None, state: str = "READY", health: float = 1.0
) -> InstanceRecord:
    return InstanceRecord(
        name=name,
        model=model,
        backend="vllm",
        state=state,  # type: ignore[arg-type]
        state_since=0.0,
        port=8000,
        gpus=[0] if gpus is None else gpus,
        gpu_memory_fraction=0.9,
        health_ratio=health,
    )


def node(
    name: str = "n1",
    gpus: list[GpuRecord] | None = None,
    instances: list[InstanceRecord] | None = None,
    updated_at: float = NOW,
) -> NodeRecord:
    gpus = [gpu(0)] if gpus is None else gpus
    return NodeRecord(
        node=name,
        address=f"http://{name}:8080",
        mode="cluster",
        agent_version="0.1.0",
        started_at=0.0,
        updated_at=updated_at,
        gpu_source="simulated",
        gpu_classes=sorted({g.gpu_class for g in gpus}),
        gpus=gpus,
        instances=[inst()] if instances is None else instances,
    )


def class_node(name: str, gpu_class: str = "A100", model: str = "qwen3", state: str = "READY") -> NodeRecord:
    """A one-GPU node of a class with one instance of ``model``."""
    return node(name, gpus=[gpu(0, gpu_class)], instances=[inst("i0", model, [0], state)])


def nh(state: Health) -> NodeHealth:
    return NodeHealth(state, 0, 0, "test", 0.0)


EJECTED = InstanceHealth(Health.DEGRADED, 1, NOW + 30, None, "ejected")


# --- weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu_class", "util", "temp", "ratio", "expected"),
    [
        # The article's example outputs (node-a10-01: 86, node-a100-02: 192, node-h100-03: 341).
        ("A10", 0, 69, 1.0, 86),  # 100 × 1 × (1 − 4/30) × 1
        ("A100", 5, 68, 1.0, 192),  # 220 × 0.97 × 0.9 × 1
        ("H100", 4, 60, 0.9, 341),  # 380 × 0.976 × 1 × 0.92
        ("A100", 20, 60, 1.0, 193),  # 220 × 0.88; cooler than 65 °C earns no bonus (temp_ceiling)
        ("A100", 20, 80, 1.0, 96),  # heating 60 → 80 °C halves the weight
        ("A100", 0, 65, 1.0, 220),
        ("A100", 100, 65, 1.0, 88),  # full load keeps 40 %
        ("A100", 0, 65, 0.0, 44),  # no passing probes keeps 20 %
        ("H100", 0, 85.0, 1.0, 126),  # exactly 85 °C: formula only (380/3)
        ("H100", 0, 85.5, 1.0, 114),  # above 85 °C: capped at int(0.3 × 380)
        ("H100", 0, 99.0, 1.0, 114),  # the floor 0.3 holds at any temperature
        ("L40S", 0, 65, 1.0, 130),  # from memory bandwidth (gpufleet/gpuclasses.py)
        ("UNKNOWN", 0, 65, 1.0, 100),  # unknown class: default_base
        ("A100", 150, 65, 1.0, 88),  # util clamped to 100
        ("A100", -5, 65, 1.0, 220),  # util clamped to 0
        ("A100", 0, 65, 1.7, 220),  # ratio clamped to 1
        ("A100", 0, 65, -1.0, 44),  # ratio clamped to 0
        ("A100", None, 65, 1.0, 88),  # unknown util: assume busy
        ("A100", float("nan"), 65, 1.0, 88),
        ("A100", 0, None, 1.0, 220),  # unknown temperature: neutral
        ("A100", 0, float("nan"), 1.0, 220),
        ("A10", 100, 100, 0.0, 2),
    ],
)
def test_endpoint_weight(gpu_class: str, util: float | None, temp: float | None, ratio: float, expected: int) -> None:
    assert endpoint_weight(gpu_class, util, temp, ratio, DEFAULT_WEIGHTS) == expected


def test_weight_policy_is_configurable() -> None:
    custom = WeightPolicy(base={"A100": 220, "L40S": 180}, default_base=50)
    assert endpoint_weight("L40S", 0, 65, 1.0, custom) == 180
    assert endpoint_weight("A10", 0, 65, 1.0, custom) == 50  # no longer in the table
    # The article's uncapped temperature factor, for whoever wants it verbatim: 35 °C doubles.
    article = WeightPolicy(temp_ceiling=float("inf"))
    assert endpoint_weight("A100", 0, 35, 1.0, article) == 440
    assert endpoint_weight("A100", 0, 35, 1.0) == 220


def test_heating_lowers_weight_monotonically() -> None:
    weights = [endpoint_weight("A100", 20, t, 1.0) for t in range(60, 96, 5)]
    assert weights == sorted(weights, reverse=True)
    assert weights[0] > weights[4]  # 60 °C vs 80 °C


@pytest.mark.parametrize(
    ("gpus", "instance_gpus", "expected"),
    [
        # Busiest GPU's utilization, hottest GPU, first GPU's class.
        ([gpu(0, util=20, temp=60), gpu(1, util=40, temp=75)], [0, 1], ("A100", 40.0, 75.0)),
        ([gpu(0, "H100", util=50, temp=70), gpu(1, "A10")], [0], ("H100", 50.0, 70.0)),
        # Listed out of index order: found by index, not position.
        ([gpu(1, util=80, temp=70), gpu(0, util=20, temp=50)], [0], ("A100", 20.0, 50.0)),
        # A GPU with unknown utilization counts as busy; unknown temperatures are skipped.
        ([gpu(0, util=None, temp=None), gpu(1, util=0, temp=None)], [0, 1], ("A100", 100.0, None)),
        # CPU-only instance: class CPU whatever the node's GPUs, no load, neutral temperature.
        ([gpu(0, "A10", util=90, temp=88)], [], ("CPU", 0.0, None)),
        ([], [], ("CPU", 0.0, None)),
        # Its GPU vanished from the record: unknown telemetry.
        ([gpu(0)], [3], ("A100", None, None)),
    ],
)
def test_instance_telemetry(
    gpus: list[GpuRecord], instance_gpus: list[int], expected: tuple[str, float | None, float | None]
) -> None:
    assert instance_telemetry(node(gpus=gpus), inst(gpus=instance_gpus)) == expected


def test_instance_weight_uses_its_gpus_and_health_ratio() -> None:
    rec = node(gpus=[gpu(0, util=20, temp=60), gpu(1, util=40, temp=75), gpu(2, util=100, temp=95)])
    assert instance_weight(rec, inst(gpus=[0, 1], health=0.5)) == endpoint_weight("A100", 40, 75, 0.5) == 66
    # A CPU-only instance on a GPU-less node: default base × health score.
    assert instance_weight(node(gpus=[]), inst(gpus=[], health=1.0)) == 100


# --- node health ---------------------------------------------------------------------------------

GOOD = node()
STALE = node(updated_at=NOW - 91)
LOST = node(gpus=[gpu(0), gpu(1), gpu(2, lost=True)])
HOT = node(gpus=[gpu(0, temp=91)])


@pytest.mark.parametrize(
    ("record", "good", "reason_part"),
    [
        (GOOD, True, "ok"),
        (node(updated_at=NOW - 90), True, "ok"),  # 90 s is not yet stale
        (STALE, False, "telemetry stale: last update 91 s ago"),
        (LOST, False, "GPU 2 lost"),
        (node(gpus=[gpu(0, temp=90)]), True, "ok"),  # at the limit is fine
        (HOT, False, "GPU 0 at 91 °C (limit 90 °C)"),
        (node(gpus=[gpu(0, temp=None)]), True, "ok"),  # unreadable sensor: not a bad sample
        (node(gpus=[gpu(0, temp=95), gpu(1, lost=True)], updated_at=0), False, "stale"),
    ],
)
def test_node_sample(record: NodeRecord, good: bool, reason_part: str) -> None:
    ok, reason = node_sample(record, NOW - record.updated_at)
    assert ok is good
    assert reason_part in reason


def test_node_sample_names_every_problem() -> None:
    _, reason = node_sample(node(gpus=[gpu(0, temp=95), gpu(1, lost=True)]), age=NOW)
    assert reason.count(";") == 2 and "GPU 0 at 95 °C" in reason and "GPU 1 lost" in reason


R, D, X = Health.READY, Health.DEGRADED, Health.DOWN
B = STALE  # a bad sample
G = GOOD


@pytest.mark.parametrize(
    ("samples", "states"),
    [
        ([G], [R]),  # first seen, good
        ([B, B, B], [R, R, D]),  # first seen, bad: counts like a READY node
        ([G, B, B, B], [R, R, R, D]),
        ([G, B, B, G, B, B], [R] * 6),  # 2 bad then good resets the count
        ([G, LOST, HOT, STALE], [R, R, R, D]),  # any mix of bad reasons counts
        ([G, B, B, B, G, G, G], [R, R, R, D, D, D, R]),  # 3 good → READY again
        ([B, B, B, G, G, B, G, G, G], [R, R, D, D, D, D, D, D, R]),  # bad interrupts recovery
        ([G, None], [R, X]),  # key gone: DOWN at once
        ([None], [X]),
        ([G, None, None, G, G, G], [R, X, X, D, D, R]),  # back from DOWN needs good samples
        ([G, None, B, G, G, G], [R, X, D, D, D, R]),
    ],
)
def test_node_transitions(samples: list[NodeRecord | None], states: list[Health]) -> None:
    h: NodeHealth | None = None
    seen = []
    for t, rec in enumerate(samples):
        h = step(h, rec, NOW + t)
        seen.append(h.state)
    assert seen == states


def test_node_health_since_and_reason() -> None:
    h = step(None, G, NOW)
    assert (h.state, h.since) == (R, NOW)
    h = step(step(h, G, NOW), G, NOW)  # counters stop at the thresholds
    assert step(h, G, NOW + 1) is h  # steady: the same value, nothing to log
    for t in (1, 2, 3):
        h = step(h, HOT, NOW + t)
    assert (h.state, h.since) == (D, NOW + 3)
    assert "GPU 0 at 91 °C" in h.reason
    h = step(h, STALE, NOW + 4)  # still DEGRADED: reason follows the latest problem
    assert (h.state, h.since) == (D, NOW + 3)
    assert "stale" in h.reason
    for t in (5, 6, 7):
        h = step(h, G, NOW + t)
    assert (h.state, h.since, h.reason) == (R, NOW + 7, "3 consecutive good samples")
    h = step(h, None, NOW + 8)
    assert (h.state, h.since) == (X, NOW + 8)
    assert "lease" in h.reason
    assert step(h, None, NOW + 9) is h


def test_node_thresholds_are_configurable() -> None:
    policy = HealthPolicy(bad_samples=1, good_samples=1, stale_after_s=10)
    h = step(None, node(updated_at=NOW - 11), NOW, policy)
    assert h.state is D
    assert step(h, G, NOW, policy).state is R


# --- instance health -----------------------------------------------------------------------------


def run_instance(events: list[tuple[float, str]]) -> list[InstanceHealth]:
    h: InstanceHealth | None = None
    out = []
    for t, agent_state in events:
        h = step_instance(h, agent_state, t)
        out.append(h)
    return out


def test_new_instance_ready_at_once_and_starting_is_no_ejection() -> None:
    h = step_instance(None, "READY", NOW)
    assert (h.state, h.ejections, h.ready_since) == (R, 0, NOW) and routable(h)
    hs = run_instance([(0, "STARTING"), (5, "WARMING"), (10, "READY")])
    assert [x.state for x in hs] == [D, D, R]
    assert hs[-1].ejections == 0
    assert not routable(None)


def test_ejection_holds_the_instance_out_even_when_the_agent_says_ready() -> None:
    hs = run_instance(
        [(0, "READY"), (10, "UNHEALTHY"), (11, "RESTARTING"), (20, "READY"), (39.9, "READY"), (40, "READY")]
    )
    assert [x.state for x in hs] == [R, D, D, D, D, R]
    assert hs[1].ejections == 1 and hs[1].ejected_until == 40
    assert hs[2].ejections == 1  # not-READY → not-READY is not another ejection
    assert not routable(hs[3]) and "still ejected" in hs[3].reason
    assert routable(hs[5]) and hs[5].ready_since == 40


@pytest.mark.parametrize(("n", "hold"), [(1, 30), (2, 60), (3, 90), (9, 270), (10, 300), (11, 300), (20, 300)])
def test_ejection_time_grows_with_n_and_caps(n: int, hold: float) -> None:
    h = step_instance(None, "READY", 0)
    t = 0.0
    for _ in range(n):
        t = max(t, h.ejected_until) + 1  # READY for 1 s (far below the forget time), then fail
        h = step_instance(h, "READY", t)
        assert h.state is R
        h = step_instance(h, "UNHEALTHY", t)
    assert h.ejections == n
    assert h.ejected_until - t == hold


def test_ejections_forgotten_after_300s_ready() -> None:
    hs = run_instance([(0, "READY"), (10, "UNHEALTHY"), (40, "READY"), (50, "UNHEALTHY"), (110, "READY")])
    assert (hs[-1].state, hs[-1].ejections) == (R, 2)
    h = step_instance(hs[-1], "READY", 409)
    assert h.ejections == 2
    h = step_instance(h, "READY", 410)  # READY continuously for 300 s
    assert (h.state, h.ejections) == (R, 0)
    h = step_instance(h, "FAILED", 420)
    assert (h.ejections, h.ejected_until) == (1, 450)


def test_instance_steady_values_are_reused() -> None:
    h = step_instance(None, "READY", 0)
    assert step_instance(h, "READY", 5) is h
    d = step_instance(h, "UNHEALTHY", 10)
    assert d.reason == "agent reports UNHEALTHY; ejection 1 (30 s)"
    assert step_instance(d, "UNHEALTHY", 15) is d
    w = step_instance(d, "READY", 20)
    assert step_instance(w, "READY", 25) is w  # waiting out the ejection


def test_restarted_instance_keeps_its_restart_count_as_the_base() -> None:
    h = step_instance(None, "READY", 0, restarts=4)
    assert h.restarts == 4
    d = step_instance(h, "UNHEALTHY", 10, restarts=4)
    assert d.restarts == 4  # the base stays what it was when READY, through the whole failure
    assert step_instance(d, "STARTING", 12, restarts=5).ejections == 1


@pytest.mark.parametrize(
    ("events", "states", "ejections"),
    [
        pytest.param(
            [(0, "READY", 0), (10, "STOPPED", 0), (12, "STARTING", 0), (14, "WARMING", 0), (15, "READY", 0)],
            [R, D, D, D, R],
            0,
            id="operator stop and start: never ejected",
        ),
        pytest.param(
            [(0, "READY", 3), (10, "STARTING", 0), (11, "READY", 0)],
            [R, D, R],
            0,
            id="removed and re-added by reload between two samples",
        ),
        pytest.param(
            [(0, "READY", 2), (10, "STARTING", 2), (12, "WARMING", 2), (13, "READY", 2)],
            [R, D, D, R],
            0,
            id="operator restart (no restart counted)",
        ),
        pytest.param(
            [(0, "READY", 0), (10, "STARTING", 1), (12, "WARMING", 1), (13, "READY", 1), (40, "READY", 1)],
            [R, D, D, D, R],
            1,
            id="crash restart seen only as STARTING with a higher count: ejected",
        ),
        pytest.param(
            [(0, "READY", 0), (10, "UNHEALTHY", 0), (11, "RESTARTING", 0), (12, "STARTING", 1), (14, "READY", 1)],
            [R, D, D, D, D],
            1,
            id="crash seen in full: the restart keeps the ejection",
        ),
        pytest.param(
            [(0, "READY", 0), (10, "UNHEALTHY", 0), (11, "STOPPED", 0), (12, "STARTING", 0), (13, "READY", 0)],
            [R, D, D, D, R],
            0,
            id="an ejected instance stopped and started on purpose starts anew",
        ),
        pytest.param(
            [(0, "READY", 0), (10, "FAILED", 0), (11, "STARTING", 0), (12, "READY", 0)],
            [R, D, D, R],
            0,
            id="FAILED then started by an operator starts anew",
        ),
    ],
)
def test_only_failures_eject(events: list[tuple[float, str, int]], states: list[Health], ejections: int) -> None:
    h: InstanceHealth | None = None
    seen = []
    for t, agent_state, restarts in events:
        h = step_instance(h, agent_state, t, restarts=restarts)
        seen.append(h.state)
    assert h is not None
    assert (seen, h.ejections) == (states, ejections)


def test_started_anew_value_is_steady() -> None:
    h = step_instance(step_instance(None, "READY", 0), "STARTING", 10)
    assert step_instance(h, "STARTING", 11) is h


def test_departed_instances() -> None:
    old = node(instances=[inst("a"), inst("b"), inst("c")])
    assert departed(old, node(instances=[inst("c"), inst("d")])) == ["a", "b"]
    assert departed(old, old) == []


# --- routes --------------------------------------------------------------------------------------


def healthy_view(nodes: dict[str, NodeRecord]) -> tuple[dict[str, NodeHealth], dict[tuple[str, str], InstanceHealth]]:
    node_health = {name: step(None, rec, NOW) for name, rec in nodes.items()}
    inst_health = {
        (name, i.name): step_instance(None, i.state, NOW) for name, rec in nodes.items() for i in rec.instances
    }
    return node_health, inst_health


def plan_for(nodes, node_health=None, inst_health=None, drained=(), weights=DEFAULT_WEIGHTS, failover=DEFAULT_FAILOVER):
    nh0, ih0 = healthy_view(nodes)
    nh0.update(node_health or {})
    ih0.update(inst_health or {})
    return compute_routes(nodes, nh0, ih0, set(drained), 7, NOW, weights, failover)


def test_routes_group_instances_by_model_across_nodes() -> None:
    nodes = {
        "n1": node("n1", gpus=[gpu(0), gpu(1)], instances=[inst("a", "qwen3", [0]), inst("b", "llama", [1])]),
        "n2": node("n2", gpus=[gpu(0, "H100")], instances=[inst("c", "qwen3", [0])]),
    }
    plan = plan_for(nodes)
    assert set(plan.routes) == {"qwen3", "llama"}
    qwen = plan.routes["qwen3"]
    assert (qwen.model, qwen.epoch, qwen.updated_at) == ("qwen3", 7, NOW)
    assert (qwen.cross_class, qwen.panic_classes) == (False, [])
    assert [(e.node, e.instance, e.gpu_class, e.address, e.state) for e in qwen.endpoints] == [
        ("n1", "a", "A100", "http://n1:8080", "READY"),
        ("n2", "c", "H100", "http://n2:8080", "READY"),
    ]
    assert qwen.endpoints[0].weight == instance_weight(nodes["n1"], nodes["n1"].instances[0])
    assert plan.weights == {("n1", "a"): 206, ("n1", "b"): 206, ("n2", "c"): 357}
    assert plan.panic == {}


# Subject node "s" among four healthy A100 nodes, so one bad node never tips the class into panic.
@pytest.mark.parametrize(
    ("node_state", "drained", "inst_health", "agent_state", "expected"),
    [
        (R, False, None, "READY", "READY"),
        (X, False, None, "READY", "DOWN"),
        (X, True, None, "READY", "DOWN"),  # DOWN wins over drained
        (R, True, None, "READY", "DRAINED"),
        (D, False, None, "READY", "DEGRADED"),
        (R, False, EJECTED, "READY", "DEGRADED"),  # agent READY, still ejected
        (R, False, None, "STARTING", "DEGRADED"),  # no health entry: the agent's state decides
    ],
)
def test_endpoint_state_and_weight(
    node_state: Health, drained: bool, inst_health: InstanceHealth | None, agent_state: str, expected: str
) -> None:
    nodes = {f"ok{i}": class_node(f"ok{i}") for i in range(4)}
    nodes["s"] = class_node("s", state=agent_state)
    node_health, ih = healthy_view(nodes)
    node_health["s"] = nh(node_state)
    if inst_health is None:
        del ih[("s", "i0")]
    else:
        ih[("s", "i0")] = inst_health
    plan = compute_routes(
        nodes, node_health, ih, {"s"} if drained else set(), 7, NOW, DEFAULT_WEIGHTS, DEFAULT_FAILOVER
    )
    (ep,) = [e for e in plan.routes["qwen3"].endpoints if e.node == "s"]
    assert ep.state == expected
    assert (ep.weight >= 1) if expected == "READY" else (ep.weight == 0)
    assert plan.panic == {}


def _assigned(name: str, state: str = "READY") -> NodeRecord:
    """A node whose one instance of qwen3 the leader placed there (``assigned``)."""
    i = InstanceRecord(
        name="qwen3-0",
        model="qwen3",
        backend="vllm",
        state=state,  # type: ignore[arg-type]
        state_since=0.0,
        port=8000,
        gpus=[0],
        gpu_memory_fraction=0.9,
        assigned=True,
    )
    return node(name, instances=[i])


@pytest.mark.parametrize(
    ("others", "moving_state"),
    [
        pytest.param({}, "READY", id="nothing else serves the model: the drained replica still does"),
        pytest.param({"n2": _assigned("n2", "STARTING")}, "READY", id="replacement starting: still routed"),
        pytest.param({"n2": _assigned("n2")}, "DRAINED", id="replacement READY: drained like its node"),
        pytest.param({"n2": class_node("n2")}, "DRAINED", id="another READY endpoint of the model"),
    ],
)
def test_drained_nodes_assigned_replica_serves_until_another_is_ready(
    others: dict[str, NodeRecord], moving_state: str
) -> None:
    nodes = {"n1": _assigned("n1"), **others}
    ep = next(e for e in plan_for(nodes, drained={"n1"}).routes["qwen3"].endpoints if e.node == "n1")
    assert ep.state == moving_state
    assert (ep.weight > 0) == (moving_state == "READY")


def test_panic_is_applied_before_the_drained_standby_rule() -> None:
    """The model's only other endpoint is held back (its node DEGRADED), but it is the whole of
    its class, so panic routes it; the model is then served, and the drained replica is not."""
    nodes = {"n1": _assigned("n1"), "a0": class_node("a0", "H100")}
    plan = plan_for(nodes, node_health={"a0": nh(Health.DEGRADED)}, drained={"n1"})
    assert "H100" in plan.panic
    states = {e.node: e.state for e in plan.routes["qwen3"].endpoints}
    assert states == {"a0": "READY", "n1": "DRAINED"}


def test_drained_nodes_own_instances_are_never_routed() -> None:
    """An instance of the node's config file is not moved anywhere: the drain takes it out."""
    ep = plan_for({"n1": class_node("n1")}, drained={"n1"}).routes["qwen3"].endpoints[0]
    assert (ep.state, ep.weight) == ("DRAINED", 0)


def test_drained_replica_not_ready_or_ejected_is_not_routed() -> None:
    assert plan_for({"n1": _assigned("n1", "STARTING")}, drained={"n1"}).routes["qwen3"].endpoints[0].weight == 0
    plan = plan_for({"n1": _assigned("n1")}, inst_health={("n1", "qwen3-0"): EJECTED}, drained={"n1"})
    assert plan.routes["qwen3"].endpoints[0].weight == 0


def test_ready_endpoint_never_has_weight_zero() -> None:
    nodes = {"n1": node("n1", gpus=[gpu(0, "A10", util=100, temp=99)], instances=[inst(health=0.0)])}
    tiny = WeightPolicy(base={"A10": 1})
    assert instance_weight(nodes["n1"], nodes["n1"].instances[0], tiny) == 0
    (ep,) = plan_for(nodes, weights=tiny).routes["qwen3"].endpoints
    assert (ep.state, ep.weight) == ("READY", 1)


def test_missing_node_health_counts_as_ready() -> None:
    nodes = {"n1": class_node("n1")}
    plan = compute_routes(nodes, {}, {}, set(), 1, NOW, DEFAULT_WEIGHTS, DEFAULT_FAILOVER)
    assert plan.routes["qwen3"].endpoints[0].state == "READY"


def panic_cluster(bad: int, total: int = 4) -> tuple[dict[str, NodeRecord], dict[str, NodeHealth]]:
    """``total`` A100 nodes serving qwen3, the first ``bad`` DEGRADED; plus one healthy H100 node serving llama."""
    nodes = {f"a{i}": class_node(f"a{i}") for i in range(total)}
    nodes["h0"] = class_node("h0", "H100", "llama")
    return nodes, {f"a{i}": nh(D) for i in range(bad)}


def test_panic_routes_agent_ready_endpoints_above_threshold() -> None:
    nodes, node_health = panic_cluster(bad=3)
    nodes["a4"] = class_node("a4", state="UNHEALTHY")  # agent says no: stays out even in panic
    node_health["a4"] = nh(D)
    nodes["a5"] = class_node("a5")  # DOWN: stays out
    node_health["a5"] = nh(X)
    nodes["a6"] = class_node("a6")  # drained: stays out and is not counted
    plan = plan_for(nodes, node_health, drained={"a6"})
    # Unhealthy: a0 a1 a2 a4 a5 of a0..a5 → 5/6 > 0.5.
    assert set(plan.panic) == {"A100"}
    assert "5 of 6" in plan.panic["A100"]
    route = plan.routes["qwen3"]
    assert route.panic_classes == ["A100"]
    states = {e.node: (e.state, e.weight > 0) for e in route.endpoints}
    assert states == {
        "a0": ("READY", True),
        "a1": ("READY", True),
        "a2": ("READY", True),
        "a3": ("READY", True),
        "a4": ("DEGRADED", False),
        "a5": ("DOWN", False),
        "a6": ("DRAINED", False),
    }
    assert plan.weights[("a0", "i0")] == route.endpoints[0].weight == 206
    assert plan.routes["llama"].panic_classes == []  # H100 is fine


def test_panic_also_releases_ejected_instances_on_ready_nodes() -> None:
    nodes, _ = panic_cluster(bad=0)
    ih = {(f"a{i}", "i0"): EJECTED for i in range(3)}  # nodes READY, but all their instances ejected
    plan = plan_for(nodes, inst_health=ih)
    assert "A100" in plan.panic
    assert all(e.state == "READY" for e in plan.routes["qwen3"].endpoints)


@pytest.mark.parametrize(
    ("bad", "total", "threshold", "panic"),
    [
        (2, 4, 0.5, False),  # exactly half: no panic
        (3, 4, 0.5, True),
        (1, 4, 0.5, False),
        (4, 4, 0.5, True),
        (3, 4, 0.8, False),
        (1, 1, 0.5, True),  # a single node that looks bad: trust the agent
    ],
)
def test_panic_threshold(bad: int, total: int, threshold: float, panic: bool) -> None:
    nodes, node_health = panic_cluster(bad, total)
    plan = plan_for(nodes, node_health, failover=FailoverPolicy(panic_threshold=threshold))
    assert ("A100" in plan.panic) is panic
    states = [e.state for e in plan.routes["qwen3"].endpoints]
    assert states.count("DEGRADED") == (0 if panic else bad)
    assert plan.routes["qwen3"].panic_classes == (["A100"] if panic else [])


def test_drained_nodes_are_not_counted_for_panic() -> None:
    nodes, node_health = panic_cluster(bad=1, total=4)
    plan = plan_for(nodes, node_health, drained={"a2", "a3"})  # 1 of 2 left unhealthy: exactly half
    assert plan.panic == {}


def test_cross_class_flag_is_carried() -> None:
    plan = plan_for({"n1": class_node("n1")}, failover=FailoverPolicy(cross_class=True))
    assert plan.routes["qwen3"].cross_class is True


def test_endpoint_order_is_stable_and_routes_differ_ignores_updated_at() -> None:
    names = ["n3", "n1", "n2"]
    classes = {"n1": "H100", "n2": "A100", "n3": "A100"}
    fwd = {n: node(n, gpus=[gpu(0, classes[n])], instances=[inst("b"), inst("a")]) for n in names}
    rev = dict(reversed(fwd.items()))
    a = plan_for(fwd).routes["qwen3"]
    b = compute_routes(rev, *healthy_view(rev), set(), 7, NOW + 5, DEFAULT_WEIGHTS, DEFAULT_FAILOVER).routes["qwen3"]
    assert [(e.gpu_class, e.node, e.instance) for e in a.endpoints] == [
        ("A100", "n2", "a"),
        ("A100", "n2", "b"),
        ("A100", "n3", "a"),
        ("A100", "n3", "b"),
        ("H100", "n1", "a"),
        ("H100", "n1", "b"),
    ]
    assert b.updated_at != a.updated_at
    assert not routes_differ(a, b)
    assert routes_differ(None, a)


def test_routes_differ_on_content_and_epoch() -> None:
    nodes = {"n1": class_node("n1"), "n2": class_node("n2")}
    base = plan_for(nodes).routes["qwen3"]
    hotter = dict(nodes, n2=node("n2", gpus=[gpu(0, temp=80)]))
    assert routes_differ(base, plan_for(hotter).routes["qwen3"])  # a weight changed
    assert routes_differ(base, plan_for(nodes, {"n2": nh(D)}).routes["qwen3"])  # a state changed
    assert routes_differ(base, plan_for(nodes, failover=FailoverPolicy(cross_class=True)).routes["qwen3"])
    new_epoch = compute_routes(nodes, *healthy_view(nodes), set(), 8, NOW, DEFAULT_WEIGHTS, DEFAULT_FAILOVER)
    assert routes_differ(base, new_epoch.routes["qwen3"])  # a new leader stamps its epoch once


def test_models_removed() -> None:
    plan = plan_for({"n1": class_node("n1", model="qwen3")})
    assert models_removed({"qwen3", "llama", "old"}, plan) == {"llama", "old"}
    assert models_removed(set(), plan) == set()


def test_thousand_node_cluster() -> None:
    """The benchmark's shape (8 GPUs, 4 instances per node); correctness only, no timing."""
    classes = ["A10", "A100", "H100"]
    nodes = {}
    for i in range(1000):
        c = classes[i % 3]
        gpus = [gpu(g, c, util=float((i + g) % 100), temp=50.0 + (i + g) % 40) for g in range(8)]
        instances = [inst(f"i{k}", f"model-{(i + k) % 20}", [2 * k, 2 * k + 1], health=0.95) for k in range(4)]
        nodes[f"node-{i:04d}"] = node(f"node-{i:04d}", gpus=gpus, instances=instances)
    drained = {f"node-{i:04d}" for i in range(0, 1000, 100)}
    plan = plan_for(nodes, drained=drained)
    assert len(plan.routes) == 20
    assert len(plan.weights) == 4000
    assert plan.panic == {}
    endpoints = [e for r in plan.routes.values() for e in r.endpoints]
    assert len(endpoints) == 4000
    assert sum(e.state == "DRAINED" for e in endpoints) == 40
    assert all(e.weight >= 1 for e in endpoints if e.state == "READY")
    for r in plan.routes.values():
        keys = [(e.gpu_class, e.node, e.instance) for e in r.endpoints]
        assert keys == sorted(keys)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FailoverPolicy(panic_threshold=1.5),
        lambda: HealthPolicy(bad_samples=0),
        lambda: WeightPolicy(temp_span_c=0),
    ],
)
def test_policies_reject_nonsense(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_small_weight_moves_are_not_worth_a_write_and_add_up() -> None:
    nodes = {"n1": class_node("n1"), "n2": class_node("n2")}
    base = plan_for(nodes).routes["qwen3"]

    def with_weight(rec: RouteRecord, i: int, weight: int, state: str | None = None) -> RouteRecord:
        eps = list(rec.endpoints)
        eps[i] = msgspec.structs.replace(eps[i], weight=weight, state=state or eps[i].state)
        return msgspec.structs.replace(rec, endpoints=eps)

    w = base.endpoints[0].weight
    assert w > 40
    assert not routes_differ(base, with_weight(base, 0, w - 1), 0.05)  # under 5 %: not written
    assert routes_differ(base, with_weight(base, 0, w - 1))  # threshold 0: every change
    assert routes_differ(base, with_weight(base, 0, int(w * 0.9)), 0.05)  # 10 %: written
    assert routes_differ(base, with_weight(base, 0, 0), 0.05)  # to 0: always
    assert routes_differ(base, with_weight(base, 0, w, "DOWN"), 0.5)  # a state: always
    # Compared with what was written, moves of 2 % each are written once they add up past 5 %.
    drifted = [with_weight(base, 0, round(w * (1 - 0.02 * k))) for k in range(1, 5)]
    assert [routes_differ(base, d, 0.05) for d in drifted] == [False, False, True, True]
