"""When is a node record worth writing to etcd? A pure function, so it is tested with tables.

Every write is replicated to every etcd member and wakes every watcher, and 1,000 agents
probing every 5 s would make 200 writes/s of noise. We write on *meaningful* change only, and
at least every ``interval_s`` so ``updated_at`` shows the agent is alive when nothing changes.

Two kinds of change. *State* changes (an instance's state, readiness, a GPU lost or crossing
85 °C, instances added or removed, a model path becoming (un)available) decide failover and placement: they go
out at once (``min_gap_s`` only merges a burst). *Telemetry* changes (a GPU 2 °C warmer or
cooler, utilization 10 points off, the proxy's counters that feed the degradation level, an
instance's backend queue forming or draining, which autoscaling reads) only shift weights,
rates and replica counts: at most one such write per ``telemetry_gap_s`` per node, so 1,000
busy nodes stay under 1000 / 15 ≈ 67 writes/s however noisy their sensors are.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.facts import HOT_GPU_C
from gpufleet.keyspace.records import GpuRecord, InstanceRecord, NodeRecord


@dataclass(frozen=True)
class PublishPolicy:
    interval_s: float = 30.0
    min_gap_s: float = 1.0
    telemetry_gap_s: float = 15.0
    temperature_delta_c: float = 2.0
    temperature_urgent_c: float = HOT_GPU_C  # crossing it is a state change (the weight cap)
    utilization_delta_percent: float = 10.0


@dataclass(frozen=True)
class Change:
    reason: str
    urgent: bool  # state (failover-relevant) rather than telemetry


def _gpu_telemetry(a: GpuRecord, b: GpuRecord, p: PublishPolicy) -> str | None:
    if (a.temperature_celsius is None) != (b.temperature_celsius is None) or (
        a.temperature_celsius is not None
        and b.temperature_celsius is not None
        and abs(a.temperature_celsius - b.temperature_celsius) >= p.temperature_delta_c
    ):
        return f"gpu {b.index} temperature {a.temperature_celsius} -> {b.temperature_celsius}"
    if (a.utilization_percent is None) != (b.utilization_percent is None) or (
        a.utilization_percent is not None
        and b.utilization_percent is not None
        and abs(a.utilization_percent - b.utilization_percent) >= p.utilization_delta_percent
    ):
        return f"gpu {b.index} utilization {a.utilization_percent} -> {b.utilization_percent}"
    return None


def _instance_change(a: InstanceRecord, b: InstanceRecord) -> str | None:
    if a.state != b.state:
        return f"instance {b.name} {a.state} -> {b.state}"
    if (a.port, a.model, a.gpus) != (b.port, b.model, b.gpus):
        return f"instance {b.name} reconfigured"
    if (a.health_ratio == 0.0) != (b.health_ratio == 0.0):
        # Ejected by passive health (it stays READY, see agent/supervisor/rotation.py), or back:
        # other nodes should hear at once, not at the next refresh 30 s later.
        return f"instance {b.name} {'out of' if b.health_ratio == 0.0 else 'back in'} rotation"
    return None


def _queue_class(i: InstanceRecord) -> tuple[bool, int] | None:
    """An instance's load, coarsely: serving or idle, and its backend queue in powers of two
    (0, 1, 2-3, 4-7, ...): a queue that forms or drains is worth a telemetry write, one request
    more or less in a long queue is not."""
    load = i.load
    if load is None:
        return None
    waiting = int(load.requests_waiting or 0)
    return bool(load.requests_running or waiting), waiting.bit_length()


def _queue_change(prev: NodeRecord, cur: NodeRecord) -> str | None:
    before = {i.name: _queue_class(i) for i in prev.instances}
    for i in cur.instances:
        if i.name in before and before[i.name] != _queue_class(i):
            return f"instance {i.name} load"
    return None


def _hot(g: GpuRecord, p: PublishPolicy) -> bool:
    return g.temperature_celsius is not None and g.temperature_celsius > p.temperature_urgent_c


def _state_change(prev: NodeRecord, cur: NodeRecord, p: PublishPolicy) -> str | None:
    if prev.ready != cur.ready:
        return f"ready {prev.ready} -> {cur.ready}"
    if prev.address != cur.address:
        return "address changed"
    if [g.index for g in prev.gpus] != [g.index for g in cur.gpus]:
        return "gpu set changed"
    for a, b in zip(prev.gpus, cur.gpus, strict=True):
        if a.lost != b.lost:
            return f"gpu {b.index} {'lost' if b.lost else 'back'}"
        if _hot(a, p) != _hot(b, p):
            return f"gpu {b.index} {'over' if _hot(b, p) else 'back under'} {p.temperature_urgent_c:g} °C"
    if [(m.model, m.path, m.available, m.error) for m in prev.models] != [
        (m.model, m.path, m.available, m.error) for m in cur.models
    ]:
        return "model path availability changed"  # placement depends on it
    if any(prev.model_demand.get(m) != t for m, t in cur.model_demand.items()):
        # A request for an on-demand model (agent/cluster/demand.py limits these to one per
        # model per idle_unload_after_s / 4): a cold start waits on the leader hearing it.
        # Entries merely dropped are not worth a write.
        return "on-demand model requested"
    before = {i.name: i for i in prev.instances}
    after = {i.name: i for i in cur.instances}
    if before.keys() != after.keys():
        return "instance set changed"
    for name, b in after.items():
        if (why := _instance_change(before[name], b)) is not None:
            return why
    return None


def change_reason(prev: NodeRecord | None, cur: NodeRecord, p: PublishPolicy) -> Change | None:
    """How ``cur`` differs meaningfully from the last published ``prev`` (None: it does not)."""
    if prev is None:
        return Change("first record", urgent=True)
    if (why := _state_change(prev, cur, p)) is not None:
        return Change(why, urgent=True)
    for a, b in zip(prev.gpus, cur.gpus, strict=True):
        if (why := _gpu_telemetry(a, b, p)) is not None:
            return Change(why, urgent=False)
    if (why := _queue_change(prev, cur)) is not None:  # autoscaling reads it (coordinator/policy/autoscale.py)
        return Change(why, urgent=False)
    if cur.proxy is not None and (prev.proxy is None or prev.proxy.attempts != cur.proxy.attempts):
        return Change("proxy counters", urgent=False)
    if prev.key_demand != cur.key_demand:  # the leader divides key limits by it
        return Change("API key demand", urgent=False)
    return None


def publish_reason(prev: NodeRecord | None, cur: NodeRecord, since_last_s: float, p: PublishPolicy) -> str | None:
    """Publish now? A reason string, or None to wait (a later check picks the change up)."""
    if prev is not None and since_last_s >= p.interval_s:
        return "periodic refresh"
    change = change_reason(prev, cur, p)
    if change is None:
        return None
    if prev is not None and since_last_s < _gap(change, p):
        return None
    return change.reason


def _gap(change: Change, p: PublishPolicy) -> float:
    """How long after the last write a change of this kind may go out."""
    return p.min_gap_s if change.urgent else p.telemetry_gap_s


def held_for(prev: NodeRecord | None, cur: NodeRecord, since_last_s: float, p: PublishPolicy) -> float | None:
    """A change that ``publish_reason`` holds back for its gap: the seconds until it may go out
    (None: nothing is held back). The publisher wakes then, not at its next keep-alive or probe:
    a replica's READY 50 ms after its WARMING was written reached etcd 2-5 s late, and a request
    held on another node for that replica waited as long (bench/ondemand.py)."""
    change = change_reason(prev, cur, p) if prev is not None else None
    if change is None:
        return None
    gap = _gap(change, p)
    return gap - since_last_s if since_last_s < gap else None
