"""Wire records: the JSON values stored in etcd (and served by the agent's /v1/status).

Every record carries ``schema``. Decoders tolerate fields they do not know (msgspec ignores
unknown fields by default), so an older coordinator reads a newer agent's record; ``schema``
changes only when the meaning of an existing field changes. Where each record lives is in
``paths.py``; decoding with logging and skipping of bad records is in ``codec.py``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

NODE_SCHEMA_VERSION = 1

InstanceStateName = Literal["STARTING", "WARMING", "READY", "UNHEALTHY", "RESTARTING", "FAILED", "STOPPED"]


class GpuRecord(msgspec.Struct, kw_only=True):
    """One GPU as the probe saw it. ``None`` means the field could not be read (see ``errors``)."""

    index: int
    uuid: str
    name: str
    gpu_class: str
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_percent: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    # True when NVML says the device is gone ("GPU is lost"); the other fields are then stale or None.
    lost: bool = False
    # field name -> error text, for fields NVML could not read this round.
    errors: dict[str, str] = {}


class InstanceLoad(msgspec.Struct, kw_only=True):
    """Backend-reported load, read from its metrics endpoint; ``None`` when the backend has no such number."""

    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage_ratio: float | None = None


class InstanceRecord(msgspec.Struct, kw_only=True):
    name: str
    model: str  # the name clients ask for (served model name)
    backend: str
    state: InstanceStateName
    state_since: float  # unix time of the last state change
    port: int
    gpus: list[int]
    gpu_memory_fraction: float | None
    pid: int | None = None
    restarts: int = 0
    last_error: str | None = None
    # share of recent health probes that passed, 0..1 (the coordinator's health_ratio)
    health_ratio: float = 1.0
    load: InstanceLoad | None = None
    requests_total: int = 0
    errors_total: int = 0


class NodeRecord(msgspec.Struct, kw_only=True):
    schema: int = NODE_SCHEMA_VERSION
    node: str
    address: str  # base URL of the agent's API and proxy
    mode: Literal["standalone", "cluster"] = "standalone"
    agent_version: str
    started_at: float
    updated_at: float
    gpu_source: str
    gpu_classes: list[str]
    gpus: list[GpuRecord]
    instances: list[InstanceRecord]
    ready: bool = False  # serving, and every autostart instance READY


# --- written by the coordinator's leader ---------------------------------------------------------

LEADER_SCHEMA_VERSION = 1
ROUTES_SCHEMA_VERSION = 1
MODEL_SCHEMA_VERSION = 1
ASSIGNMENT_SCHEMA_VERSION = 1
DRAIN_SCHEMA_VERSION = 1
DEGRADATION_SCHEMA_VERSION = 1

# READY: routable. DEGRADED: the leader's view says no (bad samples, stale telemetry, too hot,
# ejected). DOWN: the node's lease is gone. DRAINED: an operator took the node out.
HealthState = Literal["READY", "DEGRADED", "DOWN", "DRAINED"]


class LeaderRecord(msgspec.Struct, kw_only=True):
    """``/leader``, under the leader's lease. The key's create revision is the epoch (the
    fencing token); it is not stored in the value, because the value cannot know it before the
    key is created."""

    schema: int = LEADER_SCHEMA_VERSION
    coordinator: str
    address: str = ""
    elected_at: float


class RouteEndpoint(msgspec.Struct, kw_only=True, gc=False):  # scalars only: no cycles, skip the GC
    node: str
    address: str  # the node's agent/proxy base URL
    instance: str
    gpu_class: str
    weight: int
    state: HealthState


class RouteRecord(msgspec.Struct, kw_only=True):
    """``/routes/<model>``: where a model is served, with weights; written only on change."""

    schema: int = ROUTES_SCHEMA_VERSION
    model: str
    epoch: int  # the leader epoch that wrote it: a reader can ignore a stale leader's table
    updated_at: float
    endpoints: list[RouteEndpoint] = []
    # Proxies fail over across GPU classes only when the operator's policy allows it.
    cross_class: bool = False
    # Panic mode for these classes: more than half unhealthy, so ejection is suspended.
    panic_classes: list[str] = []


class ModelRecord(msgspec.Struct, kw_only=True):
    """``/models/<name>``: a model registered by an operator, on shared storage."""

    schema: int = MODEL_SCHEMA_VERSION
    name: str
    path: str
    backend: str = "vllm"
    replicas: int = 1
    min_vram_gib: float | None = None
    classes: list[str] = []  # allowed GPU classes; [] = any
    size_bytes: int | None = None
    sha256: str | None = None
    fallback: str | None = None  # model answering in degradation level 2
    args: list[str] = []
    gpu_memory_fraction: float | None = None


class AssignedInstance(msgspec.Struct, kw_only=True):
    model: str
    path: str
    backend: str
    gpus: list[int]
    gpu_memory_fraction: float | None = None
    args: list[str] = []


class AssignmentRecord(msgspec.Struct, kw_only=True):
    """``/assignments/<node>``: the instances the leader wants on that node."""

    schema: int = ASSIGNMENT_SCHEMA_VERSION
    node: str
    epoch: int
    updated_at: float
    instances: list[AssignedInstance] = []


class DrainRecord(msgspec.Struct, kw_only=True):
    """``/drain/<node>``: present = an operator took the node out of rotation."""

    schema: int = DRAIN_SCHEMA_VERSION
    node: str
    reason: str = ""
    by: str = ""
    at: float


class DegradationRecord(msgspec.Struct, kw_only=True):
    """``/state/degradation``: the cluster-wide degradation level the proxies apply."""

    schema: int = DEGRADATION_SCHEMA_VERSION
    level: int  # 0 normal, 1 response cache, 2 fallback model, 3 static answer
    error_rate: float
    samples: int
    window_s: float
    epoch: int
    updated_at: float
