"""The dashboard's JSON view model: a pure function of the records a replica mirrors.

No I/O and no clock here (the caller passes ``now``), so every rule is unit-tested without etcd
or a browser. Records that failed to decode never reach this module (the watcher skips them,
as every reader of the keyspace does).

A node's state on the page is what etcd says, leader or not:

- DRAINED while ``/drain/<node>`` exists (an operator's word beats everything);
- DOWN while its record is gone (its lease expired: the agent stopped renewing) — shown with
  the last record this replica saw, until the leader forgets the node — or while the leader's
  routes mark every endpoint of it DOWN;
- DEGRADED while the leader's routes mark every endpoint of it DEGRADED (a node-level verdict:
  stale telemetry, too hot, a lost GPU); one bad instance shows on that instance only;
- STARTING while the agent says it is not ready yet and nothing of it is routed READY;
- READY otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpufleet.keyspace.records import (
    DegradationRecord,
    DrainRecord,
    GpuRecord,
    InstanceRecord,
    NodeRecord,
    PlacementRecord,
    RouteEndpoint,
    RouteRecord,
)

WARN_TEMP_C = 85.0  # highlighted on the page (the alert rules' threshold); the policy's limit is the error
NO_CLASS = "no GPU"
GIB = 1024**3


@dataclass
class FleetInputs:
    """Everything one view is built from, as this replica mirrors it."""

    cluster: str
    replica: str
    is_leader: bool
    leader: str | None  # the leader's id; None while no leader is known
    epoch: int | None
    nodes: Mapping[str, NodeRecord] = field(default_factory=dict)  # records in etcd now
    gone: Mapping[str, NodeRecord] = field(default_factory=dict)  # last record of nodes whose key went
    routes: Mapping[str, RouteRecord] = field(default_factory=dict)  # assembled, by model
    drains: Mapping[str, DrainRecord] = field(default_factory=dict)  # by node
    degradation: DegradationRecord | None = None
    placement: PlacementRecord | None = None
    temp_limit_c: float = 90.0  # the cluster policy's [health] temp_limit_c


def endpoints_by_node(routes: Mapping[str, RouteRecord]) -> dict[str, list[tuple[str, RouteEndpoint]]]:
    """node -> [(model, endpoint)] over every route."""
    out: dict[str, list[tuple[str, RouteEndpoint]]] = {}
    for model, r in routes.items():
        for e in r.endpoints:
            out.setdefault(e.node, []).append((model, e))
    return out


def node_state(rec: NodeRecord | None, routed: list[RouteEndpoint], drained: bool) -> str:
    """The node's state on the page (see the module doc)."""
    if drained:
        return "DRAINED"
    if rec is None:
        return "DOWN"
    states = {e.state for e in routed}
    if len(states) == 1 and states <= {"DOWN", "DEGRADED"}:
        return next(iter(states))
    if not rec.ready and "READY" not in states:
        return "STARTING"
    return "READY"


def node_states(inp: FleetInputs) -> dict[str, str]:
    """Every node the replica knows of (a record, a last record, or an endpoint in a route) and
    its state: what the event log diffs."""
    routed = endpoints_by_node(inp.routes)
    names = set(inp.nodes) | set(inp.gone) | set(routed) | set(inp.drains)
    return {n: node_state(inp.nodes.get(n), [e for _, e in routed.get(n, [])], n in inp.drains) for n in sorted(names)}


def build_view(inp: FleetInputs, now: float) -> dict[str, Any]:
    """The whole page's data (``/ui/api/fleet`` adds the events and etcd's reachability)."""
    routed = endpoints_by_node(inp.routes)
    totals = {m: sum(e.weight for e in r.endpoints) for m, r in inp.routes.items()}
    names = set(inp.nodes) | set(inp.gone) | set(routed) | set(inp.drains)
    classes: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(names):
        rec = inp.nodes.get(name) or inp.gone.get(name)
        eps = routed.get(name, [])
        doc = _node_doc(name, inp, rec, eps, totals, now)
        classes.setdefault(_class_of(rec, eps), []).append(doc)
    states = [n["state"] for group in classes.values() for n in group]
    return {
        "cluster": inp.cluster,
        "replica": {"id": inp.replica, "is_leader": inp.is_leader},
        "leader": {"id": inp.leader, "epoch": inp.epoch},
        "generated_at": now,
        "summary": {s: states.count(s) for s in ("READY", "STARTING", "DEGRADED", "DOWN", "DRAINED")},
        "temperature": {"warn_c": WARN_TEMP_C, "limit_c": inp.temp_limit_c},
        "degradation": _degradation_doc(inp.degradation),
        "classes": [{"gpu_class": c, "nodes": classes[c]} for c in sorted(classes)],
        "routes": [_route_doc(inp.routes[m], totals[m]) for m in sorted(inp.routes)],
        "placement": _placement_doc(inp.placement),
    }


def _class_of(rec: NodeRecord | None, eps: list[tuple[str, RouteEndpoint]]) -> str:
    if rec is not None:
        return " + ".join(sorted(set(rec.gpu_classes))) or NO_CLASS
    return eps[0][1].gpu_class if eps else NO_CLASS


def _node_doc(
    name: str,
    inp: FleetInputs,
    rec: NodeRecord | None,
    eps: list[tuple[str, RouteEndpoint]],
    totals: Mapping[str, int],
    now: float,
) -> dict[str, Any]:
    drain = inp.drains.get(name)
    live = name in inp.nodes
    by_instance = {e.instance: (m, e) for m, e in eps}
    return {
        "node": name,
        "state": node_state(inp.nodes.get(name), [e for _, e in eps], drain is not None),
        # False: the record is the last one seen before the node's key went (or none was seen).
        "live": live,
        "address": rec.address if rec else None,
        "agent_version": rec.agent_version if rec else None,
        "updated_at": rec.updated_at if rec else None,
        "age_s": round(now - rec.updated_at, 1) if rec else None,
        "drain": {"reason": drain.reason, "by": drain.by, "at": drain.at} if drain else None,
        "gpus": [_gpu_doc(g, inp.temp_limit_c) for g in rec.gpus] if rec else [],
        "instances": _instances(rec, by_instance, totals),
    }


def _gpu_doc(g: GpuRecord, limit_c: float) -> dict[str, Any]:
    t = g.temperature_celsius
    return {
        "index": g.index,
        "name": g.name,
        "gpu_class": g.gpu_class,
        "temperature_c": t,
        "temperature_level": "bad"
        if t is not None and t > limit_c
        else "warn"
        if t is not None and t >= WARN_TEMP_C
        else "ok",
        "utilization_percent": g.utilization_percent,
        "memory_used_gib": _gib(g.memory_used_bytes),
        "memory_total_gib": _gib(g.memory_total_bytes),
        "lost": g.lost,
        "errors": sorted(g.errors),
    }


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 1)


def _instances(
    rec: NodeRecord | None, routed: Mapping[str, tuple[str, RouteEndpoint]], totals: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The agent's instances with their routes' weights; an endpoint of an instance the record
    no longer lists (a node that went) is shown from the route alone."""
    out = []
    listed: set[str] = set()
    for inst in rec.instances if rec else []:
        listed.add(inst.name)
        out.append(_instance_doc(inst, routed.get(inst.name), totals))
    for name in sorted(routed.keys() - listed):
        model, e = routed[name]
        out.append(
            {"name": name, "model": model, "state": None, "gpus": [], "restarts": 0, "last_error": None}
            | _route_part(model, e, totals)
        )
    return out


def _instance_doc(
    inst: InstanceRecord, routed: tuple[str, RouteEndpoint] | None, totals: Mapping[str, int]
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": inst.name,
        "model": inst.model,
        "state": inst.state,
        "gpus": inst.gpus,
        "restarts": inst.restarts,
        "last_error": inst.last_error,
    }
    if routed is None:
        return doc | {"route_state": None, "weight": None, "share_percent": None}
    return doc | _route_part(*routed, totals)


def _route_part(model: str, e: RouteEndpoint, totals: Mapping[str, int]) -> dict[str, Any]:
    return {"route_state": e.state, "weight": e.weight, "share_percent": _share(e.weight, totals.get(model, 0))}


def _share(weight: int, total: int) -> float:
    return round(100 * weight / total, 1) if total > 0 else 0.0


def _route_doc(r: RouteRecord, total: int) -> dict[str, Any]:
    return {
        "model": r.model,
        "epoch": r.epoch,
        "updated_at": r.updated_at,
        "cross_class": r.cross_class,
        "panic_classes": r.panic_classes,
        # A header whose slices are not all there yet (a leader died mid-rewrite): no endpoints.
        "incomplete": bool(r.slices) and not r.endpoints,
        "endpoints": [
            {
                "node": e.node,
                "instance": e.instance,
                "gpu_class": e.gpu_class,
                "state": e.state,
                "weight": e.weight,
                "share_percent": _share(e.weight, total),
            }
            for e in r.endpoints
        ],
    }


def _degradation_doc(d: DegradationRecord | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"level": d.level, "error_rate": d.error_rate, "samples": d.samples, "updated_at": d.updated_at}


def _placement_doc(p: PlacementRecord | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "epoch": p.epoch,
        "updated_at": p.updated_at,
        "models": [
            {"model": m.model, "desired": m.desired, "nodes": m.nodes, "unplaced": m.unplaced, "reasons": m.reasons}
            for m in sorted(p.models, key=lambda m: m.model)
        ],
    }
