"""Planning a change of the instances: decided completely before anything is touched.

A reload, an assignment change from the leader and the first start all go through here. The
plan says which instances stop and which start on which port, and everything that can fail at
this stage fails here: no free port left in the span, an explicit port held by a running
instance or by another process, a file that would stop every instance by omission. Only a
complete plan is applied (``Supervisor``); a refused one leaves the agent exactly as it was —
half-applied, a reload that runs out of ports has already stopped the instances it changed.

Pure, except for ``is_free`` (binds a port to see whether it is taken), which tests replace.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.config import AgentConfig, InstanceConfig, live_reloadable, restart_only_changes

from .ports import PortPlanError, plan_ports, port_is_free

# config_invalid: the file itself is wrong (HTTP 422); reload_not_applicable: the file is fine,
# but it cannot be applied to this host as it runs now (HTTP 409).
PlanErrorCode = Literal["config_invalid", "reload_not_applicable"]


class PlanError(Exception):
    """The new instances cannot be planned; nothing was changed."""

    def __init__(self, code: PlanErrorCode, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.code = code
        self.problems = problems


@dataclass(frozen=True)
class Running:
    """What the supervisor runs now under one name."""

    cfg: InstanceConfig
    port: int
    assigned: bool  # from the leader's assignment, not from the config file


@dataclass
class InstancePlan:
    stop: list[str]  # names to stop first (removed, changed, displaced)
    start: list[tuple[InstanceConfig, int]]  # then these, each on its planned port
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "changed": self.changed, "unchanged": self.unchanged}


@dataclass
class ReloadPlan:
    live: AgentConfig  # the config the agent runs after the reload
    instances: InstancePlan
    restart_needed: list[str]  # RESTART_ONLY settings that differ: kept until a restart
    warnings: list[str]


def plan_instances(
    configs: list[InstanceConfig],
    *,
    assigned: bool,
    running: Mapping[str, Running],
    listen_port: int,
    port_base: int,
    port_span: int,
    displace: Collection[str] = (),
    keep_ports: Mapping[str, int] | None = None,
    check_explicit: bool = True,
    is_free: Callable[[int], bool] = port_is_free,
) -> InstancePlan:
    """Bring the running instances of one origin (``assigned`` or not) to ``configs``.

    ``displace`` names instances of the other origin to stop as well (a configured instance
    taking an assigned one's name). Ports of what the plan stops count as free: they are
    released before anything starts. ``keep_ports`` adds ports to reuse by name (servers left by
    the previous agent). ``check_explicit`` refuses an explicit port another process holds; the
    first start skips it (a leftover server may still be letting go of its port).
    """
    mine = {n: r for n, r in running.items() if r.assigned == assigned}
    new = {c.name: c for c in configs}
    removed = [n for n in mine if n not in new]
    changed = [n for n in mine if n in new and new[n] != mine[n].cfg]
    added = [n for n in new if n not in mine]
    stop = removed + changed + [n for n in displace if n in running and n not in mine]
    starting = [new[n] for n in changed + added]
    staying = {n: r.port for n, r in running.items() if n not in stop}
    releasing = {running[n].port for n in stop}

    if problems := _explicit_port_problems(starting, staying, releasing, check_explicit, is_free):
        raise PlanError("reload_not_applicable", problems)
    keep = {**(keep_ports or {}), **{n: mine[n].port for n in changed if new[n].port is None}}
    try:
        ports = plan_ports(
            [(c.name, c.port) for c in starting],
            base=port_base,
            span=port_span,
            reserved={listen_port, *staying.values()},
            keep=keep,
            is_free=lambda p: p in releasing or is_free(p),
        )
    except PortPlanError as e:
        raise PlanError("reload_not_applicable", [str(e)]) from None
    return InstancePlan(
        stop=stop,
        start=[(c, ports[c.name]) for c in starting],
        added=added,
        removed=removed,
        changed=changed,
        unchanged=[n for n in mine if n in new and n not in changed],
    )


def _explicit_port_problems(
    starting: list[InstanceConfig],
    staying: Mapping[str, int],
    releasing: Collection[int],
    check_explicit: bool,
    is_free: Callable[[int], bool],
) -> list[str]:
    """An explicit port held by an instance that keeps running, or (``check_explicit``) by
    another process, unless the plan releases it."""
    problems = []
    for c in starting:
        if c.port is None:
            continue
        holder = next((n for n, p in staying.items() if p == c.port), None)
        if holder is not None:
            problems.append(f"instance {c.name!r}: port {c.port} is held by running instance {holder!r}")
        elif check_explicit and c.port not in releasing and not is_free(c.port):
            problems.append(f"instance {c.name!r}: port {c.port} is in use by another process")
    return problems


def plan_reload(
    running_cfg: AgentConfig,
    new: AgentConfig,
    running: Mapping[str, Running],
    is_free: Callable[[int], bool] = port_is_free,
) -> ReloadPlan:
    """What a reload to ``new`` does, or :class:`PlanError` saying why it cannot be done."""
    configured = sorted(n for n, r in running.items() if not r.assigned)
    if not new.instances and not new.instances_declared and configured:
        # Cut off before its first [[instances]]: stopping everything is never what that meant.
        names = ", ".join(repr(n) for n in configured)
        raise PlanError(
            "config_invalid",
            [
                f"{new.source_path}: $.instances: no [[instances]] in the file: the reload would stop {names}; "
                "if that is meant, write `instances = []` before the first table"
            ],
        )
    live = live_reloadable(running_cfg, new)
    names = {c.name for c in new.instances}
    instances = plan_instances(
        new.instances,
        assigned=False,
        running=running,
        listen_port=running_cfg.agent.listen_port,
        port_base=live.supervisor.port_base,
        port_span=live.supervisor.port_span,
        displace=[n for n, r in running.items() if r.assigned and n in names],  # the file wins
        is_free=is_free,
    )
    restart_needed = restart_only_changes(running_cfg, new)
    return ReloadPlan(live, instances, restart_needed, [restart_warning(n) for n in restart_needed])


def restart_warning(name: str) -> str:
    section, _, setting = name.partition(".")
    what = f"[{section}] {setting}" if setting else f"[{section}]"
    return f"{what} changed; restart needed to apply it"
