"""Model placement (coordinator/policy/placement.py): pure, so every test builds records and calls place()."""

from __future__ import annotations

import pytest

from coordinator.policy.placement import NodeView, PlacementPlan, PlacementPolicy, place
from gpufleet.keyspace import assigned_instance_name
from gpufleet.keyspace.records import (
    LINK_NVLINK,
    LINK_PCIE_SWITCH,
    LINK_SYSTEM,
    LINK_UNKNOWN,
    AssignedInstance,
    GpuRecord,
    InstanceRecord,
    ModelAvailability,
    ModelRecord,
    NodeRecord,
)

GIB = 1024**3
NOW = 10_000.0

# --- builders ------------------------------------------------------------------------------------


def gpu(
    index: int = 0, cls: str = "A100", total: float | None = 80, free: float | None = 80, lost: bool = False
) -> GpuRecord:
    """A GPU with ``total`` and ``free`` in GiB (None: unreadable)."""
    return GpuRecord(
        index=index,
        uuid=f"GPU-{index}",
        name=f"NVIDIA {cls}",
        gpu_class=cls,
        memory_total_bytes=None if total is None else int(total * GIB),
        memory_free_bytes=None if free is None else int(free * GIB),
        lost=lost,
    )


def rinst(
    model: str, gpus: list[int] | None = None, state: str = "READY", frac: float | None = 0.5, name: str | None = None
) -> InstanceRecord:
    """An instance as the agent reports it; named like an assigned replica unless ``name`` is given."""
    return InstanceRecord(
        name=name or assigned_instance_name(model),
        model=model,
        backend="vllm",
        state=state,  # type: ignore[arg-type]
        state_since=0.0,
        port=8000,
        gpus=[0] if gpus is None else gpus,
        gpu_memory_fraction=frac,
        last_error="CUDA error: out of memory" if state == "FAILED" else None,
        assigned=name is None,
    )


def avail(model: str, ok: bool | None, error: str | None = None) -> ModelAvailability:
    return ModelAvailability(model=model, path=f"/models/{model}", available=ok, error=error)


def node(
    name: str,
    gpus: list[GpuRecord] | None = None,
    instances: list[InstanceRecord] | None = None,
    models: list[ModelAvailability] | None = None,
) -> NodeRecord:
    gpus = [gpu(0)] if gpus is None else gpus
    return NodeRecord(
        node=name,
        address=f"http://{name}:8080",
        mode="cluster",
        agent_version="0.1.0",
        started_at=0.0,
        updated_at=NOW,
        gpu_source="simulated",
        gpu_classes=sorted({g.gpu_class for g in gpus}),
        gpus=gpus,
        instances=instances or [],
        models=models or [],
    )


def view(rec: NodeRecord | None, state: str = "READY", down_since: float | None = None, drained: bool = False):
    return NodeView(record=rec, state=state, down_since=down_since, drained=drained)


def views(*recs: NodeRecord, **overrides: NodeView) -> dict[str, NodeView]:
    out = {r.node: view(r) for r in recs}
    out.update(overrides)
    return out


def model(
    name: str = "qwen",
    replicas: int = 1,
    vram: float | None = 40,
    classes: list[str] | None = None,
    frac: float | None = None,
    path: str | None = None,
    args: list[str] | None = None,
) -> ModelRecord:
    return ModelRecord(
        name=name,
        path=path or f"/models/{name}",
        replicas=replicas,
        min_vram_gib=vram,
        classes=classes or [],
        gpu_memory_fraction=frac,
        args=args or [],
    )


def models(*recs: ModelRecord) -> dict[str, ModelRecord]:
    return {m.name: m for m in recs}


def assigned(
    m: str = "qwen", gpu_index: int = 0, frac: float | None = 0.5, path: str | None = None
) -> AssignedInstance:
    """A replica as the current assignment record holds it."""
    name, path = assigned_instance_name(m), path or f"/models/{m}"
    return AssignedInstance(name=name, model=m, path=path, backend="vllm", gpus=[gpu_index], gpu_memory_fraction=frac)


def where(plan: PlacementPlan, m: str = "qwen") -> dict[str, list[int]]:
    """node -> GPUs of ``m``'s replicas in the plan."""
    return {n: a.gpus for n, insts in plan.assignments.items() for a in insts if a.model == m}


# --- class filtering -----------------------------------------------------------------------------


def test_placed_replica_is_complete_and_on_an_allowed_class() -> None:
    # The H100 node has more free memory and sorts first: the class filter must still win.
    m = model(classes=["A100"], args=["--max-model-len", "8192"])
    nodes = views(node("gpu-a100-1", [gpu(0, "A100", free=60)]), node("gpu-h100-1", [gpu(0, "H100", free=80)]))
    plan = place(models(m), nodes, {}, NOW)
    assert plan.assignments == {
        "gpu-a100-1": [
            AssignedInstance(
                name=assigned_instance_name("qwen"),
                model="qwen",
                path="/models/qwen",
                backend="vllm",
                gpus=[0],
                gpu_memory_fraction=0.5,
                args=["--max-model-len", "8192"],
            )
        ]
    }
    assert plan.status["qwen"].nodes == ["gpu-a100-1"]
    assert plan.status["qwen"].desired == 1 and plan.status["qwen"].unplaced == 0 and not plan.status["qwen"].reasons
    assert plan.moved == ["placed qwen on gpu-a100-1 GPU 0"]


def test_no_gpu_of_the_class_is_a_reason() -> None:
    nodes = views(node("gpu-a100-1", [gpu(0, "A100")]), node("gpu-a100-2", [gpu(0, "A100")]))
    plan = place(models(model(classes=["H100"])), nodes, {}, NOW)
    assert plan.assignments == {}
    assert plan.status["qwen"].unplaced == 1
    assert plan.status["qwen"].reasons == ["no node has a GPU of class H100"]


def test_mixed_node_uses_only_the_allowed_gpu() -> None:
    rec = node("mixed", [gpu(0, "H100", free=80), gpu(1, "A100", free=50)])
    plan = place(models(model(classes=["A100"])), views(rec), {}, NOW)
    assert where(plan) == {"mixed": [1]}


# --- memory fit ----------------------------------------------------------------------------------


def test_need_above_free_memory_is_a_reason_with_numbers() -> None:
    nodes = views(node("gpu-a100-1", [gpu(0, free=20), gpu(1, free=10)]), node("gpu-a100-2", [gpu(0, free=15)]))
    plan = place(models(model(vram=40)), nodes, {}, NOW)
    assert plan.assignments == {}
    assert plan.status["qwen"].reasons == [
        "insufficient GPU memory: needs 40.0 GiB, most free is 20.0 GiB on gpu-a100-1 GPU 0"
    ]


def test_pending_replicas_consume_the_ledger() -> None:
    # Nothing is running yet, so free memory says 80 GiB twice; the second model must see the first.
    one = views(node("n1", [gpu(0, free=80)]))
    plan = place(models(model("a", vram=50), model("b", vram=50)), one, {}, NOW)
    assert where(plan, "a") == {"n1": [0]} and where(plan, "b") == {}
    # 50 GiB of 80 is a 0.63 share (rounded up to whole percents), so 50.4 GiB are reserved.
    assert plan.status["b"].reasons == ["insufficient GPU memory: needs 50.4 GiB, most free is 29.6 GiB on n1 GPU 0"]

    two_gpus = views(node("n1", [gpu(0), gpu(1)]))
    plan = place(models(model("a", vram=50), model("b", vram=50)), two_gpus, {}, NOW)
    assert where(plan, "a") == {"n1": [0]} and where(plan, "b") == {"n1": [1]}


def test_kept_replica_still_starting_is_pending() -> None:
    # "a" is STARTING on GPU 0: its 50 GiB are not in the measured free memory yet.
    rec = node("n1", [gpu(0, free=80)], [rinst("a", state="STARTING", frac=0.63)])
    plan = place(models(model("a", vram=50), model("b", vram=50)), views(rec), {"n1": [assigned("a", frac=0.63)]}, NOW)
    assert where(plan, "a") == {"n1": [0]} and where(plan, "b") == {}
    assert plan.status["b"].unplaced == 1


@pytest.mark.parametrize(
    ("state", "holds_memory"),
    [("STARTING", False), ("RESTARTING", False), ("STOPPED", False), ("WARMING", True), ("READY", True),
     ("UNHEALTHY", True)],
)  # fmt: skip
def test_kept_replica_is_pending_until_it_holds_memory(state: str, holds_memory: bool) -> None:
    # "a" (30.4 GiB, 0.38) is kept on GPU 0; 10 GiB are used by something else, so 70 GiB are measured free.
    # Once "a" holds its memory the 70 GiB already exclude it; before that, the plan must charge it.
    rec = node("n1", [gpu(0, free=70)], [rinst("a", state=state, frac=0.38)])
    plan = place(models(model("a", vram=30), model("b", vram=45)), views(rec), {"n1": [assigned("a")]}, NOW)
    assert where(plan, "a") == {"n1": [0]}
    if holds_memory:
        assert where(plan, "b") == {"n1": [0]}
    else:
        assert plan.status["b"].reasons == [
            "insufficient GPU memory: needs 45.6 GiB, most free is 39.6 GiB on n1 GPU 0"
        ]


def test_placed_replicas_count_toward_the_fraction_budget() -> None:
    # Bytes would fit twice (40 + 40 of 80 GiB free), but 0.5 + 0.5 is over the 0.95 budget.
    plan = place(models(model("a", vram=None, frac=0.5), model("b", vram=None, frac=0.5)), views(node("n1")), {}, NOW)
    assert where(plan, "a") == {"n1": [0]} and where(plan, "b") == {}
    assert plan.status["b"].reasons == [
        "GPU memory budget exceeded: needs a 0.50 share, at most 0.45 left (budget 0.95) on n1 GPU 0"
    ]


def test_more_free_memory_wins_between_equal_nodes() -> None:
    nodes = views(node("n1", [gpu(0, free=50)]), node("n2", [gpu(0, free=70)]), node("n3", [gpu(0, free=70)]))
    assert where(place(models(model()), nodes, {}, NOW)) == {"n2": [0]}


def test_fraction_budget_counts_static_instances() -> None:
    # A static instance (from the agent's config) promised 0.6 of GPU 0 but holds little memory yet.
    rec = node("n1", [gpu(0, free=79)], [rinst("llama", frac=0.6, state="STARTING", name="static-llama")])
    plan = place(models(model(vram=None, frac=0.4)), views(rec), {}, NOW)
    assert plan.assignments == {}
    assert plan.status["qwen"].reasons == [
        "GPU memory budget exceeded: needs a 0.40 share, at most 0.35 left (budget 0.95) on n1 GPU 0"
    ]
    plan = place(models(model(vram=None, frac=0.35)), views(rec), {}, NOW)
    assert where(plan) == {"n1": [0]}
    plan = place(models(model(vram=None, frac=0.4)), views(rec), {}, NOW, PlacementPolicy(memory_budget=1.0))
    assert where(plan) == {"n1": [0]}


def test_unsized_model_takes_a_whole_gpu() -> None:
    plan = place(models(model("a", vram=None), model("b", vram=None)), views(node("n1", [gpu(0)])), {}, NOW)
    assert [a.gpu_memory_fraction for a in plan.assignments["n1"]] == [0.9]
    assert plan.status["b"].unplaced == 1


def test_larger_models_are_placed_first() -> None:
    # Smallest-first would put "a-small" on the 80 GiB GPU (most free) and leave "b-big" nowhere.
    nodes = views(node("n1", [gpu(0, total=40, free=40)]), node("n2", [gpu(0, total=80, free=80)]))
    plan = place(models(model("a-small", vram=30), model("b-big", vram=70)), nodes, {}, NOW)
    assert where(plan, "b-big") == {"n2": [0]} and where(plan, "a-small") == {"n1": [0]}
    assert plan.moved == ["placed b-big on n2 GPU 0", "placed a-small on n1 GPU 0"]


def test_gpu_with_most_free_memory_then_lowest_index() -> None:
    plan = place(models(model()), views(node("n1", [gpu(0, free=50), gpu(1, free=70), gpu(2, free=70)])), {}, NOW)
    assert where(plan) == {"n1": [1]}


def test_lost_gpu_is_not_used() -> None:
    plan = place(models(model()), views(node("n1", [gpu(0, free=80, lost=True), gpu(1, free=45)])), {}, NOW)
    assert where(plan) == {"n1": [1]}
    plan = place(models(model()), views(node("n1", [gpu(0, lost=True)])), {}, NOW)
    assert plan.status["qwen"].reasons == ["GPU lost on n1"]


def test_unknown_gpu_memory_is_not_used() -> None:
    plan = place(models(model()), views(node("n1", [gpu(0, total=None, free=None)])), {}, NOW)
    assert plan.assignments == {}
    assert plan.status["qwen"].reasons == ["GPU memory unknown on n1"]


# --- spread --------------------------------------------------------------------------------------


def test_three_replicas_go_to_three_nodes() -> None:
    nodes = views(*(node(f"n{i}", [gpu(0), gpu(1)]) for i in (1, 2, 3)))
    plan = place(models(model(replicas=3, vram=10)), nodes, {}, NOW)
    assert where(plan) == {"n1": [0], "n2": [0], "n3": [0]}
    assert plan.status["qwen"].nodes == ["n1", "n2", "n3"]


def test_fewer_eligible_nodes_than_replicas() -> None:
    # Plenty of room for two replicas on one node, but never two of a model on one node.
    nodes = views(node("n1", [gpu(0), gpu(1)]), node("n2", [gpu(0), gpu(1)]))
    plan = place(models(model(replicas=3, vram=10)), nodes, {}, NOW)
    assert sorted(where(plan)) == ["n1", "n2"]
    st = plan.status["qwen"]
    assert (st.desired, st.nodes, st.unplaced) == (3, ["n1", "n2"], 1)
    assert st.reasons == ["only 2 eligible nodes for 3 replicas (one replica per node)"]


def test_new_replica_prefers_the_node_with_fewer_replicas() -> None:
    # "a" is on n1 already; "b" would fit on either and n1 has more free memory, but n2 is emptier.
    nodes = views(node("n1", [gpu(0), gpu(1)], [rinst("a")]), node("n2", [gpu(0, free=40)]))
    plan = place(models(model("a", vram=10), model("b", vram=10)), nodes, {"n1": [assigned("a")]}, NOW)
    assert where(plan, "b") == {"n2": [0]}


# --- availability --------------------------------------------------------------------------------


def test_verified_path_ranks_above_not_checked() -> None:
    # n1 sorts first and has more free memory, but only n2 has checked the path.
    nodes = views(
        node("n1", [gpu(0, free=80)], models=[avail("qwen", None)]),
        node("n2", [gpu(0, free=50)], models=[avail("qwen", True)]),
    )
    assert where(place(models(model()), nodes, {}, NOW)) == {"n2": [0]}


def test_unavailable_path_is_excluded_with_its_error() -> None:
    err = "/models/qwen: No such file or directory"
    nodes = views(node("gpu-a100-1", models=[avail("qwen", False, err)]), node("gpu-a100-2"))
    plan = place(models(model(replicas=2)), nodes, {}, NOW)
    assert where(plan) == {"gpu-a100-2": [0]}
    assert plan.status["qwen"].reasons == [
        f"path unavailable on gpu-a100-1: {err}",
        "only 1 eligible node for 2 replicas (one replica per node)",
    ]


# --- stability -----------------------------------------------------------------------------------


def test_existing_assignment_stays_when_another_node_has_more_room() -> None:
    nodes = views(node("n1", [gpu(0, free=41)], [rinst("qwen")]), node("n2", [gpu(0, free=80)]))
    plan = place(models(model()), nodes, {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n1": [0]}
    assert plan.moved == []


def test_existing_assignment_stays_when_memory_is_tight() -> None:
    # Another tenant took the memory; the running replica is not restarted elsewhere.
    nodes = views(node("n1", [gpu(0, free=1)], [rinst("qwen", state="READY")]), node("n2"))
    plan = place(models(model()), nodes, {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n1": [0]} and plan.moved == []


def test_kept_replica_is_refreshed_in_place() -> None:
    rec = node("n1", [gpu(0, free=30), gpu(1, free=80)], [rinst("qwen")])
    m = model(vram=60, path="/models/qwen-v2", args=["--enforce-eager"])
    plan = place(models(m), views(rec, n2=view(node("n2"))), {"n1": [assigned(path="/models/qwen-v1")]}, NOW)
    [a] = plan.assignments["n1"]
    assert (a.gpus, a.path, a.args, a.gpu_memory_fraction) == ([0], "/models/qwen-v2", ["--enforce-eager"], 0.75)
    assert sorted(plan.assignments) == ["n1"] and plan.moved == []


def test_down_node_is_kept_within_the_grace_time() -> None:
    nodes = views(node("n2"), n1=view(node("n1"), "DOWN", down_since=NOW - 10))
    plan = place(models(model()), nodes, {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n1": [0]}
    assert plan.status["qwen"].nodes == ["n1"] and plan.status["qwen"].unplaced == 0
    assert plan.moved == []


def test_down_node_is_moved_after_the_grace_time() -> None:
    nodes = views(node("n2"), n1=view(node("n1"), "DOWN", down_since=NOW - 31))
    plan = place(models(model()), nodes, {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n2": [0]}
    assert plan.moved == ["removed qwen from n1: node DOWN for 31 s", "placed qwen on n2 GPU 0"]


def test_node_key_gone_counts_as_down() -> None:
    current = {"n1": [assigned()]}
    early = views(node("n2"), n1=view(None, "DOWN", down_since=NOW - 5))
    assert where(place(models(model()), early, current, NOW)) == {"n1": [0]}
    late = views(node("n2"), n1=view(None, "DOWN", down_since=NOW - 60))
    plan = place(models(model()), late, current, NOW, PlacementPolicy(reschedule_after_s=45))
    assert where(plan) == {"n2": [0]}
    assert plan.moved[0] == "removed qwen from n1: node DOWN for 60 s"


def test_unknown_node_is_moved_at_once() -> None:
    plan = place(models(model()), views(node("n2")), {"gone": [assigned()]}, NOW)
    assert where(plan) == {"n2": [0]}
    assert plan.moved == ["removed qwen from gone: node unknown", "placed qwen on n2 GPU 0"]


def test_drained_node_is_moved_before_it_is_removed() -> None:
    """Make before break: the drained node's replica serves until its replacement is READY."""
    drained = view(node("n1", instances=[rinst("qwen")]), drained=True)
    plan = place(models(model(replicas=2)), views(node("n2"), n1=drained), {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n1": [0], "n2": [0]}
    assert plan.assignments["n1"] == [assigned()]  # unchanged: nothing rewritten, it keeps running
    assert plan.moved == [
        "placed qwen on n2 GPU 0",
        "moving qwen off n1: node drained; it serves there until its replacement is READY",
    ]
    assert plan.status["qwen"].nodes == ["n2"]
    assert plan.status["qwen"].reasons == [
        "n1 drained",
        "only 1 eligible node for 2 replicas (one replica per node)",
    ]
    # The replacement starting: nothing changes, nothing is logged again.
    starting = node("n2", instances=[rinst("qwen", state="STARTING")])
    plan = place(models(model(replicas=2)), views(starting, n1=drained), plan.assignments, NOW)
    assert (where(plan), plan.moved) == ({"n1": [0], "n2": [0]}, [])
    # The replacement READY, but the model wants 2 and no other node can take the second:
    # the drained node's replica keeps serving, and the status says so (nothing is logged).
    ready = node("n2", instances=[rinst("qwen")])
    plan = place(models(model(replicas=2)), views(ready, n1=drained), plan.assignments, NOW)
    assert (where(plan), plan.moved) == ({"n1": [0], "n2": [0]}, [])
    assert plan.status["qwen"].reasons[-1] == (
        "kept serving on n1 (node drained): no capacity elsewhere for its replacement"
    )
    # One replica wanted: its replacement READY, the drained node's replica goes.
    plan = place(models(model()), views(ready, n1=drained), plan.assignments, NOW)
    assert where(plan) == {"n2": [0]}
    assert plan.moved == ["removed qwen from n1: node drained; its replacement is READY"]


@pytest.mark.parametrize(
    ("n1", "cause"),
    [
        (view(node("n1"), drained=True), "node drained"),  # no instance there: nothing serves
        (view(node("n1", instances=[rinst("qwen", state="STARTING")]), drained=True), "node drained"),
        (view(None, "DOWN", down_since=NOW - 60), "node DOWN for 60 s"),
        (view(node("n1", instances=[rinst("qwen")]), "DOWN", down_since=NOW - 60), "node DOWN for 60 s"),
        (view(node("n1", instances=[rinst("qwen", state="FAILED")])), "instance FAILED: CUDA error: out of memory"),
    ],
)
def test_a_replica_that_does_not_serve_is_removed_at_once(n1: NodeView, cause: str) -> None:
    plan = place(models(model()), views(node("n2"), n1=n1), {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n2": [0]}
    assert plan.moved == [f"removed qwen from n1: {cause}", "placed qwen on n2 GPU 0"]


def test_drained_node_with_nowhere_to_move_keeps_serving_and_says_so() -> None:
    drained = view(node("n1", instances=[rinst("qwen")]), drained=True)
    plan = place(models(model()), views(n1=drained), {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n1": [0]} and plan.moved == []  # unchanged: nothing to write or log
    assert plan.status["qwen"].reasons[-1] == (
        "kept serving on n1 (node drained): no capacity elsewhere for its replacement"
    )
    # Capacity appears: the replacement is placed, and the drained one goes once it is READY.
    plan = place(models(model()), views(node("n2"), n1=drained), {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n1": [0], "n2": [0]}
    ready = views(node("n2", instances=[rinst("qwen")]), n1=drained)
    assert where(place(models(model()), ready, plan.assignments, NOW)) == {"n2": [0]}


def test_bad_path_replica_serves_until_its_replacement_is_ready() -> None:
    bad = node("n1", instances=[rinst("qwen")], models=[avail("qwen", False, "gone")])
    plan = place(models(model()), views(bad, node("n2")), {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n1": [0], "n2": [0]}
    assert (
        plan.moved[-1] == "moving qwen off n1: path unavailable: gone; it serves there until its replacement is READY"
    )
    plan = place(models(model()), views(bad, node("n2", instances=[rinst("qwen")])), plan.assignments, NOW)
    assert where(plan) == {"n2": [0]}


def test_failed_instance_moves_to_another_node() -> None:
    # n1 has the most free memory, but the replica failed there: it must not be placed straight back.
    nodes = views(node("n1", [gpu(0, free=80)], [rinst("qwen", state="FAILED")]), node("n2", [gpu(0, free=50)]))
    plan = place(models(model()), nodes, {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n2": [0]}
    assert plan.moved == [
        "removed qwen from n1: instance FAILED: CUDA error: out of memory",
        "placed qwen on n2 GPU 0",
    ]


def test_failed_instance_with_nowhere_to_go() -> None:
    nodes = views(node("n1", [gpu(0)], [rinst("qwen", state="FAILED")]))
    plan = place(models(model()), nodes, {"n1": [assigned()]}, NOW)
    assert plan.assignments == {}
    assert plan.status["qwen"].reasons == ["replica FAILED on n1: CUDA error: out of memory"]


@pytest.mark.parametrize(
    ("m", "gpus", "avail_ok", "cause", "now_on"),
    [
        (model(classes=["H100"]), [gpu(0, "A100"), gpu(1, "H100")], None, "GPU 0 is A100, model allows H100", [1]),
        (model(), [gpu(0, lost=True), gpu(1)], None, "GPU 0 lost", [1]),
        (model(), [gpu(1)], None, "GPU 0 gone", [1]),  # e.g. the node came back with other GPUs
        (model(), [gpu(0)], False, "path unavailable: checksum mismatch", None),
    ],
)
def test_kept_assignment_causes(
    m: ModelRecord, gpus: list[GpuRecord], avail_ok: bool | None, cause: str, now_on: list[int] | None
) -> None:
    rec = node("n1", gpus, models=[avail("qwen", avail_ok, "checksum mismatch")])
    plan = place(models(m), views(rec), {"n1": [assigned()]}, NOW)
    assert plan.moved[0] == f"removed qwen from n1: {cause}"
    # The node itself may still take the replica on another GPU (it is a new placement, not a keep).
    assert where(plan) == ({"n1": now_on} if now_on else {})
    assert plan.moved[1:] == ([f"placed qwen on n1 GPU {now_on[0]}"] if now_on else [])


def test_degraded_node_keeps_its_replica() -> None:
    nodes = views(node("n2"), n1=view(node("n1", instances=[rinst("qwen")]), "DEGRADED"))
    plan = place(models(model()), nodes, {"n1": [assigned()]}, NOW)
    assert where(plan) == {"n1": [0]} and plan.moved == []


def test_degraded_node_ranks_after_ready_for_new_replicas() -> None:
    nodes = views(node("n2", [gpu(0, free=45)]), n1=view(node("n1", [gpu(0, free=80)]), "DEGRADED"))
    assert where(place(models(model()), nodes, {}, NOW)) == {"n2": [0]}
    # ... but it is eligible when a READY node cannot take one.
    assert sorted(where(place(models(model(replicas=2)), nodes, {}, NOW))) == ["n1", "n2"]


def test_down_and_drained_nodes_are_reasons_with_capped_names() -> None:
    nodes = views(node("gpu-a100-1", [gpu(0, free=10)]))
    nodes.update({f"gpu-a100-{i}": view(node(f"gpu-a100-{i}"), "DOWN", down_since=NOW) for i in range(2, 9)})
    nodes["gpu-a100-9"] = view(node("gpu-a100-9"), drained=True)
    plan = place(models(model()), nodes, {}, NOW)
    assert plan.status["qwen"].reasons == [
        "gpu-a100-2, gpu-a100-3, gpu-a100-4, gpu-a100-5, gpu-a100-6 and 2 more DOWN",
        "gpu-a100-9 drained",
        "insufficient GPU memory: needs 40.0 GiB, most free is 10.0 GiB on gpu-a100-1 GPU 0",
    ]


# --- replica count -------------------------------------------------------------------------------


def test_fewer_replicas_keep_the_ready_ones() -> None:
    nodes = views(
        node("n1", instances=[rinst("qwen", state="STARTING")]),
        node("n2", instances=[rinst("qwen", state="READY")]),
        node("n3", instances=[rinst("qwen", state="WARMING")]),
    )
    current = {n: [assigned()] for n in ("n1", "n2", "n3")}
    plan = place(models(model(replicas=1)), nodes, current, NOW)
    assert where(plan) == {"n2": [0]}
    assert plan.moved == ["removed qwen from n1: replicas reduced to 1", "removed qwen from n3: replicas reduced to 1"]


def test_fewer_replicas_then_ready_nodes_then_name() -> None:
    ready = [rinst("qwen")]
    nodes = views(node("n1", instances=ready), node("n2", instances=ready), node("n3", instances=ready))
    current = {n: [assigned()] for n in ("n1", "n2", "n3")}
    assert sorted(where(place(models(model(replicas=2)), nodes, current, NOW))) == ["n1", "n2"]
    nodes["n1"] = view(nodes["n1"].record, "DEGRADED")
    assert sorted(where(place(models(model(replicas=2)), nodes, current, NOW))) == ["n2", "n3"]


def test_a_duplicate_assignment_on_one_node_is_removed() -> None:
    """One replica per (model, node): a second copy in the same assignment record goes."""
    nodes = views(node("n1", gpus=[gpu(0), gpu(1)], instances=[rinst("qwen")]))
    plan = place(models(model()), nodes, {"n1": [assigned(gpu_index=1), assigned(gpu_index=0)]}, NOW)
    assert where(plan) == {"n1": [0]}  # the first in (name, model, gpus) order stays
    assert plan.moved == ["removed qwen from n1: duplicate assignment"]


def test_a_kept_replica_on_a_gpu_of_unknown_memory_keeps_its_fraction() -> None:
    """Nothing to compute a share from: the replica keeps what it was given, and nothing is
    charged as pending on that GPU."""
    nodes = views(node("n1", gpus=[gpu(0, total=None, free=None)], instances=[rinst("qwen")]))
    plan = place(models(model()), nodes, {"n1": [assigned(frac=0.7)]}, NOW)
    (a,) = plan.assignments["n1"]
    assert (a.gpus, a.gpu_memory_fraction) == ([0], 0.7)
    assert plan.moved == []


def test_zero_replicas_removes_every_assignment() -> None:
    plan = place(models(model(replicas=0)), views(node("n1")), {"n1": [assigned()]}, NOW)
    assert plan.assignments == {}
    st = plan.status["qwen"]
    assert (st.desired, st.nodes, st.unplaced, st.reasons) == (0, [], 0, [])
    assert plan.moved == ["removed qwen from n1: replicas reduced to 0"]


def test_removed_model_loses_its_assignments() -> None:
    current = {"n1": [assigned("old"), assigned("qwen")]}
    nodes = views(node("n1", [gpu(0), gpu(1)], [rinst("old"), rinst("qwen")]))
    plan = place(models(model()), nodes, current, NOW)
    assert [a.model for a in plan.assignments["n1"]] == ["qwen"]
    assert set(plan.status) == {"qwen"}
    assert plan.moved == ["removed old from n1: model no longer registered"]


# --- determinism ---------------------------------------------------------------------------------


def test_same_input_same_plan_in_any_dict_order() -> None:
    recs = [node(f"n{i}", [gpu(0), gpu(1, free=70)]) for i in range(1, 5)]
    ms = [model("a", replicas=2, vram=20), model("b", replicas=3, vram=20), model("c", replicas=2, vram=None)]
    current = {"n2": [assigned("a")], "n3": [assigned("b")]}
    plan = place(models(*ms), views(*recs), current, NOW)
    assert place(models(*ms), views(*recs), current, NOW) == plan
    backwards = place(models(*ms[::-1]), views(*recs[::-1]), dict(reversed(current.items())), NOW)
    assert backwards == plan
    assert list(plan.assignments) == sorted(plan.assignments)
    assert all(sum(a.model == m.name for a in insts) <= 1 for insts in plan.assignments.values() for m in ms)
    assert [plan.status[m.name].unplaced for m in ms] == [0, 0, 0]
    # Kept where they were; "c" (a whole GPU each) first, on the emptiest nodes; then one per node.
    layout = {n: [(a.model, a.gpus[0]) for a in insts] for n, insts in plan.assignments.items()}
    assert layout == {
        "n1": [("a", 1), ("c", 0)],
        "n2": [("a", 0), ("b", 1)],
        "n3": [("b", 0)],
        "n4": [("b", 1), ("c", 0)],
    }


# --- multi-GPU (tensor-parallel) replicas ---------------------------------------------------------


def tp(n: int, replicas: int = 1, vram: float | None = 40, classes: list[str] | None = None) -> ModelRecord:
    import msgspec

    return msgspec.structs.replace(model(replicas=replicas, vram=vram, classes=classes), gpus_per_replica=n)


def test_a_tp2_replica_takes_the_two_freest_gpus_of_one_class_on_one_node() -> None:
    a = node("a", [gpu(0, free=50), gpu(1, free=79), gpu(2, free=45), gpu(3, free=78)])
    plan = place(models(tp(2)), views(a), {}, NOW)
    assert where(plan) == {"a": [1, 3]}
    assert plan.moved == ["placed qwen on a GPUs 1,3"]
    (inst,) = plan.assignments["a"]
    assert inst.gpu_memory_fraction == 0.5  # 40 GiB on each 80 GiB GPU


def test_gpus_of_two_classes_do_not_make_one_replica() -> None:
    mixed = node("mixed", [gpu(0, "A100"), gpu(1, "H100")])
    plan = place(models(tp(2)), views(mixed), {}, NOW)
    assert plan.assignments == {}
    assert plan.status["qwen"].reasons == [
        "no node has 2 fitting GPUs of one class for a replica (at most 1 on one node)"
    ]
    # ...but a node with two of the same class takes it, whatever else it has.
    h = node("h", [gpu(0, "A100"), gpu(1, "H100"), gpu(2, "H100", free=60)])
    assert where(place(models(tp(2)), views(mixed, h), {}, NOW)) == {"h": [1, 2]}


def test_fragmented_free_memory_does_not_fit_and_says_so() -> None:
    # Two GPUs with 30 GiB free each: a TP=2 replica needs 40 GiB on each.
    busy = node("busy", [gpu(0, free=30), gpu(1, free=30), gpu(2, free=79)])
    plan = place(models(tp(2)), views(busy), {}, NOW)
    assert plan.assignments == {} and plan.status["qwen"].unplaced == 1
    reasons = plan.status["qwen"].reasons
    assert any(r.startswith("insufficient GPU memory: needs 40.0 GiB") for r in reasons)
    assert "no node has 2 fitting GPUs of one class for a replica (at most 1 on one node)" in reasons


def test_tp_replicas_prefer_the_node_whose_chosen_gpus_leave_most_and_charge_each_gpu() -> None:
    roomy = node("roomy", [gpu(0, free=79), gpu(1, free=70)])
    tight = node("tight", [gpu(0, free=79), gpu(1, free=45)])
    plan = place(models(tp(2, replicas=1)), views(roomy, tight), {}, NOW)
    assert where(plan) == {"roomy": [0, 1]}
    # Charged on both GPUs: a second model of 40 GiB per GPU no longer fits beside the first.
    other = msgspec_replace(tp(2), name="other", path="/models/other")
    plan = place(models(tp(2), other), views(roomy), {}, NOW)
    assert where(plan, "other") == {"roomy": [0, 1]}  # same size: by name
    assert where(plan) == {} and plan.status["qwen"].unplaced == 1


def test_a_kept_replica_moves_when_its_gpu_count_changes_or_one_gpu_is_lost() -> None:
    a = node("a", [gpu(0), gpu(1), gpu(2)], instances=[rinst("qwen", gpus=[0, 1])])
    b = node("b", [gpu(0), gpu(1), gpu(2), gpu(3)])
    current = {"a": [AssignedInstance(name=assigned_instance_name("qwen"), model="qwen", path="/models/qwen",
                                      backend="vllm", gpus=[0, 1], gpu_memory_fraction=0.5)]}  # fmt: skip
    assert where(place(models(tp(2)), views(a, b), current, NOW)) == {"a": [0, 1]}  # kept as it is
    # Three per replica now: the new one is placed; the old one serves until it is READY.
    plan = place(models(tp(3)), views(a, b), current, NOW)
    assert where(plan) == {"a": [0, 1], "b": [0, 1, 2]}
    # A GPU of the replica lost: it does not serve any more, and goes at once.
    lost = node("a", [gpu(0), gpu(1, lost=True), gpu(2), gpu(3)], instances=[rinst("qwen", gpus=[0, 1])])
    plan = place(models(tp(2)), views(lost), current, NOW)
    assert where(plan) == {"a": [2, 3]}  # GPU 0 still holds the old one's share
    assert "removed qwen from a: GPU 1 lost" in plan.moved


def msgspec_replace(m: ModelRecord, **kw: object) -> ModelRecord:
    import msgspec

    return msgspec.structs.replace(m, **kw)


# --- interconnect: multi-GPU replicas prefer GPUs that share a fast link -------------------------

NV, SW, SYS, UNK = LINK_NVLINK, LINK_PCIE_SWITCH, LINK_SYSTEM, LINK_UNKNOWN


def linked(gpus: list[GpuRecord], islands: list[list[int]], between: int = SYS) -> list[GpuRecord]:
    """``gpus`` with links: NVLink within each island, ``between`` across islands."""
    island = {i: n for n, members in enumerate(islands) for i in members}
    out = []
    for g in gpus:
        row = [0 if j == g.index else NV if island.get(j) == island.get(g.index) else between for j in range(len(gpus))]
        out.append(msgspec_replace_gpu(g, links=row))
    return out


def msgspec_replace_gpu(g: GpuRecord, **kw: object) -> GpuRecord:
    import msgspec

    return msgspec.structs.replace(g, **kw)


TWO_ISLANDS = [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(
    ("free", "islands", "want"),
    [
        # The four freest (0, 1, 4, 5) straddle the islands; island 2's least free has more than island 1's.
        ([80, 80, 70, 70, 80, 80, 75, 75], TWO_ISLANDS, [4, 5, 6, 7]),
        # Island 2 fragmented (GPU 6 too full): island 1, although it has less free memory.
        ([60, 60, 60, 60, 80, 80, 30, 80], TWO_ISLANDS, [0, 1, 2, 3]),
        # Both fragmented: across the islands, the freest four that fit.
        ([80, 30, 70, 70, 80, 80, 30, 75], TWO_ISLANDS, [0, 4, 5, 7]),
        # Topology unknown: the four freest, as without topology.
        ([80, 80, 70, 70, 80, 80, 75, 75], None, [0, 1, 4, 5]),
    ],
)
def test_a_tp4_replica_takes_an_nvlink_island_when_one_fits(
    free: list[float], islands: list[list[int]] | None, want: list[int]
) -> None:
    gpus = [gpu(i, "H100", free=f) for i, f in enumerate(free)]
    rec = node("n1", linked(gpus, islands) if islands else gpus)
    assert where(place(models(tp(4)), views(rec), {}, NOW)) == {"n1": want}


def test_a_cross_island_placement_says_why_in_the_log_and_the_status() -> None:
    free = [80, 30, 70, 70, 80, 80, 30, 75]
    rec = node("n1", linked([gpu(i, "H100", free=f) for i, f in enumerate(free)], TWO_ISLANDS))
    plan = place(models(tp(4)), views(rec), {}, NOW)
    assert plan.moved == [
        "placed qwen on n1 GPUs 0,4,5,7 linked through the CPU sockets' interconnect: no 4 GPUs on NVLink have room"
    ]
    note = "n1 GPUs 0,4,5,7 are linked through the CPU sockets' interconnect (best there: NVLink)"
    assert plan.status["qwen"].reasons == [note] and plan.status["qwen"].unplaced == 0
    # Kept on the next pass: the status still says so (and nothing moves).
    again = place(models(tp(4)), views(rec), plan.assignments, NOW)
    assert again.moved == [] and again.status["qwen"].reasons == [note]
    # Within an island, or with the links unknown, there is nothing to say.
    ok = place(models(tp(2)), views(rec), {}, NOW)
    assert ok.moved == ["placed qwen on n1 GPUs 4,5"] and ok.status["qwen"].reasons == []


def test_the_link_level_decides_before_free_memory_between_classes() -> None:
    # A100 pair on NVLink, H100 pair (more free) across sockets; the model allows both.
    gpus = [gpu(0, "A100", free=50), gpu(1, "A100", free=50), gpu(2, "H100", free=80), gpu(3, "H100", free=80)]
    rec = node("mixed", linked(gpus, [[0, 1], [2], [3]]))
    assert where(place(models(tp(2)), views(rec), {}, NOW)) == {"mixed": [0, 1]}
    # Allowed only the H100s: across sockets it is, as nothing better exists for them.
    plan = place(models(tp(2, classes=["H100"])), views(rec), {}, NOW)
    assert where(plan) == {"mixed": [2, 3]} and plan.status["qwen"].reasons == []


def test_between_nodes_the_link_level_ranks_before_free_memory_after_spreading() -> None:
    roomy = node("roomy", linked([gpu(i, free=80) for i in range(2)], [[0], [1]]))  # across sockets
    nvl = node("nvl", linked([gpu(i, free=60) for i in range(2)], [[0, 1]]))
    unknown = node("unknown", [gpu(i, free=79) for i in range(2)])  # an older agent: no links
    assert where(place(models(tp(2)), views(roomy, nvl, unknown), {}, NOW)) == {"nvl": [0, 1]}
    assert where(place(models(tp(2)), views(roomy, unknown), {}, NOW)) == {"roomy": [0, 1]}  # known before unknown
    # Spreading still comes first: a node that already runs a replica of another model ranks after.
    other = msgspec_replace(model("other", vram=10), classes=[])
    plan = place(models(tp(2, vram=40), other), views(nvl, roomy), {"nvl": [assigned("other", 0, 0.13)]}, NOW)
    assert where(plan) == {"roomy": [0, 1]}


def test_single_gpu_replicas_ignore_links() -> None:
    rec = node("n1", linked([gpu(0, free=50), gpu(1, free=70), gpu(2, free=60)], [[0, 2], [1]]))
    assert where(place(models(model()), views(rec), {}, NOW)) == {"n1": [1]}
    assert place(models(model()), views(rec), {}, NOW).status["qwen"].reasons == []


def test_partial_or_malformed_links_count_as_unknown_pairs() -> None:
    # GPU 3 reports no links, GPU 2's row is short: their pairs are unknown, ranked last.
    gpus = [gpu(i, free=80 - i) for i in range(4)]
    gpus[0] = msgspec_replace_gpu(gpus[0], links=[0, SW, SW, SW])
    gpus[1] = msgspec_replace_gpu(gpus[1], links=[SW, 0, NV])
    gpus[2] = msgspec_replace_gpu(gpus[2], links=[SW, NV])
    rec = node("n1", gpus)
    assert where(place(models(tp(2)), views(rec), {}, NOW)) == {"n1": [1, 2]}
    assert where(place(models(tp(3)), views(rec), {}, NOW)) == {"n1": [0, 1, 2]}  # SW beats UNK via GPU 3


def test_sixteen_gpus_choose_eight_is_bounded_and_finds_the_island() -> None:
    # 16 choose 8 = 12,870 sets: the greedy search (one growth per seed GPU), not every set.
    # The eight freest straddle the islands (0, 2, 4, 6 have 80 GiB free, the rest 79), and GPU 14
    # has only 70: the odd island leaves the most.
    free = [80 if i in (0, 2, 4, 6) else 70 if i == 14 else 79 for i in range(16)]
    islands = [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]
    rec = node("big", linked([gpu(i, "B200", free=f) for i, f in enumerate(free)], islands))
    plan = place(models(tp(8)), views(rec), {}, NOW)
    assert where(plan) == {"big": islands[1]} and plan.status["qwen"].reasons == []
    # An island short of room: the other one, whatever memory says.
    free[3] = 30
    rec = node("big", linked([gpu(i, "B200", free=f) for i, f in enumerate(free)], islands))
    assert where(place(models(tp(8)), views(rec), {}, NOW)) == {"big": islands[0]}


def test_a_link_level_from_a_newer_agent_is_compared_and_named_by_number() -> None:
    gpus = [gpu(i, free=f) for i, f in enumerate([80, 30, 80, 80])]
    rows = [[0, NV, 7, 7], [NV, 0, 7, 7], [7, 7, 0, 8], [7, 7, 8, 0]]
    rec = node("n1", [msgspec_replace_gpu(g, links=row) for g, row in zip(gpus, rows, strict=True)])
    plan = place(models(tp(2)), views(rec), {}, NOW)
    assert where(plan) == {"n1": [0, 2]}  # level 7 before 8; GPU 1 is too full for the NVLink pair
    assert plan.status["qwen"].reasons == ["n1 GPUs 0,2 are linked through link level 7 (best there: NVLink)"]
