"""The dashboard's view model and events (coordinator/ui/view.py, events.py): pure functions of
records, checked without etcd or a browser; and the watcher's reading of its mirrors (bad
records skipped, an incomplete route kept as last seen)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec

from coordinator.ui.events import MAX_EVENTS, Event, EventLog, diff, snapshot
from coordinator.ui.view import FleetInputs, build_view, node_state, node_states
from coordinator.ui.watch import FleetWatch
from gpufleet.etcd import KeyValue
from gpufleet.keyspace import Keyspace, encode
from gpufleet.keyspace.records import (
    DegradationRecord,
    DrainRecord,
    GpuRecord,
    InstanceRecord,
    ModelPlacement,
    NodeRecord,
    PlacementRecord,
    RouteEndpoint,
    RouteRecord,
    RouteSlice,
)

NOW = 1_700_000_000.0
GIB = 1024**3


def gpu(index: int, temp: float | None = 50.0, cls: str = "A100") -> GpuRecord:
    return GpuRecord(
        index=index,
        uuid=f"GPU-{index}",
        name=f"NVIDIA {cls}",
        gpu_class=cls,
        memory_total_bytes=80 * GIB,
        memory_used_bytes=40 * GIB,
        utilization_percent=30.0,
        temperature_celsius=temp,
    )


def inst(name: str = "m", state: str = "READY", model: str = "m") -> InstanceRecord:
    return InstanceRecord(
        name=name,
        model=model,
        backend="vllm",
        state=state,
        state_since=NOW,
        port=9000,
        gpus=[0],
        gpu_memory_fraction=0.5,
    )  # type: ignore[arg-type]


def node(name: str, cls: str = "A100", temps: tuple[float | None, ...] = (50.0,), ready: bool = True) -> NodeRecord:
    return NodeRecord(
        node=name,
        address=f"http://{name}:8080",
        agent_version="1",
        started_at=NOW - 100,
        updated_at=NOW - 2,
        gpu_source="simulated",
        gpu_classes=[cls],
        gpus=[gpu(i, t, cls) for i, t in enumerate(temps)],
        instances=[inst()],
        ready=ready,
    )


def ep(node: str, weight: int = 100, state: str = "READY", cls: str = "A100", instance: str = "m") -> RouteEndpoint:
    return RouteEndpoint(
        node=node, address=f"http://{node}:8080", instance=instance, gpu_class=cls, weight=weight, state=state
    )  # type: ignore[arg-type]


def route(*eps: RouteEndpoint, model: str = "m", cross_class: bool = False) -> RouteRecord:
    return RouteRecord(model=model, epoch=3, updated_at=NOW, endpoints=list(eps), cross_class=cross_class)


def inputs(**kw: Any) -> FleetInputs:
    return FleetInputs(cluster="c", replica="c2", is_leader=False, leader="c1", epoch=3, **kw)


# --- node states -----------------------------------------------------------------------------


def test_a_node_state_says_what_etcd_says() -> None:
    rec = node("a")
    assert node_state(rec, [ep("a")], drained=False) == "READY"
    assert node_state(rec, [ep("a")], drained=True) == "DRAINED"  # the operator's word first
    assert node_state(None, [ep("a")], drained=False) == "DOWN"  # the lease went: before the leader says so
    assert node_state(rec, [ep("a", 0, "DOWN")], drained=False) == "DOWN"  # back, but the leader has not judged yet
    assert node_state(rec, [ep("a", 0, "DEGRADED"), ep("a", 0, "DEGRADED", instance="x")], False) == "DEGRADED"
    # One bad instance is the instance's state, not the node's.
    assert node_state(rec, [ep("a", 0, "DEGRADED"), ep("a", instance="x")], False) == "READY"
    assert node_state(node("a", ready=False), [], False) == "STARTING"
    assert node_state(node("a", ready=False), [ep("a")], False) == "READY"


def test_every_node_known_anyhow_has_a_state() -> None:
    states = node_states(
        inputs(
            nodes={"a": node("a")},
            gone={"b": node("b")},
            routes={"m": route(ep("a"), ep("c", 0, "DOWN"))},
            drains={"d": DrainRecord(node="d", at=NOW)},
        )
    )
    assert states == {"a": "READY", "b": "DOWN", "c": "DOWN", "d": "DRAINED"}


# --- the view --------------------------------------------------------------------------------


def test_nodes_are_grouped_by_gpu_class_with_their_gpus_instances_and_weights() -> None:
    v = build_view(
        inputs(
            nodes={"a1": node("a1"), "a2": node("a2"), "h1": node("h1", "H100")},
            routes={"m": route(ep("a1", 100), ep("a2", 100), ep("h1", 200, cls="H100"))},
        ),
        NOW,
    )
    assert [c["gpu_class"] for c in v["classes"]] == ["A100", "H100"]
    assert [n["node"] for n in v["classes"][0]["nodes"]] == ["a1", "a2"]
    a1 = v["classes"][0]["nodes"][0]
    assert a1["state"] == "READY" and a1["live"] and a1["age_s"] == 2.0
    assert a1["gpus"][0] | {"memory_used_gib": 40.0} == a1["gpus"][0]
    assert a1["gpus"][0]["memory_total_gib"] == 80.0 and a1["gpus"][0]["utilization_percent"] == 30.0
    assert a1["instances"] == [
        {
            "name": "m",
            "model": "m",
            "state": "READY",
            "gpus": [0],
            "restarts": 0,
            "last_error": None,
            "route_state": "READY",
            "weight": 100,
            "share_percent": 25.0,
        }
    ]
    assert v["summary"] == {"READY": 3, "STARTING": 0, "DEGRADED": 0, "DOWN": 0, "DRAINED": 0}
    assert v["leader"] == {"id": "c1", "epoch": 3} and v["replica"] == {"id": "c2", "is_leader": False}
    assert [e["share_percent"] for e in v["routes"][0]["endpoints"]] == [25.0, 25.0, 50.0]


def test_temperatures_are_highlighted_from_85_and_bad_over_the_policy_limit() -> None:
    v = build_view(inputs(nodes={"a": node("a", temps=(84.9, 85.0, 90.0, 90.5, None))}, temp_limit_c=90.0), NOW)
    levels = [g["temperature_level"] for g in v["classes"][0]["nodes"][0]["gpus"]]
    assert levels == ["ok", "warn", "warn", "bad", "ok"]
    assert v["temperature"] == {"warn_c": 85.0, "limit_c": 90.0}


def test_a_node_whose_lease_went_is_down_with_its_last_record_and_a_routed_one_without_any() -> None:
    v = build_view(
        inputs(gone={"a": node("a")}, routes={"m": route(ep("a", 0, "DOWN"), ep("b", 0, "DOWN", "H100"))}), NOW
    )
    by_name = {n["node"]: n for c in v["classes"] for n in c["nodes"]}
    assert by_name["a"]["state"] == "DOWN" and not by_name["a"]["live"] and len(by_name["a"]["gpus"]) == 1
    b = by_name["b"]
    assert b["state"] == "DOWN" and b["gpus"] == [] and b["address"] is None
    assert b["instances"][0]["name"] == "m" and b["instances"][0]["route_state"] == "DOWN"
    assert [c["gpu_class"] for c in v["classes"]] == ["A100", "H100"]  # b's class from its endpoint
    assert v["routes"][0]["endpoints"][0]["share_percent"] == 0.0  # no weight anywhere: no division by 0


def test_drains_degradation_and_placement_reasons_are_shown() -> None:
    placement = PlacementRecord(
        epoch=3,
        updated_at=NOW,
        models=[
            ModelPlacement(model="z", desired=2, nodes=["a"], unplaced=1, reasons=["no node with 40 GiB free"]),
            ModelPlacement(model="b", desired=1, nodes=["a"]),
        ],
    )
    v = build_view(
        inputs(
            nodes={"a": node("a")},
            drains={"a": DrainRecord(node="a", reason="maintenance", by="ops", at=NOW)},
            degradation=DegradationRecord(level=2, error_rate=0.4, samples=50, window_s=60, epoch=3, updated_at=NOW),
            placement=placement,
        ),
        NOW,
    )
    a = v["classes"][0]["nodes"][0]
    assert a["state"] == "DRAINED" and a["drain"] == {"reason": "maintenance", "by": "ops", "at": NOW}
    assert v["degradation"] == {"level": 2, "error_rate": 0.4, "samples": 50, "updated_at": NOW}
    assert [m["model"] for m in v["placement"]["models"]] == ["b", "z"]
    assert v["placement"]["models"][1]["reasons"] == ["no node with 40 GiB free"]
    assert msgspec.json.decode(msgspec.json.encode(v)) == v  # plain JSON all through


def test_an_empty_cluster_is_a_view_too() -> None:
    v = build_view(inputs(), NOW)
    assert v["classes"] == [] and v["routes"] == [] and v["placement"] is None and v["degradation"] is None


# --- events ----------------------------------------------------------------------------------


def events(before: FleetInputs, after: FleetInputs) -> list[tuple[str, str, str]]:
    return [(e.kind, e.severity, e.text) for e in diff(snapshot(before), snapshot(after))]


def test_a_node_going_down_and_its_traffic_moving_to_its_class_peers() -> None:
    before = inputs(
        nodes={"a1": node("a1"), "a2": node("a2"), "h1": node("h1", "H100")},
        routes={"m": route(ep("a1"), ep("a2"), ep("h1", cls="H100"))},
    )
    after = inputs(
        nodes={"a2": node("a2"), "h1": node("h1", "H100")},
        gone={"a1": node("a1")},
        routes={"m": route(ep("a1", 0, "DOWN"), ep("a2"), ep("h1", cls="H100"))},
    )
    assert events(before, after) == [
        ("node", "error", "node a1 DOWN (was READY)"),
        ("failover", "warn", "m: traffic off a1/m (DOWN) to a2"),
    ]
    assert events(after, before) == [
        ("node", "info", "node a1 READY (was DOWN)"),
        ("failover", "info", "m: a1/m in rotation"),
    ]


def test_a_failover_with_no_peer_of_its_class_says_so() -> None:
    before = inputs(routes={"m": route(ep("a1"), ep("h1", cls="H100"))})
    after = inputs(routes={"m": route(ep("a1", 0, "DOWN"), ep("h1", cls="H100"))})
    assert events(before, after)[-1] == (
        "failover",
        "error",
        "m: traffic off a1/m (DOWN); no A100 endpoint left, and the route does not cross classes",
    )
    crossing = inputs(routes={"m": route(ep("a1", 0, "DOWN"), ep("h1", cls="H100"), cross_class=True)})
    assert events(before, crossing)[-1] == ("failover", "warn", "m: traffic off a1/m (DOWN) to h1")
    gone = inputs(routes={"m": route(ep("h1", 0, "DEGRADED", cls="H100"))})
    assert ("failover", "error", "m: traffic off a1/m (removed); no endpoint left") in events(before, gone)
    # A model that had no endpoint left gets one back; a new model is no failover.
    assert events(gone, before)[-1] == ("failover", "info", "m: a1/m, h1/m in rotation")
    assert [e for e in events(inputs(), before) if e[0] == "failover"] == []


def test_drains_degradation_and_leader_changes() -> None:
    def deg(level: int) -> DegradationRecord:
        return DegradationRecord(level=level, error_rate=0.3, samples=9, window_s=60, epoch=3, updated_at=NOW)

    before = inputs(nodes={"a": node("a")})
    after = FleetInputs(
        cluster="c",
        replica="c2",
        is_leader=True,
        leader="c2",
        epoch=4,
        nodes={"a": node("a")},
        drains={"a": DrainRecord(node="a", at=NOW)},
        degradation=deg(2),
    )
    assert events(before, after) == [
        ("leader", "warn", "leader c2, epoch 4"),
        ("node", "warn", "node a DRAINED (was READY)"),
        ("drain", "warn", "node a drained"),
        ("degradation", "error", "degradation level 0 -> 2"),
    ]
    back = inputs(nodes={"a": node("a")}, degradation=deg(0))
    assert ("drain", "info", "node a undrained") in events(after, back)
    assert ("degradation", "info", "degradation level 2 -> 0") in events(after, back)
    leaderless = FleetInputs(cluster="c", replica="c2", is_leader=False, leader=None, epoch=None)
    assert events(before, leaderless)[0] == ("leader", "error", "no leader (was c1, epoch 3)")


def test_nothing_changed_is_no_event_and_the_log_is_bounded() -> None:
    same = inputs(nodes={"a": node("a")}, routes={"m": route(ep("a"))})
    assert events(same, same) == []
    level_0 = DegradationRecord(level=0, error_rate=0, samples=0, window_s=60, epoch=3, updated_at=NOW)
    assert events(same, inputs(nodes={"a": node("a")}, routes={"m": route(ep("a"))}, degradation=level_0)) == []
    log = EventLog()
    for i in range(MAX_EVENTS + 5):
        log.add([Event("node", "info", f"e{i}")], NOW + i)
    recent = log.recent()
    assert len(recent) == MAX_EVENTS and recent[0]["text"] == f"e{MAX_EVENTS + 4}" and recent[0]["at"] == NOW + 204


# --- the watcher's inputs from its mirrors ---------------------------------------------------

KEYS = Keyspace("c")


class Mirror:
    """What FleetWatch reads of a KeyMirror."""

    def __init__(self, records: dict[str, bytes]) -> None:
        self.data = {k: KeyValue(k.encode(), v, 1, i + 1, 1) for i, (k, v) in enumerate(records.items())}
        self.ready = asyncio.Event()
        self.ready.set()
        self.revision = len(records)


def test_the_watcher_skips_bad_records_and_keeps_a_route_being_rewritten() -> None:
    good = encode(node("a"))
    header = encode(RouteRecord(model="m", epoch=3, updated_at=NOW, slices=[0]))
    piece = encode(RouteSlice(model="m", epoch=3, slice=0, endpoints=[ep("a")]))
    nodes = Mirror({KEYS.node("a"): good, KEYS.node("b"): b'{"node": "b"}', KEYS.node("c"): encode(node("x"))})
    headers = Mirror({KEYS.route("m"): header, KEYS.route("bad"): b"not json"})
    slices = Mirror({KEYS.route_slice("m", 0): piece})
    leader = SimpleNamespace(
        nodes=nodes,
        drains=Mirror({KEYS.drain("a"): b"{}"}),
        routes=SimpleNamespace(mirrors=lambda: (headers, slices)),
        policy_state=SimpleNamespace(revision=1, policy=SimpleNamespace(health=SimpleNamespace(temp_limit_c=90.0))),
    )
    rt = SimpleNamespace(
        keys=KEYS,
        etcd=None,
        cfg=SimpleNamespace(id="c2"),
        election=SimpleNamespace(is_leader=False, leader="c1", leader_epoch=3, epoch=None),
        leader=leader,
    )
    watch = FleetWatch(rt)  # type: ignore[arg-type]
    inp = watch.inputs()
    assert list(inp.nodes) == ["a"]  # b does not decode; c's record names another node
    assert inp.drains == {}  # a drain record without its time is skipped
    assert list(inp.routes) == ["m"] and [e.node for e in inp.routes["m"].endpoints] == ["a"]
    # A new epoch's header before its slice: the route stays as it was.
    headers.data[KEYS.route("m")] = KeyValue(
        KEYS.route("m").encode(), encode(RouteRecord(model="m", epoch=4, updated_at=NOW, slices=[0])), 1, 9, 1
    )
    assert [e.node for e in watch.inputs().routes["m"].endpoints] == ["a"]
    # The page: the view, and no events while its own mirrors (degradation, placement) have
    # not listed: a half-listed keyspace would make every node look new.
    page = watch.page(NOW)
    assert not page["synced"] and page["events"] == []
    watch.degradation.ready.set()
    watch.placement.ready.set()
    page = watch.page(NOW)
    assert page["synced"] and page["etcd"]["reachable"]
    assert [e["kind"] for e in page["events"]] == ["replica"]
    # The node's key goes: shown DOWN with its last record.
    del nodes.data[KEYS.node("a")]
    nodes.revision += 1
    watch.look(NOW + 1)
    assert watch.inputs().gone.keys() == {"a"}
    assert watch.page(NOW + 1)["events"][0]["text"] == "node a DOWN (was READY)"
