"""The leader's view of node and instance health, as pure transitions (old, inputs) → new.

Nodes::

    READY --bad_samples consecutive bad samples--> DEGRADED --good_samples good samples--> READY
      any state --node key gone (lease expired/revoked)--> DOWN --key back--> DEGRADED

A *sample* is one evaluation of the node's current record (one coordinator tick), so the
thresholds count ticks, not agent writes.

Clocks. ``now`` is the caller's clock and every time kept here (``since``, ``ejected_until``,
``ready_since``) is on it; the leader passes ``time.monotonic()``, so an NTP step or a VM
resumed with a stale clock neither ends ejections early nor keeps instances out for an hour.
Staleness is ``age``: how long since the caller saw the record *change*, measured on its own
clock (the leader: since the record's mod revision changed). Comparing the agent's
``updated_at`` with the leader's wall clock would call a whole fleet stale because one host's
clock is off. A sample is bad when the telemetry is stale, a GPU is
lost or a GPU is over ``temp_limit_c``. A node first seen (also: every node, after a leader
change) starts as READY with no history: a new leader must not eject the whole fleet while it
collects samples; a bad node still reaches DEGRADED after ``bad_samples`` ticks.

Instances follow Envoy's outlier ejection. The agent already counted three failed probes before
it reports a non-READY state, so the leader does not debounce again: non-READY → DEGRADED at
once. Each READY → non-READY transition is an ejection; the n-th keeps the instance out for
``min(eject_base_s × n, eject_max_s)`` even if the agent says READY sooner, so a flapping
instance is kept out longer each time. n is forgotten after ``eject_forget_after_s`` of READY.

Only failures eject. An instance STOPPED, or STARTING/WARMING without its ``restarts`` count
having gone up, was stopped or started on purpose (an operator, a reload that removed and
re-added it, a replica moved back, a restarted agent): it is taken as a new instance, without
ejection and with its history forgotten, so it is routed as soon as the agent says READY. The
agent counts ``restarts`` only for restarts after a failure, so a crash whose UNHEALTHY and
RESTARTING states fell between two samples still shows up: STARTING with a higher count. The
caller also forgets an instance's history when it leaves its node's record (``departed``).

Nothing here logs: each value carries ``reason``, and the caller logs when ``state`` changes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gpufleet.keyspace.records import NodeRecord


class Health(enum.StrEnum):
    # Values are records.HealthState strings (DRAINED is an operator's decision, not health).
    READY = "READY"
    DEGRADED = "DEGRADED"
    DOWN = "DOWN"


@dataclass(frozen=True)
class HealthPolicy:
    bad_samples: int = 3
    good_samples: int = 3
    # Agents refresh their record at least every 30 s, so 90 s is three missed refreshes.
    stale_after_s: float = 90.0
    temp_limit_c: float = 90.0
    eject_base_s: float = 30.0
    eject_max_s: float = 300.0
    eject_forget_after_s: float = 300.0

    def __post_init__(self) -> None:
        if self.bad_samples < 1 or self.good_samples < 1:
            raise ValueError("bad_samples and good_samples must be at least 1")


DEFAULT_HEALTH = HealthPolicy()


# --- nodes ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeHealth:
    state: Health
    consecutive_bad: int  # capped at bad_samples, so a steady node yields an equal value
    consecutive_good: int  # capped at good_samples
    reason: str  # why the node is in `state` (for DEGRADED: the latest bad sample)
    since: float  # time of the last state change


def node_sample(record: NodeRecord, age: float, policy: HealthPolicy = DEFAULT_HEALTH) -> tuple[bool, str]:
    """(good, reason) for the node's current record, unchanged for ``age`` seconds; the reason
    names every problem found."""
    problems = []
    if age > policy.stale_after_s:
        problems.append(f"telemetry stale: last update {age:.0f} s ago (limit {policy.stale_after_s:.0f} s)")
    for g in record.gpus:
        if g.lost:
            problems.append(f"GPU {g.index} lost")
        elif g.temperature_celsius is not None and g.temperature_celsius > policy.temp_limit_c:
            problems.append(f"GPU {g.index} at {g.temperature_celsius:.0f} °C (limit {policy.temp_limit_c:.0f} °C)")
    if problems:
        return False, "; ".join(problems)
    return True, "ok"


def step_node(
    prev: NodeHealth | None,
    record: NodeRecord | None,
    now: float,
    policy: HealthPolicy = DEFAULT_HEALTH,
    *,
    age: float = 0.0,
) -> NodeHealth:
    """The node's health after one sample; ``record is None`` means its key is gone, ``age`` is
    how long the record has gone unchanged (see "Clocks" above)."""
    if record is None:
        if prev is not None and prev.state == Health.DOWN:
            return prev
        return NodeHealth(Health.DOWN, 0, 0, "node key gone (lease expired or revoked)", now)

    good, why = node_sample(record, age, policy)
    if prev is None:
        # First seen: READY with no history, then the ordinary READY rules for this sample.
        prev = NodeHealth(Health.READY, 0, 0, "first seen", now)
    elif prev.state == Health.DOWN:
        # Back from DOWN: not routable until it has shown good_samples good samples.
        prev = NodeHealth(Health.DEGRADED, 0, 0, "node key back after DOWN", now)

    if good:
        n_good = min(prev.consecutive_good + 1, policy.good_samples)
        if prev.state == Health.READY:
            if prev.consecutive_bad == 0 and prev.consecutive_good == n_good:
                return prev  # steady: no new value
            return NodeHealth(Health.READY, 0, n_good, prev.reason, prev.since)
        if n_good >= policy.good_samples:
            return NodeHealth(Health.READY, 0, n_good, f"{n_good} consecutive good samples", now)
        return NodeHealth(Health.DEGRADED, 0, n_good, prev.reason, prev.since)

    n_bad = min(prev.consecutive_bad + 1, policy.bad_samples)
    if prev.state == Health.READY and n_bad < policy.bad_samples:
        return NodeHealth(Health.READY, n_bad, 0, prev.reason, prev.since)
    since = now if prev.state == Health.READY else prev.since
    if prev.state == Health.DEGRADED and prev.consecutive_bad == n_bad and prev.reason == why:
        return prev
    return NodeHealth(Health.DEGRADED, n_bad, 0, why, since)


# --- instances -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceHealth:
    state: Health  # READY or DEGRADED (a DOWN node's instances are the node's business)
    ejections: int  # n: READY → not-READY transitions not yet forgotten
    ejected_until: float  # not routable before this time, whatever the agent says
    ready_since: float | None  # when the leader last saw it become READY; None while DEGRADED
    reason: str
    # The agent's restart count when last READY (or first seen): a higher one means a failure.
    restarts: int = 0


# Stopped or started on purpose, unless ``restarts`` went up (see "Only failures eject" above).
_ANEW_STATES = frozenset({"STOPPED", "STARTING", "WARMING"})


def started_anew(prev: InstanceHealth, agent_state: str, restarts: int) -> bool:
    """Whether the agent's state means the instance was stopped or started on purpose."""
    return agent_state in _ANEW_STATES and restarts <= prev.restarts


def step_instance(
    prev: InstanceHealth | None,
    agent_state: str,
    now: float,
    policy: HealthPolicy = DEFAULT_HEALTH,
    *,
    restarts: int = 0,
) -> InstanceHealth:
    """The instance's health after one sample of the agent-reported state (records.InstanceStateName)
    and restart count."""
    agent_ready = agent_state == "READY"
    if prev is None or started_anew(prev, agent_state, restarts):
        # New (or started anew): no ejection history, so READY at once if the agent says so.
        if agent_ready:
            return InstanceHealth(Health.READY, 0, 0.0, now, "new instance, agent reports READY", restarts)
        new = InstanceHealth(Health.DEGRADED, 0, 0.0, None, f"agent reports {agent_state}", restarts)
        return prev if new == prev else new  # a steady value is reused

    if prev.state == Health.READY:
        if agent_ready:
            if (
                prev.ejections
                and prev.ready_since is not None
                and now - prev.ready_since >= policy.eject_forget_after_s
            ):
                return InstanceHealth(Health.READY, 0, prev.ejected_until, prev.ready_since, prev.reason, restarts)
            if restarts != prev.restarts:  # failed and recovered between two samples
                return InstanceHealth(
                    prev.state, prev.ejections, prev.ejected_until, prev.ready_since, prev.reason, restarts
                )
            return prev
        n = prev.ejections + 1
        hold = _hold_s(n, policy)
        reason = _not_ready_reason(agent_state, n, policy)
        return InstanceHealth(Health.DEGRADED, n, now + hold, None, reason, prev.restarts)

    # DEGRADED: back only when the agent says READY *and* the ejection has run out.
    if agent_ready:
        if now >= prev.ejected_until:
            return InstanceHealth(
                Health.READY, prev.ejections, prev.ejected_until, now, "agent reports READY", restarts
            )
        # A fixed text (not "N s left"), so that a waiting instance yields the same value each tick.
        reason = f"agent reports READY; still ejected (ejection {prev.ejections})"
    else:
        reason = _not_ready_reason(agent_state, prev.ejections, policy)
    if reason == prev.reason:
        return prev
    return InstanceHealth(Health.DEGRADED, prev.ejections, prev.ejected_until, None, reason, prev.restarts)


def departed(old: NodeRecord, new: NodeRecord) -> list[str]:
    """Instances of ``old`` that are not in ``new``: they left the node's record, and their
    health history goes with them (one that comes back is a new instance)."""
    names = {i.name for i in new.instances}
    return [i.name for i in old.instances if i.name not in names]


def _hold_s(n: int, policy: HealthPolicy) -> float:
    return min(policy.eject_base_s * n, policy.eject_max_s)


def _not_ready_reason(agent_state: str, n: int, policy: HealthPolicy) -> str:
    # The same text for as long as the agent's state stays the same, so steady values are reused.
    if n == 0:
        return f"agent reports {agent_state}"
    return f"agent reports {agent_state}; ejection {n} ({_hold_s(n, policy):.0f} s)"


def routable(h: InstanceHealth | None) -> bool:
    """True when the leader's view lets traffic reach the instance."""
    return h is not None and h.state == Health.READY


def routable_or_new(h: InstanceHealth | None) -> bool:
    """Like ``routable``, but an instance without history yet counts (as in the route table)."""
    return h is None or h.state == Health.READY
