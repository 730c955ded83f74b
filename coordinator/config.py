"""gpu-coordinator configuration: TOML -> msgspec Structs; every problem reported by path.

[coordinator]  id, listen address, logging
[etcd]         endpoints, cluster, TLS, auth (shared EtcdSettings)
[election]     lease TTL, renew deadline, retry period, grace period of a new leader
The five policy sections below (Structs in gpufleet/policyconfig.py) are the cluster's policy:
it lives in etcd at /gpufleet/<cluster>/config; this file's values are only its bootstrap default.
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
from gpufleet.httpserver import ApiSection
from gpufleet.keyspace import InvalidName, check_name
from gpufleet.policyconfig import (
    ClusterPolicy,
    DegradationSection,
    FailoverSection,
    HealthSection,
    PlacementSection,
    WeightsSection,
    from_sections,
    policy_problems,
)
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

# [health] [weights] [failover] [placement] [degradation]: the cluster's policy. This file's
# values only bootstrap /gpufleet/<cluster>/config; afterwards `gpuctl config` edits it there.
POLICY_SECTIONS = ("health", "weights", "failover", "placement", "degradation")

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
    def policy(self) -> ClusterPolicy:
        """This file's policy sections: the bootstrap default of the cluster's policy, which
        lives in etcd (gpufleet/policyconfig.py); the leader applies the cluster's."""
        return from_sections({name: getattr(self, name) for name in POLICY_SECTIONS})

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
    out += policy_problems(cfg.policy)
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
