"""Recent events for the dashboard, derived on every replica by diffing successive views.

Nothing in etcd records history (a route holds only its current weights), and the leader's own
log is on one host; so each replica keeps what it saw change since it started: node states,
drains, the degradation level, the leader and its epoch, and failover (an endpoint's weight
going to 0 while others of its model keep theirs). The list starts when the replica starts and
holds the last :data:`MAX_EVENTS`; two replicas may stamp the same change a moment apart.

Pure except :class:`EventLog`, which only holds what it is given.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .view import FleetInputs, node_states

MAX_EVENTS = 200

Weights = dict[tuple[str, str], tuple[int, str, str]]  # (node, instance) -> (weight, state, gpu class)


@dataclass(frozen=True)
class Snapshot:
    """What events are diffed from: small, so it is taken on every change."""

    leader: str | None
    epoch: int | None
    nodes: dict[str, str]  # node -> state on the page
    drains: frozenset[str]
    degradation: int | None  # level; None: no record
    weights: dict[str, Weights] = field(default_factory=dict)  # by model
    cross_class: frozenset[str] = frozenset()  # models whose route allows failover across classes


@dataclass(frozen=True)
class Event:
    kind: str  # node, failover, drain, degradation, leader, replica
    severity: str  # info, warn, error
    text: str


def snapshot(inp: FleetInputs) -> Snapshot:
    return Snapshot(
        leader=inp.leader,
        epoch=inp.epoch,
        nodes=node_states(inp),
        drains=frozenset(inp.drains),
        degradation=inp.degradation.level if inp.degradation else None,
        weights={
            m: {(e.node, e.instance): (e.weight, e.state, e.gpu_class) for e in r.endpoints}
            for m, r in inp.routes.items()
        },
        cross_class=frozenset(m for m, r in inp.routes.items() if r.cross_class),
    )


def diff(prev: Snapshot, cur: Snapshot) -> list[Event]:
    """What changed from ``prev`` to ``cur``, in a stable order."""
    return [
        *_leader_events(prev, cur),
        *_node_events(prev, cur),
        *_drain_events(prev, cur),
        *_degradation_events(prev, cur),
        *(
            ev
            for m in sorted(cur.weights)
            for ev in _failover_events(m, prev.weights.get(m), cur.weights[m], m in cur.cross_class)
        ),
    ]


_NODE_SEVERITY = {"DOWN": "error", "DEGRADED": "warn", "DRAINED": "warn"}


def _node_events(prev: Snapshot, cur: Snapshot) -> list[Event]:
    out = []
    for node, state in cur.nodes.items():
        before = prev.nodes.get(node)
        if before == state:
            continue
        text = f"node {node} {state}" + (f" (was {before})" if before else " (new)")
        out.append(Event("node", _NODE_SEVERITY.get(state, "info"), text))
    for node in sorted(prev.nodes.keys() - cur.nodes.keys()):
        out.append(Event("node", "info", f"node {node} forgotten (gone from records and routes)"))
    return out


def _drain_events(prev: Snapshot, cur: Snapshot) -> list[Event]:
    added = [Event("drain", "warn", f"node {n} drained") for n in sorted(cur.drains - prev.drains)]
    return added + [Event("drain", "info", f"node {n} undrained") for n in sorted(prev.drains - cur.drains)]


def _degradation_events(prev: Snapshot, cur: Snapshot) -> list[Event]:
    before, level = prev.degradation or 0, cur.degradation or 0  # no record: level 0
    if before == level:
        return []
    severity = "error" if level >= 2 else "warn" if level == 1 else "info"
    return [Event("degradation", severity, f"degradation level {before} -> {level}")]


def _leader_events(prev: Snapshot, cur: Snapshot) -> list[Event]:
    if (prev.leader, prev.epoch) == (cur.leader, cur.epoch):
        return []
    if cur.leader is None:
        return [Event("leader", "error", f"no leader (was {prev.leader}, epoch {prev.epoch})")]
    return [Event("leader", "warn" if prev.leader else "info", f"leader {cur.leader}, epoch {cur.epoch}")]


def _failover_events(model: str, prev: Weights | None, cur: Weights, cross_class: bool) -> list[Event]:
    """An endpoint that lost its traffic (weight to 0, or gone) is a failover: its share goes to
    the model's other endpoints of its GPU class, or of any class if the route says
    ``cross_class`` (agent/proxy/remote.py). One that gets traffic (again) is in rotation."""
    if prev is None:
        return []
    lost = sorted(k for k, (w, _, _) in prev.items() if w > 0 and (k not in cur or cur[k][0] == 0))
    back = sorted(k for k, (w, _, _) in cur.items() if w > 0 and (k not in prev or prev[k][0] == 0))
    out = [_failover(model, k, prev[k][2], cur, cross_class) for k in lost]
    if back:
        out.append(Event("failover", "info", f"{model}: {', '.join(f'{n}/{i}' for n, i in back)} in rotation"))
    return out


def _failover(model: str, key: tuple[str, str], gpu_class: str, cur: Weights, cross_class: bool) -> Event:
    node, inst = key
    why = cur[key][1] if key in cur else "removed"
    serving = [(n, c) for (n, _), (w, _, c) in sorted(cur.items()) if w > 0]
    peers = list(dict.fromkeys(n for n, c in serving if c == gpu_class))
    if not peers and cross_class:
        peers = list(dict.fromkeys(n for n, _ in serving))
    what = f"{model}: traffic off {node}/{inst} ({why})"
    if peers:
        return Event("failover", "warn", f"{what} to {', '.join(peers)}")
    if serving:
        return Event("failover", "error", f"{what}; no {gpu_class} endpoint left, and the route does not cross classes")
    return Event("failover", "error", f"{what}; no endpoint left")


class EventLog:
    """The last :data:`MAX_EVENTS` events with their times, newest last."""

    def __init__(self, size: int = MAX_EVENTS) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, events: list[Event], at: float) -> None:
        for ev in events:
            self._events.append({"at": at, "kind": ev.kind, "severity": ev.severity, "text": ev.text})

    def recent(self) -> list[dict[str, Any]]:
        """Newest first, as the page lists them."""
        return list(reversed(self._events))
