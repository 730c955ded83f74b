"""gpu-coordinator configuration: TOML -> msgspec Structs; every problem reported by path.

[coordinator]  id, listen address, logging
[etcd]         endpoints, cluster, TLS, auth (shared EtcdSettings)
[election]     lease TTL, renew deadline, retry period, grace period of a new leader
[health]       samples, staleness, temperature limit, ejection
[weights]      base weight per GPU class, default for unknown classes
[failover]     cross-class failover, panic threshold
[placement]    rescheduling of replicas of registered models
[degradation]  error-rate window and thresholds of the 3 degradation levels
[api]          the HTTP listener's read timeouts and connection limit (gpufleet/httpserver.py)
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from gpufleet.etcdconfig import EtcdSettings
from gpufleet.gpuclasses import BASE_WEIGHTS
from gpufleet.httpserver import ApiSection
from gpufleet.keyspace import InvalidName, check_name
from gpufleet.tomlconfig import (
    ConfigError,
    ConfigProblem,
    LogFormat,
    LogLevel,
    NonNegFloat,
    Port,
    PositiveFloat,
    StrictSection,
    load_sections,
)

DEFAULT_CONFIG_PATH = "/etc/gpu-coordinator/coordinator.toml"


class CoordinatorSection(StrictSection):
    id: str | None = None  # default: the host name
    listen_host: str = "127.0.0.1"
    listen_port: Port = 8090
    advertise_url: str | None = None
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"
    # How often the leader samples node health (stale telemetry, temperature); changes in node
    # records (instance states, nodes gone) are acted on as they arrive.
    sample_interval_s: PositiveFloat = 5.0


class ElectionSection(StrictSection):
    # Kubernetes' leader election: 15 s lease, 10 s renew deadline, 2 s retry period. The leader
    # stops acting as leader when it could not renew for renew_deadline_s, before anyone else can
    # take over (only after lease_ttl_s).
    lease_ttl_s: Annotated[int, Meta(ge=2, le=300)] = 15
    renew_deadline_s: PositiveFloat = 10.0
    retry_period_s: PositiveFloat = 2.0
    # A new leader syncs all state, then waits this long before failover decisions, so agents
    # that were mid-re-registration are not declared DOWN by a leader that just woke up.
    grace_s: NonNegFloat = 10.0


class HealthSection(StrictSection):
    bad_samples: Annotated[int, Meta(ge=1)] = 3
    good_samples: Annotated[int, Meta(ge=1)] = 3
    stale_after_s: PositiveFloat = 90.0
    temp_limit_c: float = 90.0
    eject_base_s: NonNegFloat = 30.0
    eject_max_s: NonNegFloat = 300.0
    eject_forget_after_s: NonNegFloat = 300.0


class WeightsSection(StrictSection):
    # Replaces the built-in table (gpufleet/gpuclasses.py: article 001's A10 100, A100 220,
    # H100 380, and every other known class by memory bandwidth) when set.
    base: dict[str, Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=lambda: dict(BASE_WEIGHTS))
    default_base: Annotated[int, Meta(ge=0)] = 100


class FailoverSection(StrictSection):
    cross_class: bool = False
    panic_threshold: Annotated[float, Meta(gt=0, le=1)] = 0.5


class PlacementSection(StrictSection):
    enabled: bool = True
    # Replicas on a node that went DOWN are placed elsewhere after this long: a node that
    # restarts (agent upgrade, reboot of the agent) gets them back without a reload elsewhere.
    reschedule_after_s: NonNegFloat = 30.0
    # Placement runs at most this often (at once when the registry changes): a pass over 10,000
    # nodes with many models costs seconds of CPU (docs/benchmarks.md), the route table must
    # not wait for it, and nothing in placement needs sub-second reactions.
    interval_s: PositiveFloat = 2.0
    # Sum of gpu_memory_fraction on one GPU may not exceed this (same as the agent's budget).
    memory_budget: Annotated[float, Meta(gt=0, le=1)] = 0.95


class DegradationSection(StrictSection):
    enabled: bool = True
    # Error rates at which levels 1 (response cache), 2 (fallback model), 3 (static answer) start.
    thresholds: list[Annotated[float, Meta(gt=0, le=1)]] = msgspec.field(default_factory=lambda: [0.05, 0.15, 0.30])
    window_s: PositiveFloat = 60.0
    min_samples: Annotated[int, Meta(ge=1)] = 50
    hysteresis: Annotated[float, Meta(ge=0, lt=1)] = 0.02
    min_hold_s: NonNegFloat = 30.0
    # The record is rewritten at least this often, so agents can tell a live level from the
    # last word of a coordinator that is gone (they ignore one older than 90 s).
    refresh_s: Annotated[float, Meta(gt=0, le=60)] = 30.0


class CoordinatorConfig(msgspec.Struct, kw_only=True):
    coordinator: CoordinatorSection
    etcd: EtcdSettings
    election: ElectionSection
    health: HealthSection
    weights: WeightsSection
    failover: FailoverSection
    placement: PlacementSection = msgspec.field(default_factory=PlacementSection)
    degradation: DegradationSection = msgspec.field(default_factory=DegradationSection)
    api: ApiSection = msgspec.field(default_factory=ApiSection)
    source_path: str = ""

    @property
    def id(self) -> str:
        return self.coordinator.id or socket.gethostname()

    @property
    def advertise_url(self) -> str:
        c = self.coordinator
        return c.advertise_url or f"http://{self.id}:{c.listen_port}"


def load_config(path: str | Path) -> CoordinatorConfig:
    path = Path(path)
    parts = load_sections(
        path,
        sections={
            "coordinator": CoordinatorSection,
            "etcd": EtcdSettings,
            "election": ElectionSection,
            "health": HealthSection,
            "weights": WeightsSection,
            "failover": FailoverSection,
            "placement": PlacementSection,
            "degradation": DegradationSection,
            "api": ApiSection,
        },
        lists={},
    )
    cfg = CoordinatorConfig(**parts, source_path=str(path))
    cfg.etcd.resolve(path.parent)
    problems = validate(cfg)
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def validate(cfg: CoordinatorConfig) -> list[ConfigProblem]:
    out = cfg.etcd.problems("$.etcd")
    if not cfg.etcd.endpoints:
        out.append(ConfigProblem("$.etcd.endpoints", "required: the coordinator lives in etcd"))
    names = (("$.etcd.cluster", "cluster", cfg.etcd.cluster), ("$.coordinator.id", "coordinator", cfg.id))
    for at, kind, name in names:
        try:
            check_name(kind, name)
        except InvalidName as e:
            out.append(ConfigProblem(at, str(e)))
    d = cfg.degradation
    t = d.thresholds
    if len(t) != 3 or not t[0] < t[1] < t[2]:
        out.append(ConfigProblem("$.degradation.thresholds", "must be 3 rates, strictly increasing (levels 1, 2, 3)"))
    elif d.hysteresis >= t[0]:
        out.append(ConfigProblem("$.degradation.hysteresis", f"must be below the first threshold ({t[0]:g})"))
    e = cfg.election
    if e.renew_deadline_s >= e.lease_ttl_s:
        out.append(
            ConfigProblem(
                "$.election.renew_deadline_s",
                f"must be shorter than lease_ttl_s ({e.lease_ttl_s}s): a leader must step down before its lease "
                "can expire and another take over",
            )
        )
    if e.retry_period_s + cfg.etcd.timeout_s > e.renew_deadline_s:
        out.append(
            ConfigProblem(
                "$.election.retry_period_s",
                "retry_period_s + etcd.timeout_s must fit in renew_deadline_s (at least one renewal attempt)",
            )
        )
    return out
