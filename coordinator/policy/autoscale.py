"""Autoscaling: one replica more when a model's queues stay long, one less when they stay short.

A registry entry with ``max_replicas`` above ``replicas`` is scaled by the leader between the
two (while it is wanted, for an on-demand model: policy/ondemand.py decides idle first). The
signal is what the agents already report in their node records: each READY replica's backend
queue, ``InstanceLoad.requests_waiting`` (vLLM's ``num_requests_waiting``, llama.cpp's
``requests_deferred``). Waiting, not running, because a backend batches: many requests running
is a full batch doing its job, requests waiting are the ones a replica more would serve now.

- *High*: the mean of requests waiting per READY replica above ``scale_up_waiting``. Sustained
  for ``scale_up_after_s`` (every leader pass in between saw it high): one replica more, up to
  ``max_replicas``. Not while a replica added before is still on its way (fewer READY than the
  target): its queue would be counted again before it could take any. At ``max_replicas`` with
  the queues still long, the status says so: the model needs more capacity than it may take.
- *Low*: the mean at most ``scale_down_waiting``. Sustained for ``scale_down_after_s`` (longer
  than the way up, by default 300 s against 30 s): one replica less, down to ``replicas``.
  Hysteresis is the band between the two thresholds and the two windows.
- *Cool-down*: no change within ``scale_cooldown_s`` of the last; the windows start over after
  a change, as the queues are now spread over another count of replicas.
- *Never evict a replica that is serving*: a scale-down names the replica to stop, one not
  serving (not READY, or READY with nothing running and nothing waiting by its last report);
  when every replica is busy, the scale-down waits (and says so) until one is idle. A replica
  that could not be placed is dropped first (nothing to stop).

No READY replica reporting its queue (a cold start, an outage, a backend without metrics): no
signal, the windows start over, the count stays.

Pure: no I/O, no clock (``now`` is the leader's monotonic clock).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from gpufleet.keyspace.records import AssignedInstance, ModelRecord, NodeRecord
from gpufleet.registry import max_replicas


@dataclass(frozen=True)
class Load:
    """One autoscaled model's replicas, as the node records report them."""

    assigned: int  # replicas assigned to nodes
    ready: int  # of those, READY and reporting their queue
    waiting: float  # requests waiting, summed over those
    idle: tuple[str, ...] = ()  # nodes whose replica does not serve: not READY first, then idle READY


@dataclass(frozen=True)
class AutoscaleState:
    target: int  # replicas asked of placement while the model is wanted
    high_since: float | None = None  # since when the queues have been long (None: they are not)
    low_since: float | None = None
    changed_at: float = float("-inf")  # the last change of target (cool-down)
    # A step that is due but cannot be taken (no idle replica to stop; at max_replicas with the
    # queues still long), for the status; "" when none. No numbers: the status is rewritten only
    # when it changes.
    blocked: str = ""


@dataclass(frozen=True)
class Step:
    state: AutoscaleState
    decision: str = ""  # why the target changed in this step ("" when it did not)
    victim: str | None = None  # scale-down: the node whose replica to stop


def initial(m: ModelRecord, assigned: int) -> AutoscaleState:
    """A new leader's start: the replicas its predecessor assigned, within the bounds (a
    leader change neither drops a scaled-up replica nor adds one)."""
    return AutoscaleState(target=min(max(assigned, m.replicas), max_replicas(m)))


def model_loads(
    models: Iterable[str], records: Iterable[NodeRecord], current: dict[str, list[AssignedInstance]]
) -> dict[str, Load]:
    """The ``Load`` of each of ``models`` from the node records and the current assignments."""
    wanted = set(models)
    holders: dict[str, dict[str, str]] = {}  # model -> node -> instance name assigned there
    for node, insts in current.items():
        for a in insts:
            if a.model in wanted:
                holders.setdefault(a.model, {})[node] = a.name
    by_node = {rec.node: rec for rec in records}
    out = {}
    for model in sorted(wanted):
        nodes = holders.get(model, {})
        ready = 0
        waiting = 0.0
        not_ready: list[str] = []
        idle: list[str] = []
        for node in sorted(nodes):
            rec = by_node.get(node)
            inst = next((i for i in rec.instances if i.name == nodes[node]), None) if rec else None
            if inst is None or inst.state != "READY":
                not_ready.append(node)
                continue
            load = inst.load
            if load is None or load.requests_waiting is None:
                continue  # READY but no queue reported: neither counted nor known to be idle
            ready += 1
            waiting += load.requests_waiting
            if not load.requests_waiting and not load.requests_running:
                idle.append(node)
        out[model] = Load(assigned=len(nodes), ready=ready, waiting=waiting, idle=(*not_ready, *idle))
    return out


def step(m: ModelRecord, state: AutoscaleState, load: Load, now: float) -> Step:
    """The next state of ``m``'s autoscaling (see the module docstring)."""
    low_bound, high_bound = m.replicas, max_replicas(m)
    if not low_bound <= state.target <= high_bound:  # the registration changed its bounds
        target = min(max(state.target, low_bound), high_bound)
        why = f"registration changed: {low_bound} to {high_bound} replicas"
        return Step(AutoscaleState(target=target, changed_at=now), why)
    if load.ready == 0:
        return Step(replace(state, high_since=None, low_since=None, blocked=""))
    mean = load.waiting / load.ready
    high, low = mean > m.scale_up_waiting, mean <= m.scale_down_waiting
    state = replace(  # what is blocked is judged anew on every step
        state,
        high_since=(now if state.high_since is None else state.high_since) if high else None,
        low_since=(now if state.low_since is None else state.low_since) if low else None,
        blocked="",
    )
    cooling = now - state.changed_at < m.scale_cooldown_s
    if high and state.target >= high_bound:
        assert state.high_since is not None
        if now - state.high_since >= m.scale_up_after_s:
            return Step(replace(state, blocked=f"queues still long at max_replicas ({high_bound})"))
    elif high and not cooling and load.ready >= state.target:
        assert state.high_since is not None
        held = now - state.high_since
        if held >= m.scale_up_after_s:
            why = (
                f"scaled up: {mean:.1f} requests waiting per READY replica for {held:.0f} s "
                f"(more than {m.scale_up_waiting:g} for {m.scale_up_after_s:g} s)"
            )
            return Step(AutoscaleState(target=state.target + 1, changed_at=now), why)
    if low and state.target > low_bound and not cooling:
        assert state.low_since is not None
        held = now - state.low_since
        if held >= m.scale_down_after_s:
            measured = (
                f"{mean:.1f} requests waiting per READY replica for {held:.0f} s "
                f"(at most {m.scale_down_waiting:g} for {m.scale_down_after_s:g} s)"
            )
            if load.assigned < state.target:  # a replica that was never placed: nothing to stop
                why = f"scaled down: {measured}; dropped a replica that was not placed"
                return Step(AutoscaleState(target=state.target - 1, changed_at=now), why)
            if not load.idle:
                blocked = "scale-down due, waiting for an idle replica (every replica is serving)"
                return Step(replace(state, blocked=blocked))
            victim = load.idle[0]
            why = f"scaled down: {measured}; stopping the replica on {victim}, which serves nothing"
            return Step(AutoscaleState(target=state.target - 1, changed_at=now), why, victim)
    return Step(state)
