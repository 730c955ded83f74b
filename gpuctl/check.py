"""``gpuctl check``: a production LLM gateway's go-live checklist (docs/sources.md, Clawdbot),
adapted to gpufleet.

Each check is one PASS / FAIL / SKIP line (SKIP: not applicable here, e.g. no systemd on the
machine running gpuctl); the command exits 1 on any FAIL. Gathering (etcd, HTTP, systemctl)
is separate from judging (``judge``, pure), so the rules are tested without a cluster.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl as ssl_
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec

from gpufleet.etcd import EtcdClient, EtcdError, Status
from gpufleet.facts import HOT_GPU_C
from gpufleet.gpuclasses import UNKNOWN
from gpufleet.keyspace import Keyspace, decode_or_skip
from gpufleet.keyspace.records import DegradationRecord, LeaderRecord, NodeRecord, RouteRecord, epoch_of
from gpufleet.routeslices import read_routes

AGENT_CONFIG = "/etc/gpu-agent/agent.toml"  # agent.config.DEFAULT_CONFIG_PATH
GPU_MEMORY_LIMIT = 0.85  # the checklist's nvidia-smi memory use <= 85 % (headroom for KV-cache growth)
GPU_TEMPERATURE_LIMIT_C = HOT_GPU_C  # above this the weight is capped at 30 %


class CheckResult(msgspec.Struct):
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str


@dataclass
class Facts:
    endpoints: list[str]
    statuses: dict[str, Status | str]  # endpoint -> Status or error text
    leader: LeaderRecord | None = None
    leader_epoch: int | None = None
    coordinator_ready: bool | None = None
    coordinator_metrics: bool | None = None
    nodes: list[NodeRecord] = field(default_factory=list)
    invalid_node_records: list[str] = field(default_factory=list)
    routes: list[RouteRecord] = field(default_factory=list)
    agent_metrics: dict[str, bool] = field(default_factory=dict)  # node -> /metrics answered with gpu_agent_*
    admin_protected: dict[str, bool | None] = field(default_factory=dict)  # node -> 401 (True), 403 (False)
    # node -> its OpenAI routes need an API key (401 without one: True; answered: False)
    keys_required: dict[str, bool | None] = field(default_factory=dict)
    watchdogs: dict[str, str | None] = field(default_factory=dict)  # unit -> WatchdogUSec, None: not installed
    degradation: DegradationRecord | None = None
    # This machine's agent admin token file: (errors, warnings); None: no agent config here.
    local_token_file: tuple[list[str], list[str]] | None = None


def judge(f: Facts) -> list[CheckResult]:
    """Every check, in the order printed: each rule judges one part of the facts."""
    return [result for rule in _RULES for result in rule(f)]


def _result(name: str, ok: bool | None, detail: str) -> CheckResult:
    """``ok`` None: the check does not apply here (SKIP)."""
    return CheckResult(name, "SKIP" if ok is None else ("PASS" if ok else "FAIL"), detail)


def _etcd_healthy(f: Facts) -> Iterator[CheckResult]:
    bad = {ep: s for ep, s in f.statuses.items() if isinstance(s, str) or s.leader == 0 or s.errors}
    yield _result(
        "etcd endpoints healthy, with a raft leader, no alarms",
        not bad and bool(f.statuses),
        "; ".join(
            f"{ep}: {s if isinstance(s, str) else ('no leader' if s.leader == 0 else ','.join(s.errors))}"
            for ep, s in bad.items()
        )
        or f"{len(f.statuses)} endpoints ok",
    )


def _etcd_tls(f: Facts) -> Iterator[CheckResult]:
    plain = [e for e in f.endpoints if not e.startswith("https://")]
    yield _result("etcd spoken to over TLS", not plain, f"plain http: {', '.join(plain)}" if plain else "all https")


def _coordinator_leads(f: Facts) -> Iterator[CheckResult]:
    yield _result(
        "a coordinator leads",
        f.leader is not None,
        f"{f.leader.coordinator} epoch {f.leader_epoch}" if f.leader else "no /leader key: no coordinator is leading",
    )
    if f.leader is not None:
        yield _result(
            "the leader's /readyz and /metrics answer",
            bool(f.coordinator_ready and f.coordinator_metrics),
            f"{f.leader.address}: readyz {'ok' if f.coordinator_ready else 'failed'}, "
            f"metrics {'ok' if f.coordinator_metrics else 'failed'}",
        )


def _agents_registered(f: Facts) -> Iterator[CheckResult]:
    yield _result("agents registered", bool(f.nodes), f"{len(f.nodes)} nodes" if f.nodes else "no node records")
    yield _result("node records valid", not f.invalid_node_records, ", ".join(f.invalid_node_records) or "all decode")


def _instances_ready(f: Facts) -> Iterator[CheckResult]:
    not_ready = [
        f"{n.node}: " + ", ".join(f"{i.name} {i.state}" for i in n.instances if i.state != "READY")
        for n in f.nodes
        if not n.ready
    ]
    yield _result("every instance READY", not not_ready and bool(f.nodes), "; ".join(not_ready) or "all READY")


def _gpu_memory(f: Facts) -> Iterator[CheckResult]:
    full = [
        f"{n.node} gpu {g.index} {g.memory_used_bytes / g.memory_total_bytes:.0%}"
        for n in f.nodes
        for g in n.gpus
        if g.memory_total_bytes
        and g.memory_used_bytes is not None
        and g.memory_used_bytes / g.memory_total_bytes > GPU_MEMORY_LIMIT
    ]
    yield _result(f"GPU memory at or below {GPU_MEMORY_LIMIT:.0%}", not full, "; ".join(full) or "ok")


def _gpu_temperature(f: Facts) -> Iterator[CheckResult]:
    hot = [
        f"{n.node} gpu {g.index} {g.temperature_celsius:.0f}°C"
        for n in f.nodes
        for g in n.gpus
        if g.temperature_celsius is not None and g.temperature_celsius > GPU_TEMPERATURE_LIMIT_C
    ]
    lost = [f"{n.node} gpu {g.index}" for n in f.nodes for g in n.gpus if g.lost]
    yield _result(
        f"no GPU lost or over {GPU_TEMPERATURE_LIMIT_C:.0f} °C", not hot and not lost, "; ".join(hot + lost) or "ok"
    )


def _gpu_classes(f: Facts) -> Iterator[CheckResult]:
    unknown = [f"{n.node} gpu {g.index} {g.name!r}" for n in f.nodes for g in n.gpus if g.gpu_class == UNKNOWN]
    yield _result(
        "every GPU of a known class (weighted by its own measure, not as a default)",
        not unknown,
        ("unknown: " + "; ".join(unknown) + " (agent [gpu] classes, coordinator [weights] base)") if unknown else "ok",
    )


def _failover_possible(f: Facts) -> Iterator[CheckResult]:
    single = [r.model for r in f.routes if sum(e.state == "READY" and e.weight > 0 for e in r.endpoints) < 2]
    yield _result(
        "every model has 2+ READY endpoints (failover possible)",
        bool(f.routes) and not single,
        ("models with fewer: " + ", ".join(single))
        if single
        else (f"{len(f.routes)} models" if f.routes else "no routes"),
    )


def _model_paths(f: Facts) -> Iterator[CheckResult]:
    registered = {m.model for n in f.nodes for m in n.models}
    unreadable = [f"{m.model} on {n.node}: {m.error}" for n in f.nodes for m in n.models if m.available is False]
    yield _result(
        "registered model paths readable on every node",
        None if not registered else not unreadable,
        "; ".join(unreadable) or (f"{len(registered)} models" if registered else "no models registered"),
    )


def _not_degraded(f: Facts) -> Iterator[CheckResult]:
    d = f.degradation
    yield _result(
        "cluster not degraded",
        d is None or d.level == 0,
        "level 0"
        if d is None or d.level == 0
        else f"level {d.level}: error rate {d.error_rate:.1%} ({d.samples} attempts)",
    )


def _agent_endpoints(f: Facts) -> Iterator[CheckResult]:
    silent = sorted(n for n, ok in f.agent_metrics.items() if not ok)
    yield _result("agents' /metrics answer", bool(f.agent_metrics) and not silent, ", ".join(silent) or "all answer")
    open_admin = sorted(n for n, p in f.admin_protected.items() if p is not True)
    yield _result(
        "agents' admin API protected by a token",
        bool(f.admin_protected) and not open_admin,
        ("no token file (admin disabled) or unreachable: " + ", ".join(open_admin))
        if open_admin
        else "401 without token",
    )


def _keys_required(f: Facts) -> Iterator[CheckResult]:
    """An agent that answers /v1/models without a key lets anyone who reaches it use the GPUs
    ([auth] mode = "open", or the default on a loopback listen address)."""
    open_ = sorted(n for n, required in f.keys_required.items() if required is False)
    yield _result(
        "agents' OpenAI routes need an API key",
        None if not f.keys_required else not open_,
        ('open ([auth] mode = "open"): ' + ", ".join(open_)) if open_ else "401 without a key",
    )


def _local_token_file(f: Facts) -> Iterator[CheckResult]:
    if f.local_token_file is not None:  # an agent is configured on this machine
        problems = f.local_token_file[0] + f.local_token_file[1]
        yield _result("admin token file readable by the agent only", not problems, "; ".join(problems) or "ok")


def _watchdogs(f: Facts) -> Iterator[CheckResult]:
    for unit, usec in sorted(f.watchdogs.items()):
        if usec is None:
            yield _result(f"{unit} watchdog active", None, "unit not installed on this machine")
        else:
            yield _result(f"{unit} watchdog active", usec not in ("0", "infinity", ""), f"WatchdogUSec={usec}")


# The order in which the checks are printed.
_RULES: tuple[Callable[[Facts], Iterator[CheckResult]], ...] = (
    _etcd_healthy,
    _etcd_tls,
    _coordinator_leads,
    _agents_registered,
    _instances_ready,
    _gpu_memory,
    _gpu_temperature,
    _gpu_classes,
    _failover_possible,
    _model_paths,
    _not_degraded,
    _agent_endpoints,
    _keys_required,
    _local_token_file,
    _watchdogs,
)


async def gather(
    etcd: EtcdClient,
    keys: Keyspace,
    endpoints: list[str],
    ssl: ssl_.SSLContext | bool = True,
    token: str | None = None,
) -> Facts:
    """``ssl``: how https:// agents and coordinators are verified; ``token``: sent to their
    /metrics (``[api] status_access = "token"``)."""
    f = Facts(endpoints=endpoints, statuses={})
    for ep in endpoints:
        try:
            f.statuses[ep] = await etcd.status(endpoint=ep, timeout=3)
        except EtcdError as e:
            f.statuses[ep] = str(e)
    kv = await etcd.get(keys.leader)
    if kv is not None:
        f.leader = decode_or_skip(kv.key_str, kv.value, LeaderRecord, kv.mod_revision)
        f.leader_epoch = epoch_of(f.leader, kv.create_revision)
    for kv in (await etcd.get_prefix(keys.nodes)).kvs:
        rec = decode_or_skip(kv.key_str, kv.value, NodeRecord, kv.mod_revision)
        if rec is None:
            f.invalid_node_records.append(kv.key_str)
        else:
            f.nodes.append(rec)
    kv = await etcd.get(keys.degradation)
    if kv is not None:
        f.degradation = decode_or_skip(kv.key_str, kv.value, DegradationRecord, kv.mod_revision)
    f.routes = list((await read_routes(etcd, keys)).values())
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(ssl=ssl)) as http:

        async def status_of(method: str, url: str, needle: str = "") -> int:
            # The token goes to the status pages only: the admin and OpenAI probes must see
            # what a caller without credentials sees.
            headers = {"Authorization": f"Bearer {token}"} if token and url.endswith("/metrics") else {}
            try:
                async with http.request(method, url, headers=headers) as r:
                    text = await r.text()
                    return r.status if needle in text else -1
            except (aiohttp.ClientError, TimeoutError, OSError):
                return 0

        if f.leader is not None and f.leader.address:
            base = f.leader.address.rstrip("/")
            f.coordinator_ready = await status_of("GET", base + "/readyz") == 200
            f.coordinator_metrics = await status_of("GET", base + "/metrics", "gpu_coordinator_is_leader") == 200

        async def probe_agent(n: NodeRecord) -> None:
            base = n.address.rstrip("/")
            f.agent_metrics[n.node] = await status_of("GET", base + "/metrics", "gpu_agent_") == 200
            code = await status_of("POST", base + "/admin/reload")
            f.admin_protected[n.node] = True if code == 401 else (False if code == 403 else None)
            code = await status_of("GET", base + "/v1/models")
            f.keys_required[n.node] = True if code == 401 else (False if code == 200 else None)

        await asyncio.gather(*(probe_agent(n) for n in f.nodes))
    for unit in ("gpu-agent.service", "gpu-coordinator.service"):
        f.watchdogs[unit] = _watchdog_usec(unit)
    f.local_token_file = local_token_file()
    return f


def local_token_file(config: str = AGENT_CONFIG) -> tuple[list[str], list[str]] | None:
    """Problems with the admin token file of the agent configured on this machine, if any."""
    from gpufleet.tokenfile import token_file_problems

    try:
        with open(config, "rb") as fh:
            section = tomllib.load(fh).get("agent", {})
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as e:
        return [f"cannot read {config}: {e}"], []
    path = section.get("admin_token_file") if isinstance(section, dict) else None
    if not isinstance(path, str):
        return [], []
    return token_file_problems(str(Path(config).parent / path))


def _watchdog_usec(unit: str) -> str | None:
    """WatchdogUSec of an installed unit on this machine; None when systemd or the unit is absent."""
    if shutil.which("systemctl") is None:
        return None
    try:
        res = subprocess.run(
            ["systemctl", "show", unit, "-p", "LoadState,WatchdogUSec"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    props = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    if res.returncode != 0 or props.get("LoadState") != "loaded":
        return None
    return props.get("WatchdogUSec", "")
