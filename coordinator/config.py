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
[api]          the HTTP listener's read timeouts and connection limit (gpufleet/httpserver.py),
               who may read /v1/status and /metrics
[tls]          HTTPS on the API port (gpufleet/tlsconfig.py, the agent's section)
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

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
from gpufleet.tlsconfig import TlsSection
from gpufleet.tomlconfig import (
    ConfigError,
    ConfigProblem,
    LogFormat,
    LogLevel,
    NonNegFloat,
    Port,
    PositiveFloat,
    StrictSection,
    convert_sections,
    is_loopback,
    load_document,
    url_problem,
)

# [health] [weights] [failover] [placement] [degradation]: the cluster's policy. This file's
# values only bootstrap /gpufleet/<cluster>/config; afterwards `gpuctl config` edits it there.
POLICY_SECTIONS = ("health", "weights", "failover", "placement", "degradation")

DEFAULT_CONFIG_PATH = "/etc/gpu-coordinator/coordinator.toml"


class CoordinatorSection(StrictSection):
    """This replica: its identity, the API listener, logging."""

    id: str | None = None  # default: the host name; each replica needs a distinct one
    # The API (/healthz, /readyz, /metrics, /v1/status). Other hosts (gpuctl, a metrics scraper)
    # reach the leader's: a loopback address is warned of.
    listen_host: str = "127.0.0.1"
    listen_port: Port = 8090
    # The URL the leader publishes in its leader key, where gpuctl reaches it; default
    # http://<id>:<listen_port>
    advertise_url: str | None = None
    log_format: LogFormat = "auto"  # auto: text on a terminal, JSON lines otherwise (journald)
    log_level: LogLevel = "info"
    # How often the leader samples node health (stale telemetry, temperature); changes in node
    # records (instance states, nodes gone) are acted on as they arrive.
    sample_interval_s: PositiveFloat = 5.0
    # A file holding the bearer token (16+ characters, mode 0600) of the dashboard's drain and
    # undrain buttons (/ui); it also opens what the status token opens. None: the dashboard is
    # read-only (drain with gpuctl drain).
    admin_token_file: str | None = None


class ElectionSection(StrictSection):
    """Leader election through an etcd lease, with Kubernetes' defaults (15 s lease, 10 s renew
    deadline, 2 s retry period)."""

    # Another replica can take over this long after the leader's last renewal.
    lease_ttl_s: Annotated[int, Meta(ge=2, le=300)] = 15
    # The leader stops acting as leader when it could not renew for this long: before anyone else
    # can take over (only after lease_ttl_s). Must be shorter than lease_ttl_s.
    renew_deadline_s: PositiveFloat = 10.0
    retry_period_s: PositiveFloat = 2.0  # how often the leader renews and the others try to acquire
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
    tls: TlsSection = msgspec.field(default_factory=TlsSection)  # HTTPS on the API port
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
        return c.advertise_url or f"{self.tls.scheme}://{self.id}:{c.listen_port}"


SECTIONS: dict[str, type] = {
    "coordinator": CoordinatorSection,
    "etcd": EtcdSettings,
    "election": ElectionSection,
    "health": HealthSection,
    "weights": WeightsSection,
    "failover": FailoverSection,
    "placement": PlacementSection,
    "degradation": DegradationSection,
    "api": ApiSection,
    "tls": TlsSection,
}


def load_config(path: str | Path) -> CoordinatorConfig:
    """Parse and validate; raises ConfigError listing every problem found.

    Type errors and cross-field problems come together: the cross-field rules run on the
    sections that decoded (a section with a type error takes its defaults for the build, and
    the rules that read it are skipped, as in the agent's config)."""
    path = Path(path)
    problems: list[ConfigProblem] = []
    parts = convert_sections(load_document(path), SECTIONS, {}, problems)
    cfg = CoordinatorConfig(
        **{name: parts[name] if name in parts else typ() for name, typ in SECTIONS.items()},
        source_path=str(path),
    )
    cfg.etcd.resolve(path.parent)
    if cfg.coordinator.admin_token_file and not Path(cfg.coordinator.admin_token_file).is_absolute():
        cfg.coordinator.admin_token_file = str((path.parent / cfg.coordinator.admin_token_file).resolve())
    cfg.api.resolve(path.parent)
    cfg.tls.resolve(path.parent)
    problems.extend(validate(cfg, set(parts)))
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def validate(cfg: CoordinatorConfig, decoded: Collection[str] | None = None) -> list[ConfigProblem]:
    """Cross-field rules that a type cannot express. Pure: no I/O.

    ``decoded`` names the sections that decoded without a type error (default: all); a rule
    that reads a section with a type error is skipped, since its verdict would rest on defaults."""
    out: list[ConfigProblem] = []
    for needs, rule in _RULES:
        if decoded is None or needs <= set(decoded):
            out.extend(rule(cfg))
    return out


def etcd_problems(cfg: CoordinatorConfig) -> list[ConfigProblem]:
    out = cfg.etcd.problems("$.etcd")
    if not cfg.etcd.endpoints:
        out.append(ConfigProblem("$.etcd.endpoints", "required: the coordinator lives in etcd"))
    try:
        check_name("cluster", cfg.etcd.cluster)
    except InvalidName as e:
        out.append(ConfigProblem("$.etcd.cluster", str(e)))
    return out


def coordinator_problems(cfg: CoordinatorConfig) -> list[ConfigProblem]:
    out = []
    try:
        check_name("coordinator", cfg.id)
    except InvalidName as e:
        out.append(ConfigProblem("$.coordinator.id", str(e)))
    # The leader publishes this URL in its leader key and gpuctl status|check reach its API
    # there: a typo would surface only when someone needs the leader.
    if cfg.coordinator.advertise_url is not None and (problem := url_problem(cfg.coordinator.advertise_url)):
        out.append(ConfigProblem("$.coordinator.advertise_url", problem))
    return out


def election_problems(cfg: CoordinatorConfig) -> list[ConfigProblem]:
    out = []
    e = cfg.election
    if e.renew_deadline_s >= e.lease_ttl_s:
        out.append(
            ConfigProblem(
                "$.election.renew_deadline_s",
                f"must be shorter than lease_ttl_s ({e.lease_ttl_s}s): a leader must step down before its lease "
                "can expire and another take over",
            )
        )
    return out


def election_timing_problems(cfg: CoordinatorConfig) -> list[ConfigProblem]:
    e = cfg.election
    if e.retry_period_s + cfg.etcd.timeout_s > e.renew_deadline_s:
        return [
            ConfigProblem(
                "$.election.retry_period_s",
                "retry_period_s + etcd.timeout_s must fit in renew_deadline_s (at least one renewal attempt)",
            )
        ]
    return []


def tls_problems(cfg: CoordinatorConfig) -> list[ConfigProblem]:
    return cfg.tls.problems("$.tls") + cfg.tls.advertise_problems(
        cfg.coordinator.advertise_url, "$.coordinator.advertise_url"
    )


def degradation_problems(cfg: CoordinatorConfig) -> list[ConfigProblem]:
    return policy_problems(cfg.policy)  # the same rules gpuctl config applies to the policy in etcd


# Each cross-field rule and the sections it reads (validate skips it while one has a type error).
_RULES: tuple[tuple[frozenset[str], Callable[[CoordinatorConfig], list[ConfigProblem]]], ...] = (
    (frozenset({"etcd"}), etcd_problems),
    (frozenset({"coordinator"}), coordinator_problems),
    (frozenset({"election"}), election_problems),
    (frozenset({"election", "etcd"}), election_timing_problems),
    (frozenset({"degradation"}), degradation_problems),
    (frozenset({"coordinator", "tls"}), tls_problems),
    (frozenset({"api"}), lambda c: c.api.problems("$.api")),
)


def config_warnings(cfg: CoordinatorConfig) -> list[ConfigProblem]:
    """Legal but probably a mistake: said by check-config and at start-up, never refused."""
    out = []
    c = cfg.coordinator
    if is_loopback(c.listen_host):
        advertised = urlsplit(cfg.advertise_url).hostname or ""
        if c.advertise_url is None or is_loopback(advertised):
            out.append(
                ConfigProblem(
                    "$.coordinator.listen_host",
                    f"{c.listen_host} is a loopback address: gpuctl on other hosts and metrics scrapers cannot "
                    f"reach this coordinator at {cfg.advertise_url}, the address it publishes when it leads "
                    "(only processes on this host can); listen on 0.0.0.0 or this host's address, or set "
                    "advertise_url to a proxy in front of it",
                )
            )
    elif c.advertise_url is not None and is_loopback(urlsplit(c.advertise_url).hostname or ""):
        out.append(
            ConfigProblem(
                "$.coordinator.advertise_url",
                f"{c.advertise_url} is a loopback address: other hosts would reach themselves, not this "
                "coordinator; advertise this host's name or address",
            )
        )
    return out
