"""Autoscaling as pure functions (coordinator/policy/autoscale.py): hysteresis, sustained windows,
cool-down, never stopping a serving replica; the load read from node records; the registry's
checks of max_replicas; and panic mode not raised by a replica loading for the first time."""

from __future__ import annotations

import pytest

from agent.cluster.publish_policy import Change, PublishPolicy, change_reason
from coordinator.policy.autoscale import AutoscaleState, Load, Step, initial, model_loads, step
from coordinator.policy.routes import compute_routes
from gpufleet.keyspace import assigned_instance_name
from gpufleet.keyspace.records import (
    AssignedInstance,
    GpuRecord,
    InstanceLoad,
    InstanceRecord,
    ModelRecord,
    NodeRecord,
)
from gpufleet.registry import autoscaled, fleet_problems, validate_model

M = ModelRecord(
    name="m", path="/models/m", replicas=1, max_replicas=3, scale_up_waiting=2, scale_up_after_s=30,
    scale_down_waiting=0.5, scale_down_after_s=300, scale_cooldown_s=120,
)  # fmt: skip


def run(loads: list[tuple[float, Load]], state: AutoscaleState | None = None) -> list[tuple[float, int, str]]:
    """Feed (now, load) samples in order; return (now, target, decision) for each decision."""
    st = state or initial(M, 1)
    out = []
    for now, load in loads:
        res = step(M, st, load, now)
        if res.decision:
            out.append((now, res.state.target, res.decision.split(":")[0]))
        st = res.state
    return out


def busy(ready: int, waiting: float, idle: tuple[str, ...] = ()) -> Load:
    return Load(assigned=ready, ready=ready, waiting=waiting, idle=idle)


@pytest.mark.parametrize(
    ("samples", "want"),
    [
        # high for the whole window: one replica more, exactly when the window is over
        ([(t, busy(1, 5)) for t in range(0, 31, 5)], [(30, 2, "scaled up")]),
        # high with a gap: the window starts over at the gap
        (
            [(0, busy(1, 5)), (20, busy(1, 1)), (25, busy(1, 5)), (50, busy(1, 5)), (55, busy(1, 5))],
            [(55, 2, "scaled up")],
        ),
        # the band between the thresholds (0.5 < mean <= 2) is neither high nor low: nothing
        ([(t, busy(1, 2)) for t in range(0, 400, 50)], []),
        # the mean is per READY replica: 5 waiting over 3 replicas is not high
        ([(t, Load(assigned=1, ready=3, waiting=5)) for t in range(0, 100, 10)], []),
        # no READY replica reporting a queue: no signal, nothing happens
        ([(t, Load(assigned=1, ready=0, waiting=0)) for t in range(0, 100, 10)], []),
    ],
)
def test_scale_up_needs_a_sustained_high_queue(samples: list[tuple[float, Load]], want: list[tuple]) -> None:
    assert run(samples) == want


def test_cool_down_and_a_replica_on_its_way_hold_the_next_scale_up() -> None:
    st = initial(M, 1)
    s1 = step(M, st, busy(1, 5), 0)
    s2 = step(M, s1.state, busy(1, 5), 30)
    assert s2.state.target == 2 and s2.state.changed_at == 30 and s2.decision.startswith("scaled up: 5.0 requests")
    # The new replica is not READY yet: its queue is still counted on one replica; no second step.
    s = s2.state
    for t in (60, 100, 200):
        s = step(M, s, busy(1, 5), t).state
    assert s.target == 2
    # Both READY and still long queues: cooled down (120 s since 30) and high for 30 s since 200.
    s3 = step(M, s, busy(2, 10), 230)
    assert s3.state.target == 3
    # At max_replicas: no further step however long the queue, and the status says so.
    s = s3.state
    for t in range(400, 1000, 60):
        s = step(M, s, busy(3, 30), t).state
    assert s.target == 3 and s.blocked == "queues still long at max_replicas (3)"
    assert step(M, s, busy(3, 3), 1000).state.blocked == ""  # the band: nothing is due


def test_cool_down_blocks_a_quick_reversal() -> None:
    s = AutoscaleState(target=2, changed_at=100)
    # Low since 110, for 300 s at 410; but the cool-down is over at 220 anyway: decided at 410.
    out = run([(110, busy(2, 0, ("n2",))), (300, busy(2, 0, ("n2",))), (410, busy(2, 0, ("n2",)))], s)
    assert out == [(410, 1, "scaled down")]
    # A long cool-down holds it past the window.
    long = ModelRecord(**{**_fields(M), "scale_cooldown_s": 1000})
    st = AutoscaleState(target=2, changed_at=100)
    for t in (110, 410, 900):
        st = step(long, st, busy(2, 0, ("n2",)), t).state
    assert st.target == 2
    assert step(long, st, busy(2, 0, ("n2",)), 1100).state.target == 1


def test_scale_down_stops_an_idle_replica_and_waits_while_every_one_serves() -> None:
    s = AutoscaleState(target=3, changed_at=-1000, low_since=0)
    waiting = step(M, s, busy(3, 0), 300)  # low for 300 s, but nothing idle
    assert waiting.state.target == 3 and waiting.victim is None and not waiting.decision
    assert "waiting for an idle replica" in waiting.state.blocked
    assert step(M, waiting.state, busy(3, 3), 305).state.blocked == ""  # not low any more: not due
    done = step(M, waiting.state, busy(3, 0, ("n1", "n3")), 310)
    assert done == Step(
        AutoscaleState(target=2, changed_at=310),
        "scaled down: 0.0 requests waiting per READY replica for 310 s (at most 0.5 for 300 s); "
        "stopping the replica on n1, which serves nothing",
        "n1",
    )
    # Never below replicas.
    s = AutoscaleState(target=1, changed_at=-1000, low_since=0)
    assert step(M, s, busy(1, 0, ("n1",)), 10_000).state.target == 1


def test_a_replica_that_was_never_placed_is_dropped_first() -> None:
    s = AutoscaleState(target=3, changed_at=-1000, low_since=0)
    res = step(M, s, Load(assigned=2, ready=2, waiting=0), 400)
    assert res.state.target == 2 and res.victim is None and "not placed" in res.decision


def test_bounds_follow_the_registration() -> None:
    assert initial(M, 0).target == 1 and initial(M, 2).target == 2 and initial(M, 7).target == 3
    smaller = ModelRecord(**{**_fields(M), "max_replicas": 2})
    res = step(smaller, AutoscaleState(target=3), busy(3, 0), 5)
    assert res.state.target == 2 and res.decision.startswith("registration changed")


def test_loads_from_node_records() -> None:
    def inst(state: str, running: float | None, waiting: float | None, model: str = "m") -> InstanceRecord:
        return InstanceRecord(
            name=assigned_instance_name(model), model=model, backend="vllm", state=state, state_since=0, port=1,
            gpus=[0], gpu_memory_fraction=None, assigned=True,
            load=InstanceLoad(requests_running=running, requests_waiting=waiting),
        )  # fmt: skip

    def node(n: str, *insts: InstanceRecord) -> NodeRecord:
        return NodeRecord(
            node=n, address="http://x", agent_version="t", started_at=0, updated_at=0, gpu_source="sim",
            gpu_classes=[], gpus=[], instances=list(insts),
        )  # fmt: skip

    def a(model: str = "m") -> AssignedInstance:
        return AssignedInstance(name=assigned_instance_name(model), model=model, path="/p", backend="vllm", gpus=[0])

    records = [
        node("n1", inst("READY", 4, 3)),  # busy
        node("n2", inst("READY", 0, 0), inst("READY", 9, 9, "o")),  # idle (the other model's load is not m's)
        node("n3", inst("WARMING", None, None)),  # not serving: stopped first
        node("n4", inst("READY", 1, None)),  # no queue reported: not counted, not idle
    ]
    current = {n: [a()] for n in ("n1", "n2", "n3", "n4", "n5")} | {"n2": [a(), a("o")]}
    assert model_loads(["m"], records, current) == {
        "m": Load(assigned=5, ready=2, waiting=3.0, idle=("n3", "n5", "n2"))  # n5: assigned, no record yet
    }


def test_registry_checks_max_replicas() -> None:
    def problems(**kw: object) -> list[str]:
        return validate_model(ModelRecord(**{**_fields(M), **kw}))

    assert problems() == [] and autoscaled(M)
    assert problems(max_replicas=0) == ["max_replicas: must be between replicas (1) and 1000"]
    assert problems(replicas=0, min_replicas=None) == [
        "max_replicas: needs replicas >= 1 (the load is measured on running replicas)"
    ]
    assert problems(scale_down_waiting=2) == [
        "scale_up_waiting, scale_down_waiting: need 0 <= scale_down_waiting < scale_up_waiting <= 10000 "
        "(the band between them is the hysteresis)"
    ]
    assert problems(scale_cooldown_s=-1) == ["scale_cooldown_s: must be between 0 and 604800 (7 days)"]
    assert not autoscaled(ModelRecord(**{**_fields(M), "max_replicas": 1}))


def test_max_replicas_the_fleet_cannot_hold_is_refused() -> None:
    def node(n: str, *classes: str) -> NodeRecord:
        gpus = [GpuRecord(index=i, uuid=f"{n}-{i}", name=c, gpu_class=c) for i, c in enumerate(classes)]
        return NodeRecord(
            node=n, address="http://x", agent_version="t", started_at=0, updated_at=0, gpu_source="sim",
            gpu_classes=sorted(set(classes)), gpus=gpus, instances=[],
        )  # fmt: skip

    tp2 = ModelRecord(**{**_fields(M), "gpus_per_replica": 2, "classes": ["A100"]})
    fleet = [node("a", "A100", "A100"), node("b", "A100", "H100"), node("c", "A100", "A100", "A100")]
    assert fleet_problems(tp2, fleet) == [
        "max_replicas: 3 replicas need 3 nodes with 2 GPU(s) of class A100 each (one replica per node); "
        "the cluster has 2"
    ]
    assert fleet_problems(ModelRecord(**{**_fields(tp2), "max_replicas": 2}), fleet) == []
    assert fleet_problems(tp2, []) == []  # no node registered yet: nothing to judge by


def _fields(m: ModelRecord) -> dict[str, object]:
    return {f: getattr(m, f) for f in m.__struct_fields__}


# --- panic mode and cold starts ----------------------------------------------------------------


def _panic_for(state: str, restarts: int) -> dict[str, str]:
    gpu = GpuRecord(index=0, uuid="g", name="NVIDIA A100-SXM4-80GB", gpu_class="A100")
    inst = InstanceRecord(
        name="m-0", model="m", backend="vllm", state=state, state_since=0, port=1, gpus=[0],
        gpu_memory_fraction=None, restarts=restarts, assigned=True,
    )  # fmt: skip
    rec = NodeRecord(
        node="n1", address="http://x", agent_version="t", started_at=0, updated_at=0, gpu_source="sim",
        gpu_classes=["A100"], gpus=[gpu], instances=[inst],
    )  # fmt: skip
    return compute_routes({"n1": rec}, {}, {}, set(), 1, 0.0).panic


@pytest.mark.parametrize(
    ("state", "restarts", "panic"),
    [
        ("STARTING", 0, False),  # a cold start of the class's only replica: expected, not an outage
        ("WARMING", 0, False),
        ("READY", 0, False),
        ("WARMING", 2, True),  # back after crashes: the node is not serving, as in an outage
        ("RESTARTING", 1, True),
        ("FAILED", 0, True),
        ("UNHEALTHY", 0, True),
    ],
)
def test_panic_ignores_a_replica_loading_for_the_first_time(state: str, restarts: int, panic: bool) -> None:
    assert bool(_panic_for(state, restarts)) is panic


# --- the agent publishes a queue that forms or drains -------------------------------------------


def test_a_queue_forming_or_draining_is_a_telemetry_change() -> None:
    def rec(running: float, waiting: float) -> NodeRecord:
        inst = InstanceRecord(
            name="m-0", model="m", backend="vllm", state="READY", state_since=0, port=1, gpus=[0],
            gpu_memory_fraction=None, load=InstanceLoad(requests_running=running, requests_waiting=waiting),
        )  # fmt: skip
        return NodeRecord(
            node="n1", address="http://x", agent_version="t", started_at=0, updated_at=0, gpu_source="sim",
            gpu_classes=[], gpus=[], instances=[inst],
        )  # fmt: skip

    p = PublishPolicy()
    load_change = Change("instance m-0 load", urgent=False)
    assert change_reason(rec(0, 0), rec(2, 0), p) == load_change  # idle -> serving
    assert change_reason(rec(2, 0), rec(2, 5), p) == load_change  # a queue formed
    assert change_reason(rec(2, 5), rec(2, 0), p) == load_change  # drained
    assert change_reason(rec(2, 5), rec(2, 6), p) is None  # 4-7 waiting: the same power of two
    assert change_reason(rec(1, 0), rec(2, 0), p) is None  # busier, nothing waiting: not worth a write
