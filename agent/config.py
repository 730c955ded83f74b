"""gpu-agent configuration: TOML -> msgspec Structs, with every problem reported by path.

The daemon and ``gpu-agent check-config`` share :func:`load_config`; both exit 78 (EX_CONFIG) on
any problem so systemd's ``RestartPreventExitStatus=78`` stops a restart loop on a bad file.
Relative paths in the file are resolved against the file's directory.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from agent import serverflags
from agent.keys.config import AuthSection, auth_problems, auth_warnings
from gpufleet.etcdconfig import EtcdSettings
from gpufleet.facts import BACKENDS, HOT_GPU_C, Backend
from gpufleet.httpserver import ApiSection
from gpufleet.keyspace import InvalidName, check_name
from gpufleet.registry import path_problems
from gpufleet.tlsconfig import TlsSection
from gpufleet.tomlconfig import (
    ConfigError,
    ConfigProblem,
    Fraction,
    LogFormat,
    LogLevel,
    NonNegFloat,
    Percent,
    Port,
    PositiveFloat,
    StrictSection,
    convert_sections,
    is_loopback,
    load_document,
    url_problem,
)

DEFAULT_CONFIG_PATH = "/etc/gpu-agent/agent.toml"

# Instance names become log file names, cgroup names and URL path segments: no slashes, no dots first.
InstanceName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
BackendName = Literal[Backend, "command"]  # an instance may also run an operator's own argv


class AgentSection(StrictSection):
    node_id: str | None = None  # default: the host name
    # The API and proxy port. In cluster mode other nodes' proxies and the coordinator reach it at
    # advertise_url: a loopback address is warned of.
    listen_host: str = "127.0.0.1"
    listen_port: Port = 8080
    # URL other hosts use to reach this agent; default http://<node_id>:<listen_port>
    advertise_url: str | None = None
    # What survives a restart: the model servers' process groups (adopted or cleaned up by the next
    # agent) and the agent's identity (a restarted agent takes its own node record back at once).
    state_dir: str = "/var/lib/gpu-agent"
    log_dir: str = "/var/log/gpu-agent"  # each instance's stdout and stderr, as <name>.log (rotated)
    # Admin endpoints are refused (403) unless a token file is configured.
    admin_token_file: str | None = None
    # Create the token file with a random token (mode 0600) if it does not exist. For demos and
    # first boots; production installs write the file themselves (the Ansible role does).
    admin_token_generate: bool = False
    log_format: LogFormat = "auto"  # auto: text on a terminal, JSON lines otherwise (journald)
    log_level: LogLevel = "info"


class GpuScriptStep(StrictSection):
    """A scheduled change of a simulated GPU, ``at_s`` seconds after the agent starts."""

    at_s: NonNegFloat
    temperature_c: float | None = None
    utilization_percent: Percent | None = None
    power_w: NonNegFloat | None = None
    memory_used_gib: NonNegFloat | None = None
    lost: bool | None = None  # true: the GPU stops answering, as a GPU fallen off the bus


class SimulatedGpu(StrictSection):
    name: str = "NVIDIA A100-SXM4-80GB"  # as NVML names it: the GPU class is derived from it
    memory_total_gib: PositiveFloat = 80.0
    memory_used_gib: NonNegFloat = 0.0  # used by something other than our instances
    temperature_c: float = 40.0
    utilization_percent: Percent = 0.0
    power_w: NonNegFloat = 60.0
    uuid: str | None = None  # default: derived from the host and index
    script: list[GpuScriptStep] = []  # changes over time (heat, load, loss), for demos and tests
    # Interconnect, which tensor-parallel placement prefers (NVML's view on real GPUs). GPUs with
    # the same nvlink_island are NVLink-connected, the same pcie_switch share one PCIe switch,
    # the same numa_node one CPU socket (a different one: across sockets). Unset: not known.
    nvlink_island: Annotated[int, Meta(ge=0)] | None = None
    pcie_switch: Annotated[int, Meta(ge=0)] | None = None
    numa_node: Annotated[int, Meta(ge=0)] | None = None


class GpuSection(StrictSection):
    # "nvml" reads real GPUs; "simulated" serves the declared GPUs below. Never switched silently.
    source: Literal["nvml", "simulated"] = "nvml"
    # Sum of gpu_memory_fraction of the instances on one GPU must stay at or under this.
    memory_budget: Fraction = 0.95
    # Extra name-substring -> class rules, checked before the built-in table (first match wins).
    classes: dict[str, str] = {}
    simulated: list[SimulatedGpu] = []  # the GPUs of source = "simulated", one table each
    # Deadline of one NVML read of every GPU; a driver call that hangs past it yields a probe
    # without data instead of a stuck agent.
    nvml_timeout_s: PositiveFloat = 5.0
    # Deprecated name of nvml_timeout_s (it read like [supervisor] probe_timeout_s, the health
    # probe's timeout). Still sets nvml_timeout_s, with a warning; giving both is an error.
    probe_timeout_s: PositiveFloat | None = None
    # EWMA weight of a new utilization sample in what the agent reports (1 = raw NVML values).
    utilization_smoothing: Fraction = 0.3

    def __post_init__(self) -> None:
        _apply_renamed_keys(self, "gpu")


class SupervisorSection(StrictSection):
    probe_interval_s: PositiveFloat = 5.0  # health probe of each READY instance
    # A health endpoint on localhost answers in milliseconds; one that has not in 2 s is hung
    # (or SIGSTOPped). The first failed probe takes the instance out of rotation and the next
    # comes within a second, so a frozen server is out in at most interval + timeout.
    probe_timeout_s: PositiveFloat = 2.0
    failure_threshold: Annotated[int, Meta(ge=1)] = 3  # consecutive failed probes that restart an instance
    recovery_window: Annotated[int, Meta(ge=1)] = 20  # probes kept for health_ratio
    # Restart delay after a failure: backoff_initial_s, doubling per failure up to backoff_max_s;
    # back to the start after a run that stayed READY.
    backoff_initial_s: PositiveFloat = 1.0
    backoff_max_s: PositiveFloat = 60.0
    # More failures than crash_loop_restarts within crash_loop_window_s: the instance is FAILED
    # and not restarted until an operator (or a reload) starts it.
    crash_loop_restarts: Annotated[int, Meta(ge=1)] = 5
    crash_loop_window_s: PositiveFloat = 600.0
    stop_grace_s: NonNegFloat = 30.0  # SIGTERM, then SIGKILL after this long (requests in flight drain)
    # Grace when the server is not answering, so there is nothing to drain: a restart after a
    # failure (probes, warm-up, start-up), or any stop while its last probe failed or it is
    # ejected. A stopped (SIGSTOP) server gets none.
    failed_stop_grace_s: NonNegFloat = 5.0
    # From start to the first passing health probe (model loading); an instance may set its own.
    startup_timeout_s: PositiveFloat = 600.0
    # Ports for instances without an explicit one are taken from [port_base, port_base + port_span).
    port_base: Port = 8100
    port_span: Annotated[int, Meta(ge=1, le=10000)] = 200
    # Under systemd, an agent that exits (restart, upgrade, crash) leaves its model servers
    # running for the next agent to adopt; systemd's fd store decides whether one comes
    # (agent/supervisor/handover.py). false: every exit stops them, as `systemctl stop` does.
    # Read at start-up (a reload does not change it).
    keep_servers_on_restart: bool = True
    # Each instance's log in log_dir is rotated at log_max_bytes, keeping log_backups old files.
    log_max_bytes: Annotated[int, Meta(ge=4096)] = 10 * 1024 * 1024
    log_backups: Annotated[int, Meta(ge=0, le=100)] = 5


class ModelLimit(StrictSection):
    """Per-model admission at the proxy: at most ``max_concurrency`` requests upstream at once,
    ``max_queue`` more waiting for a slot; beyond that, 429."""

    max_concurrency: Annotated[int, Meta(ge=1)]  # requests upstream at once, over all the model's instances
    max_queue: Annotated[int, Meta(ge=0)] = 0  # requests waiting for a slot; one more gets 429


class TaskRoute(StrictSection):
    """Route one kind of request for a model to a group of its instances: images to one, documents
    to another, the rest to a third, as the OpenClaw multi-instance setup does (docs/sources.md)."""

    model: str  # the model clients ask for (an instance's served_model_name)
    task: Literal["image", "document", "text"]  # image: a request with an image part; document: a file part
    instances: list[str]  # names of [[instances]] serving this model


class ProxySection(StrictSection):
    enabled: bool = True  # the OpenAI-compatible proxy on the agent's port (/v1/...)
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 32 * 1024 * 1024  # base64 images are large
    connect_timeout_s: PositiveFloat = 2.0  # to an instance; past it the attempt goes elsewhere
    # A stream's first chunk (the first token: prefill plus queueing; a 70B model's prefill of
    # a long prompt takes tens of seconds). Past it the attempt is abandoned and retried elsewhere.
    ttfb_timeout_s: PositiveFloat = 120.0
    # A non-streaming answer (servers send headers with the whole answer: prefill + every
    # token). 300 s covers ~4k tokens at 15 tokens/s; longer generations should stream.
    response_timeout_s: PositiveFloat = 300.0
    # Between two chunks of a stream, once it has begun: an engine that hangs after its first
    # token. Generous (a server may preempt a sequence under KV-cache pressure and recompute
    # it); the stream then ends with an error event, counted against the instance.
    stream_idle_timeout_s: PositiveFloat = 120.0
    total_timeout_s: PositiveFloat = 900.0  # the whole request, retries and streaming included
    # Passive health (outlier ejection): this many consecutive gateway failures of real requests
    # on an instance (timeouts, refused/reset connections, 5xx judged its fault) take it out of
    # rotation for eject_base_s, doubling per ejection up to eject_max_s; then one trial request
    # decides. At most max_ejected_fraction of a model's instances, never the last one. 0: off.
    eject_after_failures: Annotated[int, Meta(ge=0)] = 5
    eject_base_s: PositiveFloat = 30.0
    eject_max_s: PositiveFloat = 300.0
    max_ejected_fraction: Fraction = 0.5
    # Probes cannot see an engine that hangs behind a passing health check: reaching the
    # failure threshold this many times with no success in between (ejected or not: the last
    # instance is never ejected) restarts the instance. 0: never.
    restart_after_ejections: Annotated[int, Meta(ge=0)] = 3
    # Attempts on distinct instances when a failure happens before the first response byte.
    max_attempts: Annotated[int, Meta(ge=1, le=10)] = 3
    retry_budget_s: PositiveFloat = 15.0  # no new attempt starts this long after the request came
    retry_after_s: Annotated[int, Meta(ge=1)] = 2  # Retry-After of a 429 or 503 answer
    # Idle keep-alive connections kept per upstream (an instance here, or another node's agent);
    # more idle ones are closed, the longest idle first, and none is kept past 30 s idle. 0: a
    # new connection per request (nginx's `keepalive` in an upstream block).
    upstream_keepalive: Annotated[int, Meta(ge=0)] = 64
    limits: dict[str, ModelLimit] = {}  # per model (the name clients ask for)
    # Task routes: a kind of request (image, document, text) to a group of the model's instances.
    task_routes: list[TaskRoute] = []
    # When the instances a task route names are not READY, use any READY instance of the model.
    task_route_fallback: bool = True
    # Deprecated name of task_routes ("routes" alone is the cluster's route table). Still
    # accepted, with a warning; giving both names is an error.
    routes: list[TaskRoute] | None = None
    # Deprecated name of task_route_fallback. Still accepted, with a warning; both is an error.
    route_fallback: bool | None = None
    access_log: bool = True  # one log line per proxied request
    # Between other nodes: "least_loaded" follows the route's weights at rest and moves a request
    # to a second choice carrying less load per weight (requests this proxy has in flight there);
    # "round_robin" follows the weights only (smooth weighted round-robin, nginx's).
    remote_balance: Literal["least_loaded", "round_robin"] = "least_loaded"
    # Session affinity: requests with the same value of this header (e.g. "X-Session-ID") go to
    # the same instance or node while it is in rotation and has at most affinity_max_extra more
    # requests in flight than the least busy one, so its prefix cache is reused. "": off.
    affinity_header: str = ""
    affinity_max_extra: Annotated[int, Meta(ge=0)] = 4
    # On-demand models (registered with min_replicas = 0): a request while no replica is READY
    # anywhere waits, at most cold_start_queue per model, up to cold_start_timeout_s for the
    # leader to place one and for it to warm up; past either, 503 with Retry-After.
    cold_start_queue: Annotated[int, Meta(ge=0)] = 64
    cold_start_timeout_s: PositiveFloat = 300.0

    def __post_init__(self) -> None:
        _apply_renamed_keys(self, "proxy")


class ClusterSection(EtcdSettings, forbid_unknown_fields=True, kw_only=True):
    """Cluster mode: set ``endpoints`` and the agent registers in etcd; leave it empty for a
    standalone host."""

    # The node's etcd lease: its records vanish this long after the agent stops renewing it.
    lease_ttl_s: Annotated[int, Meta(ge=3, le=300)] = 10
    keepalive_interval_s: PositiveFloat | None = None  # default: lease_ttl_s / 3
    # Publish the node record on a meaningful change, and at least this often.
    publish_interval_s: PositiveFloat = 30.0
    publish_min_gap_s: NonNegFloat = 1.0  # state changes (failover-relevant): merged within this gap
    telemetry_min_gap_s: NonNegFloat = 15.0  # temperature/utilization changes: at most one write per gap
    temperature_delta_c: PositiveFloat = 2.0  # a change this large is published (at most one per telemetry gap)
    # Crossing this temperature (either way) is published at once, as a state change: the
    # coordinator caps the weight of a hot GPU (facts.HOT_GPU_C) at 30 % of its base.
    temperature_urgent_c: float = HOT_GPU_C
    utilization_delta_percent: PositiveFloat = 10.0  # likewise for GPU utilization
    # Route slices (endpoints and weights) are followed for the models served here and those
    # requested through this node within route_watch_idle_s; at most route_watch_max_models
    # of the latter (least recently used dropped). Every model's small header is always followed.
    route_watch_idle_s: PositiveFloat = 600.0
    route_watch_max_models: Annotated[int, Meta(ge=1)] = 256
    # The first request for a model not followed yet waits this long for its route from etcd.
    route_fetch_timeout_s: PositiveFloat = 5.0
    # Of a model with more slices than this (100 endpoints each), follow a subset of this many
    # consecutive slices, chosen by a hash of node and model so that the agents' subsets cover
    # every slice evenly; all slices while the subset has no READY endpoint on another node of
    # this node's GPU class. Cuts the watch traffic of a weight change by slices / this.
    # 0: always follow every slice.
    route_subset_slices: Annotated[int, Meta(ge=0)] = 4

    @property
    def enabled(self) -> bool:
        return bool(self.endpoints)

    @property
    def keepalive_s(self) -> float:
        return self.keepalive_interval_s or self.lease_ttl_s / 3


class ModelsSection(StrictSection):
    """Registered models the coordinator's leader assigns to this node (cluster mode).

    The agent checks each registered model's path on this host (present, readable; size and
    sha256 once, when registered), starts the replicas assigned to it beside the instances of
    this file, and stops them when the assignment goes away."""

    enabled: bool = True  # accept assignments (false: report path checks only, start nothing)
    # backend -> argv that replaces the backend's executable on this host, e.g.
    # vllm = ["/opt/vllm/bin/vllm", "serve"]; "{python}" is the agent's interpreter.
    launchers: dict[str, list[str]] = {}
    # Model paths must lie under one of these directories ([] = any absolute path). A registry
    # entry is written by whoever can write etcd; this keeps it to the shared model store.
    allowed_roots: list[str] = []
    recheck_interval_s: PositiveFloat = 30.0  # presence/readability re-check (mounts go away)
    check_timeout_s: PositiveFloat = 10.0  # a hung network file system is reported, not waited on
    checksum_timeout_s: PositiveFloat = 3600.0  # sha256 of a large model takes a while
    verify_checksums: bool = True  # check a registered size and sha256 (false: presence and readability only)


class DegradationSection(StrictSection):
    """How the proxy applies the cluster's degradation level (set by the coordinator's leader):
    1 = identical requests answered from a response cache, 2 = the model's fallback serves,
    3 = a static JSON answer."""

    enabled: bool = True  # false: this proxy serves normally at every level
    # Level 1's response cache: an answer is reused for cache_ttl_s, within the entry, byte and
    # per-answer limits below (the least recently used goes first).
    cache_ttl_s: PositiveFloat = 60.0
    cache_max_entries: Annotated[int, Meta(ge=1)] = 1024
    cache_max_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    cache_max_entry_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    # Share of requests that bypass degradation and go to the model servers, so the error rate
    # keeps being measured and the cluster can recover from level 3.
    probe_share: Fraction = 0.05
    static_status: Annotated[int, Meta(ge=200, le=599)] = 200  # HTTP status of level 3's static answer


class Warmup(StrictSection):
    enabled: bool = True  # one small request before the instance is READY (first-request latency)
    kind: Literal["chat", "completion", "embedding"] = "chat"  # which endpoint it calls
    prompt: str = "Hello"
    max_tokens: Annotated[int, Meta(ge=1)] = 8
    timeout_s: PositiveFloat = 120.0
    attempts: Annotated[int, Meta(ge=1)] = 3  # all failing: the start failed (restarted with back-off)


class InstanceConfig(StrictSection):
    name: InstanceName  # unique on the host: log file, cgroup and URL names
    backend: BackendName  # the server program; "command": an argv of your own (command below)
    # What the server loads: a path on (shared) storage or a model id.
    model: str = ""
    # The name clients ask for in the request's "model" field; default: ``model``.
    served_model_name: str | None = None
    gpus: list[Annotated[int, Meta(ge=0)]] = []  # [] = CPU only
    # Share of each listed GPU's memory (vLLM --gpu-memory-utilization); required with gpus.
    gpu_memory_fraction: Fraction | None = None
    port: Port | None = None  # default: a free port from [supervisor] port_base
    host: str = "127.0.0.1"  # where the server listens; the agent probes and proxies to it there
    # Replaces the backend's executable (e.g. a venv path, or the simulated server); the backend
    # still appends its own arguments. "{python}" stands for the interpreter running the agent.
    launcher: list[str] | None = None
    args: list[str] = []  # appended to the backend's own arguments
    env: dict[str, str] = {}  # added to the server's environment
    # backend = "command": the whole argv, with {port}, {host}, {model}, {served_model_name},
    # {gpu_memory_fraction} and {python} placeholders.
    command: list[str] | None = None
    # backend = "command": the path that answers 2xx once the server is ready; unset: /health,
    # falling back to /v1/models on servers without /health.
    health_path: str | None = None
    # backend = "command": a Prometheus endpoint with vLLM's or llama.cpp's load metrics.
    metrics_path: str | None = None
    # llama.cpp -ngl / KoboldCPP --gpulayers; default: all layers on GPU when gpus is set, else 0.
    gpu_layers: Annotated[int, Meta(ge=0)] | None = None
    cpu_quota: PositiveFloat | None = None  # CPU cores (cgroup v2 cpu.max); sets llama.cpp/KoboldCPP threads
    # Context window (tokens) and concurrent sequences ("slots"), mapped to each backend's own
    # flags (agent/serverflags.py): llama.cpp -c/-np, vLLM --max-model-len/--max-num-seqs,
    # KoboldCPP --contextsize/--multiuser, Ollama OLLAMA_CONTEXT_LENGTH/OLLAMA_NUM_PARALLEL.
    # Unset: the server's default, except llama.cpp, whose default is the model's whole training
    # context (a 128k-token model would reserve many GB of KV cache): there the agent passes
    # LLAMACPP_DEFAULT_CONTEXT.
    context_size: Annotated[int, Meta(ge=64)] | None = None
    parallel: Annotated[int, Meta(ge=1, le=4096)] | None = None
    # A file holding the API key the model server requires. The agent hands it to the server
    # through its environment (argv is readable by every local user) and sends it on its own
    # probes, warm-ups and metrics reads and on the requests it proxies to the instance.
    api_key_file: str | None = None
    startup_timeout_s: PositiveFloat | None = None  # default: [supervisor] startup_timeout_s
    warmup: Warmup = msgspec.field(default_factory=Warmup)  # a request sent before the instance is READY
    autostart: bool = True  # false: configured but stopped until started through the admin API

    @property
    def client_model(self) -> str:
        return self.served_model_name or self.model


class AgentConfig(msgspec.Struct, kw_only=True):
    agent: AgentSection
    gpu: GpuSection
    supervisor: SupervisorSection
    instances: list[InstanceConfig]
    proxy: ProxySection = msgspec.field(default_factory=ProxySection)
    cluster: ClusterSection = msgspec.field(default_factory=ClusterSection)
    models: ModelsSection = msgspec.field(default_factory=ModelsSection)
    degradation: DegradationSection = msgspec.field(default_factory=DegradationSection)
    api: ApiSection = msgspec.field(default_factory=ApiSection)  # the listener's timeouts and limits
    auth: AuthSection = msgspec.field(default_factory=AuthSection)  # who may use the OpenAI routes
    tls: TlsSection = msgspec.field(default_factory=TlsSection)  # HTTPS on the port, and to other nodes
    source_path: str = ""
    # The file has an ``instances`` key (``[[instances]]`` tables, or ``instances = []`` for "none
    # on purpose"). A reload refuses a file that would stop every instance by omission.
    instances_declared: bool = True

    @property
    def node_id(self) -> str:
        return self.agent.node_id or socket.gethostname()

    @property
    def advertise_url(self) -> str:
        return self.agent.advertise_url or f"{self.tls.scheme}://{self.node_id}:{self.agent.listen_port}"


# What a reload cannot change in a running agent: whole sections, or "section.field". They keep
# their running value until a restart and the reload says so (like Patroni's pending_restart).
# [agent]: the listen socket, paths, token file and log setup are made once; [gpu]: the GPU
# source is opened once; [cluster]: the etcd client, lease and watches are made once; [api]: the
# listener's limits are set when it opens; [proxy]: whether its HTTP routes exist, the app's body
# limit and the upstream session (connect timeout) are built once; keep_servers_on_restart is
# given to systemd's fd store at start-up; [tls]: the listener's context is made once, but a
# reload reads its files again (a rotated certificate). The rest of [supervisor] and [proxy], [models],
# [degradation] and the instances apply live.
RESTART_ONLY = (
    "agent",
    "gpu",
    "cluster",
    "api",
    "tls",
    "supervisor.keep_servers_on_restart",
    "proxy.enabled",
    "proxy.max_body_bytes",
    "proxy.connect_timeout_s",
)


def _get(cfg: AgentConfig, name: str) -> object:
    section, _, field = name.partition(".")
    value = getattr(cfg, section)
    return getattr(value, field) if field else value


def restart_only_changes(running: AgentConfig, new: AgentConfig) -> list[str]:
    """The RESTART_ONLY settings whose value in ``new`` differs from the running one."""
    return [name for name in RESTART_ONLY if _get(running, name) != _get(new, name)]


def live_reloadable(running: AgentConfig, new: AgentConfig) -> AgentConfig:
    """The config a reload applies: ``new``, except that every RESTART_ONLY setting keeps its
    running value (instances, supervision, proxy, models and degradation apply live)."""
    live = msgspec.structs.replace(new, source_path=running.source_path or new.source_path)
    for name in RESTART_ONLY:
        section, _, field = name.partition(".")
        if not field:
            live = msgspec.structs.replace(live, **{section: getattr(running, section)})
        else:
            kept = msgspec.structs.replace(getattr(live, section), **{field: _get(running, name)})
            live = msgspec.structs.replace(live, **{section: kept})
    return live


SECTIONS: dict[str, type] = {
    "agent": AgentSection,
    "gpu": GpuSection,
    "supervisor": SupervisorSection,
    "proxy": ProxySection,
    "cluster": ClusterSection,
    "models": ModelsSection,
    "degradation": DegradationSection,
    "api": ApiSection,
    "auth": AuthSection,
    "tls": TlsSection,
}


def load_config(path: str | Path) -> AgentConfig:
    """Parse and validate; raises :class:`ConfigError` listing every problem found.

    Type errors and cross-field problems come together: the cross-field rules run on the
    sections that decoded (see :func:`validate`)."""
    path = Path(path)
    data = load_document(path)
    problems: list[ConfigProblem] = renamed_key_problems(data)
    parts = convert_sections(data, SECTIONS, {"instances": InstanceConfig}, problems)
    decoded = {name for name in SECTIONS if name in parts}
    if "instances" in parts and None not in parts["instances"]:
        decoded.add("instances")
    cfg = AgentConfig(
        **{name: parts[name] if name in parts else typ() for name, typ in SECTIONS.items()},
        instances=parts["instances"] if "instances" in decoded else [],
        source_path=str(path),
        instances_declared="instances" in data,
    )
    _resolve_paths(cfg, path.parent)
    problems.extend(validate(cfg, decoded))
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def _resolve_paths(cfg: AgentConfig, base: Path) -> None:
    def resolve(p: str) -> str:
        return str((base / p).resolve()) if not Path(p).is_absolute() else p

    a = cfg.agent
    a.state_dir = resolve(a.state_dir)
    a.log_dir = resolve(a.log_dir)
    if a.admin_token_file:
        a.admin_token_file = resolve(a.admin_token_file)
    cfg.cluster.resolve(base)
    cfg.auth.resolve(base)
    cfg.api.resolve(base)
    cfg.tls.resolve(base)


def validate(cfg: AgentConfig, decoded: Collection[str] | None = None) -> list[ConfigProblem]:
    """Cross-field rules that a type cannot express. Pure: no I/O.

    ``decoded`` names the sections that decoded without a type error ("instances": all of
    them); default: all. A rule that reads a section with a type error is skipped (its verdict
    would rest on defaults); the others run, so one check-config lists everything at once."""
    out: list[ConfigProblem] = []
    for needs, rule in _RULES:
        if decoded is None or needs <= set(decoded):
            out.extend(rule(cfg))
    return out


# Keys renamed so that one name means one thing: section -> {deprecated name: (name, why)}. The
# old name still loads and sets the new one (config_warnings says to rename it); both at once is
# an error. The Struct keeps the old field, None unless given, so the warning can be told.
RENAMED_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "gpu": {
        "probe_timeout_s": (
            "nvml_timeout_s",
            "the NVML read deadline; [supervisor] probe_timeout_s is the health probe's timeout",
        ),
    },
    "proxy": {
        "routes": ("task_routes", "routes alone is the cluster's route table"),
        "route_fallback": ("task_route_fallback", "the fallback of the task routes"),
    },
}


def _apply_renamed_keys(section: msgspec.Struct, name: str) -> None:
    """A deprecated key that was given sets the key it was renamed to (see RENAMED_KEYS)."""
    for old, (new, _) in RENAMED_KEYS[name].items():
        value = getattr(section, old)
        if value is not None:
            setattr(section, new, value)


def renamed_key_problems(data: dict[str, object]) -> list[ConfigProblem]:
    """A renamed key given under both its old and its new name: which one was meant is unclear."""
    out = []
    for section, renames in RENAMED_KEYS.items():
        raw = data.get(section)
        for old, (new, _) in renames.items():
            if isinstance(raw, dict) and old in raw and new in raw:
                out.append(
                    ConfigProblem(f"$.{section}.{old}", f"is the deprecated name of {new}, also given: keep only {new}")
                )
    return out


def config_warnings(cfg: AgentConfig) -> list[ConfigProblem]:
    """Legal but probably a mistake: said by check-config and at start-up, never refused."""
    out = []
    host = cfg.agent.listen_host
    if cfg.cluster.enabled and is_loopback(host):
        advertised = urlsplit(cfg.advertise_url).hostname or ""
        if cfg.agent.advertise_url is None or is_loopback(advertised):
            out.append(
                ConfigProblem(
                    "$.agent.listen_host",
                    f"{host} is a loopback address in cluster mode: other nodes cannot reach this agent "
                    f"at {cfg.advertise_url} (only processes on this host can); listen on 0.0.0.0 or this "
                    "host's address, or set advertise_url to a proxy in front of it",
                )
            )
    out.extend(auth_warnings(cfg.auth, host))
    for section, renames in RENAMED_KEYS.items():
        for old, (new, why) in renames.items():
            if getattr(getattr(cfg, section), old) is not None:
                out.append(ConfigProblem(f"$.{section}.{old}", f"is deprecated: rename it {new} ({why})"))
    return out


def supervisor_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    out = []
    sup = cfg.supervisor
    if sup.backoff_max_s < sup.backoff_initial_s:
        out.append(ConfigProblem("$.supervisor.backoff_max_s", "must be >= backoff_initial_s"))
    if sup.probe_timeout_s >= sup.probe_interval_s:
        out.append(ConfigProblem("$.supervisor.probe_timeout_s", "must be shorter than probe_interval_s"))
    return out


def gpu_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    out = []
    if cfg.gpu.source == "simulated" and not cfg.gpu.simulated:
        out.append(ConfigProblem("$.gpu.simulated", 'source = "simulated" needs at least one [[gpu.simulated]]'))
    if cfg.gpu.source == "nvml" and cfg.gpu.simulated:
        out.append(ConfigProblem("$.gpu.simulated", 'simulated GPUs are declared but source = "nvml"'))
    return out


def agent_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    out = []
    if cfg.agent.admin_token_generate and not cfg.agent.admin_token_file:
        out.append(ConfigProblem("$.agent.admin_token_generate", "needs admin_token_file"))
    if cfg.agent.advertise_url is not None and (problem := url_problem(cfg.agent.advertise_url)):
        out.append(ConfigProblem("$.agent.advertise_url", problem))
    return out


def tls_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    """[tls]'s own rules, and an advertised URL whose scheme the port does not serve: other
    nodes would forward to it in plain HTTP and fail (or, behind a TLS terminator, the
    operator advertises that on purpose: https there too)."""
    return cfg.tls.problems("$.tls") + cfg.tls.advertise_problems(cfg.agent.advertise_url, "$.agent.advertise_url")


def api_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    return cfg.api.problems("$.api", admin_token=cfg.agent.admin_token_file is not None)


def instance_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    out: list[ConfigProblem] = []
    seen_names: dict[str, int] = {}
    seen_ports: dict[int, int] = {}
    for i, inst in enumerate(cfg.instances):
        at = f"$.instances[{i}]"
        if inst.name in seen_names:
            out.append(
                ConfigProblem(f"{at}.name", f"duplicate name {inst.name!r} (also instances[{seen_names[inst.name]}])")
            )
        seen_names.setdefault(inst.name, i)
        if inst.port is not None:
            other = seen_ports.get(inst.port)
            if other is not None:
                out.append(ConfigProblem(f"{at}.port", f"{inst.port} is also used by instances[{other}]"))
            else:
                seen_ports[inst.port] = i
        if inst.backend == "command":
            if not inst.command:
                out.append(ConfigProblem(f"{at}.command", 'required when backend = "command"'))
            elif not any("{port}" in a for a in inst.command):
                out.append(ConfigProblem(f"{at}.command", "must contain {port} so the server listens where we probe"))
        else:
            if inst.command is not None:
                out.append(
                    ConfigProblem(
                        f"{at}.command", f'only for backend = "command" (use launcher/args with {inst.backend})'
                    )
                )
            if not inst.model:
                out.append(ConfigProblem(f"{at}.model", "required"))
        if not inst.client_model:
            out.append(ConfigProblem(f"{at}.served_model_name", "required when model is empty"))
        if inst.gpus:
            if inst.gpu_memory_fraction is None:
                out.append(
                    ConfigProblem(f"{at}.gpu_memory_fraction", "required when gpus is set (share of each GPU's memory)")
                )
            if len(set(inst.gpus)) != len(inst.gpus):
                out.append(ConfigProblem(f"{at}.gpus", "lists a GPU twice"))
        elif inst.gpu_memory_fraction is not None:
            out.append(ConfigProblem(f"{at}.gpu_memory_fraction", "set but gpus is empty (CPU-only instance)"))
        if inst.health_path is not None and not inst.health_path.startswith("/"):
            out.append(ConfigProblem(f"{at}.health_path", "must start with /"))
        if inst.metrics_path is not None and not inst.metrics_path.startswith("/"):
            out.append(ConfigProblem(f"{at}.metrics_path", "must start with /"))
        out.extend(sizing_problems(inst, at))
    return out


def listen_port_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    return [
        ConfigProblem(f"$.instances[{i}].port", f"{inst.port} is the agent's own listen_port")
        for i, inst in enumerate(cfg.instances)
        if inst.port == cfg.agent.listen_port
    ]


def simulated_gpu_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    if cfg.gpu.source != "simulated":
        return []
    n_sim = len(cfg.gpu.simulated)
    return [
        ConfigProblem(f"$.instances[{i}].gpus", f"GPU {g} does not exist ({n_sim} simulated GPUs declared)")
        for i, inst in enumerate(cfg.instances)
        for g in inst.gpus
        if g >= n_sim
    ]


def sizing_problems(inst: InstanceConfig, at: str) -> list[ConfigProblem]:
    """Settings the agent maps to a server's own flags: supported by the backend, and not given
    a second time in ``args`` (which the server would read last-wins, silently)."""
    out = []
    flags = serverflags.FLAGS[inst.backend]
    fields: dict[str, tuple[serverflags.Setting, object]] = {
        "context_size": ("context_size", inst.context_size),
        "parallel": ("parallel", inst.parallel),
        "api_key_file": ("api_key", inst.api_key_file),
    }
    env_mapped = {"ollama": ("context_size", "parallel")}.get(inst.backend, ())
    for field, (setting, value) in fields.items():
        if value is None or setting in env_mapped:
            continue
        if setting == "api_key" and (inst.backend in serverflags.API_KEY_ENV or inst.backend == "command"):
            pass  # passed through the environment, or (command) only sent by the agent
        elif setting == "api_key" or setting not in flags:
            out.append(ConfigProblem(f"{at}.{field}", f"not supported by backend {inst.backend!r}"))
            continue
        names = flags.get(setting, ())
        if serverflags.given(inst.args, names):
            out.append(ConfigProblem(f"{at}.args", f"sets {'/'.join(names)} and so does {field}: give it once"))
    return out


def models_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    out = []
    backends = BACKENDS
    for backend, argv in cfg.models.launchers.items():
        if backend not in backends:
            known = ", ".join(backends)
            out.append(ConfigProblem(f"$.models.launchers.{backend}", f"unknown backend (one of {known})"))
        elif not argv:
            out.append(ConfigProblem(f"$.models.launchers.{backend}", "must not be empty"))
    for i, root in enumerate(cfg.models.allowed_roots):
        for problem in path_problems(root):
            out.append(ConfigProblem(f"$.models.allowed_roots[{i}]", problem))
    return out


def cluster_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    c = cfg.cluster
    out = c.problems("$.cluster")
    if not c.enabled:
        return out
    try:
        check_name("cluster", c.cluster)
    except InvalidName as e:
        out.append(ConfigProblem("$.cluster.cluster", str(e)))
    try:
        check_name("node", cfg.node_id)
    except InvalidName as e:
        out.append(ConfigProblem("$.agent.node_id", str(e)))
    # A keep-alive that fails must get two retries in before the lease runs out.
    budget = c.keepalive_s + 2 * c.timeout_s
    if budget > c.lease_ttl_s:
        out.append(
            ConfigProblem(
                "$.cluster.lease_ttl_s",
                f"keepalive interval {c.keepalive_s:g}s + 2 × timeout_s {c.timeout_s:g}s = {budget:g}s "
                f"exceeds the lease TTL {c.lease_ttl_s}s",
            )
        )
    return out


def proxy_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    out = []
    by_name = {i.name: i for i in cfg.instances}
    key = "routes" if cfg.proxy.routes is not None else "task_routes"  # as the file names them
    for j, route in enumerate(cfg.proxy.task_routes):
        for name in route.instances:
            inst = by_name.get(name)
            if inst is None:
                out.append(ConfigProblem(f"$.proxy.{key}[{j}].instances", f"no instance named {name!r}"))
            elif inst.client_model != route.model:
                out.append(
                    ConfigProblem(
                        f"$.proxy.{key}[{j}].instances",
                        f"{name!r} serves {inst.client_model!r}, not {route.model!r}",
                    )
                )
    if cfg.proxy.ttfb_timeout_s > cfg.proxy.total_timeout_s:
        out.append(ConfigProblem("$.proxy.ttfb_timeout_s", "must not exceed total_timeout_s"))
    if cfg.proxy.eject_max_s < cfg.proxy.eject_base_s:
        out.append(ConfigProblem("$.proxy.eject_max_s", "must be >= eject_base_s"))
    return out


def port_span_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    """Instances without an explicit port must fit the span (less the ports explicitly taken in
    it): caught here, check-config refuses the file before it is installed."""
    sup = cfg.supervisor
    span = range(sup.port_base, sup.port_base + sup.port_span)
    auto = [i.name for i in cfg.instances if i.port is None]
    taken = {i.port for i in cfg.instances if i.port in span} | ({cfg.agent.listen_port} & set(span))
    room = sup.port_span - len(taken)
    if len(auto) <= room:
        return []
    return [
        ConfigProblem(
            "$.supervisor.port_span",
            f"{len(auto)} instances have no explicit port but {span.start}..{span.stop - 1} has room for {room}",
        )
    ]


def memory_budget_problems(cfg: AgentConfig) -> list[ConfigProblem]:
    """The fractions planned on one GPU must fit the budget; name every instance involved."""
    per_gpu: dict[int, list[tuple[int, InstanceConfig]]] = {}
    for i, inst in enumerate(cfg.instances):
        if inst.gpu_memory_fraction is None:
            continue
        for g in inst.gpus:
            per_gpu.setdefault(g, []).append((i, inst))
    out = []
    for g, members in sorted(per_gpu.items()):
        total = sum(inst.gpu_memory_fraction or 0 for _, inst in members)
        if total > cfg.gpu.memory_budget + 1e-9:
            names = ", ".join(f"{inst.name} ({inst.gpu_memory_fraction:g})" for _, inst in members)
            out.append(
                ConfigProblem(
                    f"$.instances[{members[-1][0]}].gpu_memory_fraction",
                    f"GPU {g} over-committed: {names} sum to {total:.2f} > memory_budget {cfg.gpu.memory_budget:g}",
                )
            )
    return out


# Each cross-field rule and the sections it reads (validate skips it while one has a type error).
_RULES: tuple[tuple[frozenset[str], Callable[[AgentConfig], list[ConfigProblem]]], ...] = (
    (frozenset({"supervisor"}), supervisor_problems),
    (frozenset({"gpu"}), gpu_problems),
    (frozenset({"agent"}), agent_problems),
    (frozenset({"agent", "tls"}), tls_problems),
    (frozenset({"agent", "api"}), api_problems),
    (frozenset({"instances"}), instance_problems),
    (frozenset({"agent", "instances"}), listen_port_problems),
    (frozenset({"gpu", "instances"}), simulated_gpu_problems),
    (frozenset({"gpu", "instances"}), memory_budget_problems),
    (frozenset({"agent", "supervisor", "instances"}), port_span_problems),
    (frozenset({"proxy", "instances"}), proxy_problems),
    (frozenset({"agent", "cluster"}), cluster_problems),
    (frozenset({"models"}), models_problems),
    (frozenset({"agent", "cluster", "auth"}), lambda c: auth_problems(c.auth, c.agent.listen_host, c.cluster.enabled)),
)


__all__ = ["DEFAULT_CONFIG_PATH", "AgentConfig", "ConfigError", "InstanceConfig", "load_config"]
