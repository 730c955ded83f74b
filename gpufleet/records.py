"""Wire records: what an agent says about itself.

These Structs are the JSON served at ``GET /v1/status`` and, in cluster mode, the value of
``/gpufleet/<cluster>/nodes/<node>`` in etcd. Decoders must tolerate fields they do not know
(msgspec ignores unknown fields by default), so an older coordinator can read a newer agent's
record; ``schema`` changes only when the meaning of an existing field changes.
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
