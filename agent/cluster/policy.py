"""When is a node record worth writing to etcd? A pure function, so it is tested with tables.

Every write is replicated to every etcd member and wakes every watcher, and 1,000 agents
probing every 5 s would make 200 writes/s of noise. We write on *meaningful* change only (any
state change, a GPU heating or cooling by 2 °C, utilization moving 10 points, an instance
appearing or going), rate-limited, and at least every ``publish_interval_s`` so the record's
``updated_at`` shows the agent is alive even when nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.keyspace.records import GpuRecord, InstanceRecord, NodeRecord


@dataclass(frozen=True)
class PublishPolicy:
    interval_s: float = 30.0
    min_gap_s: float = 1.0
    temperature_delta_c: float = 2.0
    utilization_delta_percent: float = 10.0


def _gpu_change(a: GpuRecord, b: GpuRecord, p: PublishPolicy) -> str | None:
    if a.lost != b.lost:
        return f"gpu {b.index} {'lost' if b.lost else 'back'}"
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
    return None


def change_reason(prev: NodeRecord | None, cur: NodeRecord, p: PublishPolicy) -> str | None:
    """Why ``cur`` differs meaningfully from the last published ``prev`` (None: it does not)."""
    if prev is None:
        return "first record"
    if prev.ready != cur.ready:
        return f"ready {prev.ready} -> {cur.ready}"
    if prev.address != cur.address:
        return "address changed"
    if [g.index for g in prev.gpus] != [g.index for g in cur.gpus]:
        return "gpu set changed"
    for a, b in zip(prev.gpus, cur.gpus, strict=True):
        if (why := _gpu_change(a, b, p)) is not None:
            return why
    before = {i.name: i for i in prev.instances}
    after = {i.name: i for i in cur.instances}
    if before.keys() != after.keys():
        return "instance set changed"
    for name, b in after.items():
        if (why := _instance_change(before[name], b)) is not None:
            return why
    return None


def publish_reason(
    prev: NodeRecord | None, cur: NodeRecord, since_last_s: float, p: PublishPolicy
) -> str | None:
    """Publish now? A reason string, or None to wait."""
    if prev is not None and since_last_s >= p.interval_s:
        return "periodic refresh"
    why = change_reason(prev, cur, p)
    if why is None:
        return None
    if prev is not None and since_last_s < p.min_gap_s:
        return None  # a change within the gap is picked up by the next check
    return why
