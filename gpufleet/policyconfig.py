"""Cluster policy: the coordinator settings every replica must agree on, kept in etcd.

``[health]``, ``[weights]``, ``[failover]``, ``[placement]`` and ``[degradation]`` decide what
the leader does; if each coordinator read them from its own file, two replicas could apply
different policies and a leader change would silently switch policy. So they live in one
record, ``/gpufleet/<cluster>/config`` (``ClusterPolicy``), as Patroni keeps its dynamic
configuration in the DCS. A coordinator's file still holds them: they are the bootstrap
default, written to etcd by the first leader when the key is absent. Identity, listen address,
election timing and etcd settings stay local (``coordinator/config.py``).

This module is the library's: ``coordinator/config.py`` and ``gpuctl config`` validate with the
same Structs, and the library imports nothing of the coordinator.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from gpufleet import tomlwrite
from gpufleet.gpuclasses import BASE_WEIGHTS
from gpufleet.tomlconfig import ConfigProblem, NonNegFloat, PositiveFloat, StrictSection, problem_from_validation

POLICY_SCHEMA_VERSION = 1


class HealthSection(StrictSection):
    """How the leader judges nodes and instances from their records (coordinator/policy/health.py):
    a node goes READY -> DEGRADED after ``bad_samples`` bad samples in a row and back after
    ``good_samples`` good ones; an instance that leaves READY is ejected (Envoy's outlier ejection)."""

    # Consecutive bad samples (one per sample_interval_s) that take a READY node to DEGRADED. A
    # sample is bad when the node's telemetry is stale, a GPU is lost or one is over temp_limit_c.
    bad_samples: Annotated[int, Meta(ge=1)] = 3
    good_samples: Annotated[int, Meta(ge=1)] = 3  # consecutive good samples that take it back to READY
    # A node record unchanged for this long is stale (agents rewrite theirs at least every
    # publish_interval_s, 30 s by default), measured on the leader's own clock.
    stale_after_s: PositiveFloat = 90.0
    temp_limit_c: float = 90.0  # a GPU hotter than this makes the sample bad
    # The n-th ejection of an instance keeps it out of the routes for min(eject_base_s × n,
    # eject_max_s), even if its agent says READY sooner: a flapping instance stays out longer each time.
    eject_base_s: NonNegFloat = 30.0
    eject_max_s: NonNegFloat = 300.0
    eject_forget_after_s: NonNegFloat = 300.0  # n starts over after this long READY


class WeightsSection(StrictSection):
    """Each endpoint's weight is its GPU class's base weight × load, temperature and health
    factors (coordinator/policy/weights.py); this section sets the base weights."""

    # Replaces the built-in table (gpufleet/gpuclasses.py: A10 100, A100 220, H100 380 as the
    # Clawdbot article measured them, and every other known class by memory bandwidth) when set.
    base: dict[str, Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=lambda: dict(BASE_WEIGHTS))
    default_base: Annotated[int, Meta(ge=0)] = 100  # base of a class the table does not name
    # A route slice is rewritten for a weight that moved by more than this share of itself
    # (every agent following the model receives each write); smaller moves add up until one
    # does. 0: write every change.
    min_weight_change: Annotated[float, Meta(ge=0, lt=1)] = 0.05
    # A weight that moved by more than this share of itself (a GPU crossing 85 °C: capped to
    # 30 % of its base), a weight to or from 0 and every state change are written at once.
    # Smaller moves (load drifting) go out with the slice's next write, or weight_drift_interval_s
    # after its last one at the latest: across a fleet every slice drifts all the time. The
    # default is twice the agents' telemetry gap (telemetry_min_gap_s, 15 s): weights follow
    # slow trends, and the proxies' least_loaded choice follows load as it happens.
    urgent_weight_change: Annotated[float, Meta(ge=0, le=1)] = 0.25
    weight_drift_interval_s: Annotated[float, Meta(ge=0, le=300)] = 30.0


class FailoverSection(StrictSection):
    """Where a model's traffic may go when its endpoints fail (coordinator/policy/routes.py)."""

    # May proxies send a model's traffic to endpoints of another GPU class (A100 -> H100)?
    cross_class: bool = False
    # Panic mode (Envoy's): when more than this share of a GPU class's nodes look unhealthy, the
    # culprit is more likely the checker than the GPUs: the class's endpoints that their agents
    # report READY are routed anyway, and an alert is raised. 1: never.
    panic_threshold: Annotated[float, Meta(gt=0, le=1)] = 0.5


class PlacementSection(StrictSection):
    """Placement of the replicas of registered models (``gpuctl models``) on nodes by the leader."""

    enabled: bool = True  # false: the leader makes no placement passes (replicas placed stay where they are)
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
    """The cluster's degradation level (coordinator/policy/degradation.py), from the
    cluster-wide upstream error rate that the agents' proxies report."""

    enabled: bool = True  # false: the leader neither computes nor writes the level
    # Error rates at which levels 1 (response cache), 2 (fallback model), 3 (static answer) start.
    thresholds: list[Annotated[float, Meta(gt=0, le=1)]] = msgspec.field(default_factory=lambda: [0.05, 0.15, 0.30])
    window_s: PositiveFloat = 60.0  # the error rate is measured over this sliding window
    # Fewer upstream attempts than this in the window is no evidence: the level is not raised.
    min_samples: Annotated[int, Meta(ge=1)] = 50
    # The level goes down only once the rate is this far below the level's threshold ...
    hysteresis: Annotated[float, Meta(ge=0, lt=1)] = 0.02
    min_hold_s: NonNegFloat = 30.0  # ... and one level per min_hold_s at most (going up is immediate)
    # The record is rewritten at least this often, so agents can tell a live level from the
    # last word of a coordinator that is gone (they ignore one older than 90 s).
    refresh_s: Annotated[float, Meta(gt=0, le=60)] = 30.0


# The policy sections, in the order they are shown.
SECTIONS: dict[str, type[StrictSection]] = {
    "health": HealthSection,
    "weights": WeightsSection,
    "failover": FailoverSection,
    "placement": PlacementSection,
    "degradation": DegradationSection,
}


class ClusterPolicy(msgspec.Struct, kw_only=True):
    """``/gpufleet/<cluster>/config``. Unlike other records, unknown fields are refused: a
    policy field this version does not know would be silently not applied."""

    schema: int = POLICY_SCHEMA_VERSION
    health: HealthSection = msgspec.field(default_factory=HealthSection)
    weights: WeightsSection = msgspec.field(default_factory=WeightsSection)
    failover: FailoverSection = msgspec.field(default_factory=FailoverSection)
    placement: PlacementSection = msgspec.field(default_factory=PlacementSection)
    degradation: DegradationSection = msgspec.field(default_factory=DegradationSection)
    # Who wrote this version and when (for `gpuctl config history`); not policy.
    updated_by: str = ""
    updated_at: float = 0.0


class InvalidPolicy(ValueError):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))
        self.problems = problems


def policy_problems(p: ClusterPolicy, prefix: str = "$") -> list[ConfigProblem]:
    """Cross-field rules the Structs cannot express (the same in a file and in etcd)."""
    out = []
    d = p.degradation
    t = d.thresholds
    if len(t) != 3 or not t[0] < t[1] < t[2]:
        out.append(
            ConfigProblem(f"{prefix}.degradation.thresholds", "must be 3 rates, strictly increasing (levels 1, 2, 3)")
        )
    elif d.hysteresis >= t[0]:
        out.append(ConfigProblem(f"{prefix}.degradation.hysteresis", f"must be below the first threshold ({t[0]:g})"))
    return out


def from_sections(parts: dict[str, Any]) -> ClusterPolicy:
    """The policy held by a config file's converted sections."""
    return ClusterPolicy(**{name: parts[name] for name in SECTIONS if name in parts})


def policy_from_builtins(data: Any) -> ClusterPolicy:
    """Convert and validate a plain document (parsed TOML or JSON); raises InvalidPolicy with
    every problem found, each with its field path."""
    if not isinstance(data, dict):
        raise InvalidPolicy([ConfigProblem("$", "expected a table of policy sections")])
    problems: list[ConfigProblem] = []
    parts: dict[str, Any] = {}
    for key in data:
        if key not in SECTIONS and key not in ("schema", "updated_by", "updated_at"):
            problems.append(ConfigProblem(f"$.{key}", f"unknown section (policy sections: {', '.join(SECTIONS)})"))
    for name, typ in SECTIONS.items():
        try:
            parts[name] = msgspec.convert(data.get(name, {}), typ, strict=True)
        except msgspec.ValidationError as e:
            problems.append(_field_problem(problem_from_validation(e, f"$.{name}")))
    schema = data.get("schema", POLICY_SCHEMA_VERSION)
    if schema != POLICY_SCHEMA_VERSION:
        problems.append(
            ConfigProblem("$.schema", f"unsupported schema {schema!r} (this version reads {POLICY_SCHEMA_VERSION})")
        )
    if problems:
        raise InvalidPolicy(problems)
    policy = ClusterPolicy(
        **parts,
        updated_by=str(data.get("updated_by", "")),
        updated_at=float(data.get("updated_at", 0.0) or 0.0),
    )
    if problems := policy_problems(policy):
        raise InvalidPolicy(problems)
    return policy


def _field_problem(p: ConfigProblem) -> ConfigProblem:
    """msgspec names the table of an unknown field; the field's own path is more useful."""
    m = re.fullmatch(r"Object contains unknown field `([^`]*)`", p.message)
    return ConfigProblem(f"{p.path}.{m.group(1)}", "unknown field") if m else p


def decode_policy(value: bytes) -> ClusterPolicy:
    """The etcd value; raises InvalidPolicy (not JSON, wrong types, cross-field rules)."""
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidPolicy([ConfigProblem("$", f"not JSON: {e}")]) from None
    return policy_from_builtins(data)


def encode_policy(p: ClusterPolicy) -> bytes:
    return msgspec.json.encode(p)


def settings(p: ClusterPolicy) -> dict[str, Any]:
    """The policy sections as plain data (no schema, no authorship)."""
    return {name: msgspec.to_builtins(getattr(p, name)) for name in SECTIONS}


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def diff(old: ClusterPolicy, new: ClusterPolicy) -> list[str]:
    """What changed, one ``section.field: old -> new`` per field (``-`` for absent)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten("", settings(old), a)
    _flatten("", settings(new), b)
    out = []
    for k in sorted(a.keys() | b.keys()):
        if a.get(k, None) != b.get(k, None):
            out.append(f"{k}: {_show(a[k]) if k in a else '-'} -> {_show(b[k]) if k in b else '-'}")
    return out


def differing_sections(old: ClusterPolicy, new: ClusterPolicy) -> list[str]:
    s_old, s_new = settings(old), settings(new)
    return [name for name in SECTIONS if s_old[name] != s_new[name]]


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str | list | bool) else f"{v:g}" if isinstance(v, float) else str(v)


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``SECTION.FIELD=VALUE`` (``weights.base.A100=250`` for a key of a table) -> (path,
    value). VALUE is a TOML value (``true``, ``0.5``, ``[0.1, 0.2, 0.4]``, ``"x"``); a bare
    word is taken as a string. Raises ValueError."""
    key, sep, raw = text.partition("=")
    path = [p.strip() for p in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ValueError(f"{text!r}: expected SECTION.FIELD=VALUE (e.g. health.eject_base_s=10)")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def with_assignments(p: ClusterPolicy, assignments: Iterable[tuple[list[str], Any]]) -> ClusterPolicy:
    """``p`` with the given fields set, validated as a whole; raises InvalidPolicy (each
    problem with its field path, e.g. ``$.health.eject_base_s``)."""
    doc: dict[str, Any] = settings(p)
    problems = []
    for path, value in assignments:
        if path[0] not in SECTIONS:
            problems.append(
                ConfigProblem(
                    "$." + ".".join(path), f"unknown section {path[0]!r} (policy sections: {', '.join(SECTIONS)})"
                )
            )
            continue
        node = doc
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    if problems:
        raise InvalidPolicy(problems)
    return policy_from_builtins(doc)


def to_toml(p: ClusterPolicy) -> str:
    """The policy sections as TOML, what a coordinator file holds (for `gpuctl config show|edit`)."""
    return tomlwrite.dumps(settings(p))
