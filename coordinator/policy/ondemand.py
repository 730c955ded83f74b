"""On-demand models: how many replicas the leader asks placement for, and why.

A model registered with ``min_replicas`` below ``replicas`` runs ``replicas`` replicas while it
is *wanted* and ``min_replicas`` otherwise. Wanted means: a request for it arrived somewhere in
the cluster within ``idle_unload_after_s``. The agents report requests in their node records
(``NodeRecord.model_demand``: model -> the wall time of a recent request, refreshed at most every
idle_unload_after_s / 4); the leader never compares those times with its own clock (hosts'
clocks differ), it notes on its monotonic clock when it *saw an entry change* (``DemandSeen``)
and judges the age of that. An entry it finds when it starts leading counts as seen then: a new
leader keeps a model that was asked for lately, at worst one idle period too long.

Never evict a replica that is serving: while any instance of the model reports requests
running, the model stays at ``replicas`` whatever the demand entries say (a request longer than
the idle time, or one whose entry node's report is late). The caller passes the effective
count to ``place`` (``msgspec.structs.replace(model, replicas=n)``); placement itself does not
know about demand.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gpufleet.keyspace.records import ModelRecord, NodeRecord
from gpufleet.registry import min_replicas, on_demand


@dataclass(frozen=True)
class DemandSeen:
    """One node's demand entry for a model, and when (leader's monotonic time) it last changed."""

    node: str
    value: float  # the entry as the agent wrote it (its wall time; compared only for equality)
    seen_at: float


@dataclass(frozen=True)
class Scale:
    replicas: int  # what placement is asked for
    wanted: bool  # scaled up (a recent request, or serving), not idle
    reason: str  # for the log and the placement status


def busy_nodes(records: Iterable[NodeRecord]) -> dict[str, dict[str, float]]:
    """model -> node -> requests its instances there report running (only those with some)."""
    out: dict[str, dict[str, float]] = {}
    for rec in records:
        for i in rec.instances:
            if i.load is not None and i.load.requests_running:
                per_node = out.setdefault(i.model, {})
                per_node[rec.node] = per_node.get(rec.node, 0.0) + i.load.requests_running
    return out


def scale(m: ModelRecord, demand: Iterable[DemandSeen], busy: dict[str, float], now: float) -> Scale:
    """The replica count for ``m`` now (``now`` and ``seen_at`` on the leader's monotonic clock)."""
    if not on_demand(m):
        return Scale(m.replicas, True, "always on")
    latest = max(demand, key=lambda d: (d.seen_at, d.node), default=None)
    if latest is not None and (age := now - latest.seen_at) < m.idle_unload_after_s:
        return Scale(m.replicas, True, f"request through {latest.node} seen {age:.0f} s ago")
    if busy:
        nodes = ", ".join(sorted(busy))
        return Scale(m.replicas, True, f"serving {sum(busy.values()):g} requests on {nodes}")
    return Scale(min_replicas(m), False, f"no request for {m.idle_unload_after_s:g} s")


def changed(prev: Scale | None, cur: Scale) -> bool:
    """A scaling *decision* (logged, shown) is a change of count or of wanted/idle; the reason's
    wording (ages) changes on every pass and is not one."""
    return prev is None or (prev.replicas, prev.wanted) != (cur.replicas, cur.wanted)
