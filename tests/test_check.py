"""gpuctl check's rules, judged from gathered facts (no cluster needed)."""

from __future__ import annotations

from gpuctl.check import Facts, judge
from gpufleet.etcd import Status
from gpufleet.keyspace.records import (
    DegradationRecord,
    GpuRecord,
    InstanceRecord,
    LeaderRecord,
    ModelAvailability,
    NodeRecord,
    RouteEndpoint,
    RouteRecord,
)

GIB = 2**30


def node(name: str, used_gib: float = 40, temp: float = 60, ready: bool = True, state: str = "READY") -> NodeRecord:
    gpu = GpuRecord(
        index=0,
        uuid="u",
        name="A100",
        gpu_class="A100",
        memory_total_bytes=80 * GIB,
        memory_used_bytes=int(used_gib * GIB),
        temperature_celsius=temp,
    )
    inst = InstanceRecord(
        name="m",
        model="m",
        backend="vllm",
        state=state,
        state_since=0,
        port=1,
        gpus=[0],  # type: ignore[arg-type]
        gpu_memory_fraction=0.5,
    )
    return NodeRecord(
        node=name,
        address=f"http://{name}",
        agent_version="0",
        started_at=0,
        updated_at=0,
        gpu_source="nvml",
        gpu_classes=["A100"],
        gpus=[gpu],
        instances=[inst],
        ready=ready,
    )


def healthy() -> Facts:
    st = Status(
        endpoint="https://e1", version="3.4", member_id=1, leader=1, raft_term=2, raft_index=3, revision=4, db_size=5
    )
    eps = [
        RouteEndpoint(node=n, address=f"http://{n}", instance="m", gpu_class="A100", weight=190, state="READY")
        for n in ("a", "b")
    ]
    return Facts(
        endpoints=["https://e1"],
        statuses={"https://e1": st},
        leader=LeaderRecord(coordinator="c1", address="http://c1", elected_at=0),
        leader_epoch=7,
        coordinator_ready=True,
        coordinator_metrics=True,
        nodes=[node("a"), node("b")],
        routes=[RouteRecord(model="m", epoch=7, updated_at=0, endpoints=eps)],
        agent_metrics={"a": True, "b": True},
        admin_protected={"a": True, "b": True},
        keys_required={"a": True, "b": True},
        watchdogs={"gpu-agent.service": "30s", "gpu-coordinator.service": None},
    )


def statuses(f: Facts) -> dict[str, str]:
    return {r.name: r.status for r in judge(f)}


def test_healthy_cluster_passes() -> None:
    res = statuses(healthy())
    assert res.pop("gpu-coordinator.service watchdog active") == "SKIP"  # not installed here
    assert res.pop("registered model paths readable on every node") == "SKIP"  # no models registered
    assert set(res.values()) == {"PASS"}, res


def test_each_failure_is_reported() -> None:
    f = healthy()
    f.endpoints = ["http://e1"]
    f.statuses["http://e1"] = "no answer within 3s"
    f.leader = None
    f.nodes = [node("a", used_gib=72, temp=88, ready=False, state="FAILED")]
    f.routes[0].endpoints[1].state = "DOWN"
    f.agent_metrics["a"] = False
    f.admin_protected["a"] = False
    f.keys_required["a"] = False
    f.watchdogs["gpu-agent.service"] = "0"
    f.nodes[0].models = [ModelAvailability(model="qwen", path="/mnt/q", available=False, error="/mnt/q: gone")]
    f.degradation = DegradationRecord(level=2, error_rate=0.2, samples=500, window_s=60, epoch=7, updated_at=0)
    res = statuses(f)
    for name in (
        "etcd endpoints healthy, with a raft leader, no alarms",
        "etcd spoken to over TLS",
        "a coordinator leads",
        "every instance READY",
        "GPU memory at or below 85%",
        "no GPU lost or over 85 °C",
        "every model has 2+ READY endpoints (failover possible)",
        "agents' /metrics answer",
        "agents' admin API protected by a token",
        "agents' OpenAI routes need an API key",
        "gpu-agent.service watchdog active",
        "registered model paths readable on every node",
        "cluster not degraded",
    ):
        assert res[name] == "FAIL", name
    detail = {r.name: r.detail for r in judge(f)}
    assert detail["GPU memory at or below 85%"] == "a gpu 0 90%"
    assert detail["every instance READY"] == "a: m FAILED"
    assert detail["registered model paths readable on every node"] == "qwen on a: /mnt/q: gone"
    assert detail["cluster not degraded"] == "level 2: error rate 20.0% (500 attempts)"


def test_unknown_gpu_class_is_reported() -> None:
    f = healthy()
    f.nodes[1].gpus[0].name = "NVIDIA Future X1"
    f.nodes[1].gpus[0].gpu_class = "UNKNOWN"
    res = {r.name: r for r in judge(f)}
    got = res["every GPU of a known class (weighted by its own measure, not as a default)"]
    assert got.status == "FAIL" and "b gpu 0 'NVIDIA Future X1'" in got.detail


def test_rules_not_covered_above() -> None:
    f = healthy()
    f.coordinator_ready = False
    f.invalid_node_records = ["/gpufleet/c/nodes/x"]
    f.nodes[0].gpus[0].lost = True
    f.local_token_file = (["mode 0644: readable by others"], [])
    detail = {r.name: (r.status, r.detail) for r in judge(f)}
    assert detail["the leader's /readyz and /metrics answer"] == ("FAIL", "http://c1: readyz failed, metrics ok")
    assert detail["node records valid"] == ("FAIL", "/gpufleet/c/nodes/x")
    assert detail["no GPU lost or over 85 °C"] == ("FAIL", "a gpu 0")
    assert detail["admin token file readable by the agent only"] == ("FAIL", "mode 0644: readable by others")


def test_checks_that_apply_only_sometimes() -> None:
    """No leader: its endpoints are not checked; no agent configured here: no token-file check;
    no nodes at all fails rather than passes vacuously."""
    f = healthy()
    f.leader = None
    f.nodes = []
    names = [r.name for r in judge(f)]
    assert "the leader's /readyz and /metrics answer" not in names
    assert "admin token file readable by the agent only" not in names
    res = statuses(f)
    assert res["agents registered"] == "FAIL"
    assert res["every instance READY"] == "FAIL"


def test_open_openai_routes_fail_the_check() -> None:
    from gpuctl.check import Facts, judge

    def verdict(keys_required: dict[str, bool | None]) -> str:
        f = Facts(endpoints=[], statuses={}, keys_required=keys_required)
        [r] = [r for r in judge(f) if r.name == "agents' OpenAI routes need an API key"]
        return f"{r.status}: {r.detail}"

    assert verdict({}) == "SKIP: 401 without a key"
    assert verdict({"a": True, "b": True}) == "PASS: 401 without a key"
    assert verdict({"a": True, "b": False}) == 'FAIL: open ([auth] mode = "open"): b'
