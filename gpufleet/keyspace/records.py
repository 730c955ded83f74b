"""Wire records: the JSON values stored in etcd (and served by the agent's /v1/status).

Every record carries ``schema``. Decoders tolerate fields they do not know (msgspec ignores
unknown fields by default), so an older coordinator reads a newer agent's record; ``schema``
changes only when the meaning of an existing field changes. Where each record lives is in
``paths.py``; decoding with logging and skipping of bad records is in ``codec.py``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from gpufleet.facts import DEFAULT_BACKEND, Backend

NODE_SCHEMA_VERSION = 1

InstanceStateName = Literal["STARTING", "WARMING", "READY", "UNHEALTHY", "RESTARTING", "FAILED", "STOPPED"]

# How two GPUs of one node are linked (GpuRecord.links), best (lowest) first: NVLink, then
# NVML's PCIe levels (nvmlDeviceGetTopologyCommonAncestor: the closest device both sit under).
# A tensor-parallel replica runs at the pace of its slowest link, so placement compares sets of
# GPUs by their worst pair (coordinator/policy/placement.py).
LINK_SELF = 0  # the GPU itself
LINK_NVLINK = 1  # NVLink, direct or through NVSwitch
LINK_PCIE_SWITCH = 2  # one PCIe switch, or one board (NVML SINGLE, INTERNAL)
LINK_PCIE_SWITCHES = 3  # several PCIe switches, no host bridge crossed (MULTIPLE)
LINK_HOST_BRIDGE = 4  # one PCIe host bridge (HOSTBRIDGE)
LINK_NUMA_NODE = 5  # host bridges of one NUMA node, i.e. one CPU socket (NODE)
LINK_SYSTEM = 6  # across CPU sockets (SYSTEM)
LINK_UNKNOWN = 9  # NVML could not tell; ranks after every known level
LINK_NAMES = {
    LINK_SELF: "one GPU",
    LINK_NVLINK: "NVLink",
    LINK_PCIE_SWITCH: "one PCIe switch",
    LINK_PCIE_SWITCHES: "several PCIe switches",
    LINK_HOST_BRIDGE: "a PCIe host bridge",
    LINK_NUMA_NODE: "the host bridges of one NUMA node",
    LINK_SYSTEM: "the CPU sockets' interconnect",
    LINK_UNKNOWN: "an unknown path",
}


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
    # How this GPU is linked to each GPU of the node, by GPU index (LINK_* above; its own entry
    # LINK_SELF). Probed once per GPU set (static). [] = not known: no preference in placement;
    # also what records from agents before topology decode to.
    links: list[int] = []


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
    # Started because the leader assigned it (a registered model), not from the agent's config.
    assigned: bool = False


class ModelAvailability(msgspec.Struct, kw_only=True):
    """Whether a registered model's path is usable on this host (checked by the agent)."""

    model: str
    path: str
    available: bool | None  # None: not checked yet
    # size_bytes / sha256 from the registry matched (False when none were given)
    verified: bool = False
    error: str | None = None
    checked_at: float | None = None


class ProxyCounters(msgspec.Struct, kw_only=True, gc=False):
    """Cumulative since the agent started (``NodeRecord.started_at`` tells a restart apart).

    ``attempts`` are upstream attempts on this node's own instances (each node counts only its
    own, so a request forwarded between nodes is not counted twice); ``attempt_errors`` are those
    that failed (connect error, 5xx, 429, timeout, cut off). The leader's cluster error rate for
    degradation is attempt_errors / attempts over a sliding window."""

    attempts: int = 0
    attempt_errors: int = 0
    requests: int = 0  # client requests that entered the cluster here
    degraded: int = 0  # of those, answered by degradation (cache, fallback, static)


class KeyDemand(msgspec.Struct, kw_only=True, frozen=True):
    """One API key's use at one entry node over the last minute (gpufleet/keylimits.py): what
    the leader divides the key's fleet-wide limits by."""

    requests: int = 0  # admitted
    refused: int = 0  # refused by this node's share (demand it could not serve)
    tokens: int = 0
    in_flight: int = 0


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
    models: list[ModelAvailability] = []  # one per registered model (cluster mode)
    proxy: ProxyCounters | None = None
    # Which agent wrote it (agent/cluster/identity.py): a second agent configured with the same
    # node_id is refused instead of taking the registration over. "" from agents before it.
    agent_id: str = ""
    # Use of each API key with limits that entered the cluster here (see KeySharesRecord).
    key_demand: dict[str, KeyDemand] = {}
    # On-demand models (ModelRecord.min_replicas < replicas) requested through this node: the
    # wall time of a recent request, refreshed at most every idle_unload_after_s / 4 per model
    # (agent/cluster/demand.py). The leader reads only *that it changed*, on its own clock.
    model_demand: dict[str, float] = {}


# --- written by the coordinator's leader ---------------------------------------------------------

LEADER_SCHEMA_VERSION = 1
ROUTES_SCHEMA_VERSION = 2  # 2: the endpoints moved to slices (RouteSlice); 1: one value held them all
MODEL_SCHEMA_VERSION = 1
ASSIGNMENT_SCHEMA_VERSION = 1
DRAIN_SCHEMA_VERSION = 1
DEGRADATION_SCHEMA_VERSION = 1
PLACEMENT_SCHEMA_VERSION = 1
APIKEY_SCHEMA_VERSION = 1
KEYSHARES_SCHEMA_VERSION = 1
USAGE_SCHEMA_VERSION = 1

# READY: routable. DEGRADED: the leader's view says no (bad samples, stale telemetry, too hot,
# ejected). DOWN: the node's lease is gone. DRAINED: an operator took the node out.
HealthState = Literal["READY", "DEGRADED", "DOWN", "DRAINED"]


class LeaderRecord(msgspec.Struct, kw_only=True):
    """``/leader``, under the leader's lease.

    ``epoch`` numbers leader terms: it grows with every new leader, also across an etcd
    restored from a backup or wiped (see coordinator/election.py), which is why it is not simply
    the key's create revision: revisions go backwards with the store. 0 in records written
    before epochs were stored; their epoch is the key's create revision (:func:`epoch_of`).
    """

    schema: int = LEADER_SCHEMA_VERSION
    coordinator: str
    address: str = ""
    elected_at: float
    epoch: int = 0


def epoch_of(record: LeaderRecord | None, create_revision: int) -> int:
    """The epoch of the leader whose ``/leader`` key was created at ``create_revision``."""
    return record.epoch if record is not None and record.epoch else create_revision


class RouteEndpoint(msgspec.Struct, kw_only=True, gc=False):  # scalars only: no cycles, skip the GC
    node: str
    address: str  # the node's agent/proxy base URL
    instance: str
    gpu_class: str
    weight: int
    state: HealthState


class RouteRecord(msgspec.Struct, kw_only=True):
    """``/routes/<model>``: where a model is served, with weights; written only on change.

    In etcd (schema 2) this is the model's *header*: ``endpoints`` is empty and the endpoints
    live in the slices ``/routeslices/<model>/@<n>`` (:class:`RouteSlice`) it lists in
    ``slices``; ``gpufleet.routeslices.assemble`` puts header and slices back together into a
    record with ``endpoints``, which is what every reader works with. A schema-1 record (written
    before slices) holds every endpoint itself and no ``slices``: readers take it as it is, and
    the next leader rewrites it as header and slices.
    """

    schema: int = ROUTES_SCHEMA_VERSION
    model: str
    epoch: int  # the leader epoch that wrote it: a reader can ignore a stale leader's table
    updated_at: float
    endpoints: list[RouteEndpoint] = []
    # Proxies fail over across GPU classes only when the operator's policy allows it.
    cross_class: bool = False
    # Panic mode for these classes: more than half unhealthy, so ejection is suspended.
    panic_classes: list[str] = []
    # Header only: the slice numbers that hold the endpoints, and counts over all of them
    # (READY endpoints with a weight, in all and per GPU class; distinct nodes) for readers that
    # do not fetch every slice: an agent following a subset of the slices knows from
    # ``ready_classes`` whether its subset lacks a class that is READY elsewhere.
    slices: list[int] = []
    ready_endpoints: int = 0
    nodes: int = 0
    ready_classes: dict[str, int] = {}


class RouteSlice(msgspec.Struct, kw_only=True):
    """``/routeslices/<model>/@<n>``: up to 100 of a model's endpoints (at most ~32 KB).

    A node's endpoints stay in the slice they were first put in, so a change on one node
    rewrites one slice, and every watcher receives that slice rather than the whole route.
    ``epoch`` must equal the header's for the slice to be read with it (no mixing of two
    leaders' tables)."""

    schema: int = ROUTES_SCHEMA_VERSION
    model: str
    epoch: int
    slice: int
    endpoints: list[RouteEndpoint] = []


ModelBackend = Backend


class ModelRecord(msgspec.Struct, kw_only=True):
    """``/models/<name>``: a model registered by an operator, on shared storage.

    Validated by ``gpufleet.registry.validate_model`` (gpuctl refuses a bad one; the leader skips
    one that is bad in etcd)."""

    schema: int = MODEL_SCHEMA_VERSION
    name: str
    path: str  # absolute path on shared storage, the same on every host
    backend: ModelBackend = DEFAULT_BACKEND
    replicas: int = 1
    # GPUs one replica spans (tensor parallel): all of one class, on one node.
    gpus_per_replica: int = 1
    # GPU memory one replica needs on each of its GPUs; None: a whole GPU (vLLM's default share, 0.9).
    min_vram_gib: float | None = None
    classes: list[str] = []  # allowed GPU classes; [] = any
    size_bytes: int | None = None  # file size, or the sum of the files under a directory
    sha256: str | None = None  # of the file, or of a directory's manifest (see gpufleet.registry)
    fallback: str | None = None  # model answering in degradation level 2
    args: list[str] = []  # extra backend arguments
    gpu_memory_fraction: float | None = None  # overrides the share computed from min_vram_gib
    created_at: float = 0.0
    # On demand: ``replicas`` run while the model is wanted (a request within
    # idle_unload_after_s anywhere in the cluster), ``min_replicas`` otherwise. None: always
    # ``replicas`` (see gpufleet.registry.min_replicas and coordinator/policy/ondemand.py).
    min_replicas: int | None = None
    idle_unload_after_s: float = 600.0
    # Autoscaling (coordinator/policy/autoscale.py): while wanted, between ``replicas`` and
    # ``max_replicas``, one replica more when the mean of requests waiting per READY replica
    # stays above ``scale_up_waiting`` for ``scale_up_after_s``, one less when it stays at or
    # below ``scale_down_waiting`` for ``scale_down_after_s`` (and a replica is idle); at most
    # one change per ``scale_cooldown_s``. None: fixed at ``replicas``.
    max_replicas: int | None = None
    scale_up_waiting: float = 2.0
    scale_up_after_s: float = 30.0
    scale_down_waiting: float = 0.5
    scale_down_after_s: float = 300.0
    scale_cooldown_s: float = 120.0


class AssignedInstance(msgspec.Struct, kw_only=True):
    """One replica the leader placed: what the agent needs to start it, nothing it must look up."""

    name: str  # instance name on the node (``assigned_instance_name(model)``)
    model: str
    path: str
    backend: ModelBackend
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


class ModelPlacement(msgspec.Struct, kw_only=True):
    """How one model's replicas were placed; ``reasons`` say why some could not be."""

    model: str
    desired: int
    nodes: list[str] = []  # where its replicas are assigned
    unplaced: int = 0
    reasons: list[str] = []
    # On-demand and autoscaled models: the leader's last scaling decision, when and why, and a
    # scale-down that waits for an idle replica ("" for the others).
    scaling: str = ""


class PlacementRecord(msgspec.Struct, kw_only=True):
    """``/state/placement``: the leader's placement result, for operators (``gpuctl models list``)."""

    schema: int = PLACEMENT_SCHEMA_VERSION
    epoch: int
    updated_at: float
    models: list[ModelPlacement] = []


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


class KeySecret(msgspec.Struct, kw_only=True, frozen=True):
    sha256: str  # hex digest of the whole secret
    hint: str  # its last four characters
    created_at: float
    retires_at: float | None = None  # set by a rotation: valid until then


class ApiKeyRecord(msgspec.Struct, kw_only=True, frozen=True):
    """``/keys/<name>``: an API key (or one entry of a standalone agent's keys file). Only the
    secrets' digests are stored; the format and the rules are in ``gpufleet/apikeys.py``."""

    schema: int = APIKEY_SCHEMA_VERSION
    name: str
    owner: str = ""
    models: list[str] = []  # models this key may use; [] = every model
    rpm: int | None = None  # requests per minute, across the fleet
    tpm: int | None = None  # prompt + completion tokens per minute, across the fleet
    max_concurrency: int | None = None  # requests in flight at once, across the fleet
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    secrets: list[KeySecret] = []  # newest first


class KeyShare(msgspec.Struct, kw_only=True, frozen=True):
    nodes: dict[str, float] = {}  # the share of each entry node that reported demand
    idle: float = 0.0  # the share of every other entry node


class KeySharesRecord(msgspec.Struct, kw_only=True):
    """``/state/keyshares``: how the leader divides each limited key's fleet-wide limits among
    the entry nodes, in proportion to their reported demand; each key's shares sum to 1."""

    schema: int = KEYSHARES_SCHEMA_VERSION
    epoch: int
    updated_at: float
    entry_nodes: int
    keys: dict[str, KeyShare] = {}


class UsageRow(msgspec.Struct, array_like=True, frozen=True):
    """One key's use of one model in one hour, as a JSON array (the record holds thousands)."""

    key: str
    model: str
    hour: int  # unix time the hour began; 0: everything older than the hours kept, summed
    requests: int = 0
    errors: int = 0  # of those, ended with a status >= 400 (or none: cut off)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JournalMark(msgspec.Struct, kw_only=True, frozen=True):
    covers: int  # the journal's last sequence number counted in the rows
    at: float  # when it was last rolled up


class UsageRecord(msgspec.Struct, kw_only=True):
    """``/usage/<node>``: what the requests that entered the cluster at ``node`` used, per key,
    model and hour, summed since the node first counted. Written only by that node's agent
    (compare-and-swap on its mod revision) and not under a lease: a node that left still counts.
    ``journals`` says up to where each of the node's usage journals (a state directory; a new one
    after it was wiped) is counted, so a roll-up repeated after a crash adds nothing twice."""

    schema: int = USAGE_SCHEMA_VERSION
    node: str
    updated_at: float
    journals: dict[str, JournalMark] = {}
    rows: list[UsageRow] = []
