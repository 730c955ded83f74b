"""The supervisor: owns the instances, the port plan, GPU admission and config reloads.

Each instance runs its own lifecycle task (instance.py); the supervisor gives them what is
shared (HTTP session, GPU facts, cgroups, the process-group registry) and answers the API.
``tick()`` is the agent's heartbeat: one GPU sample and a summary line per probe interval.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import structlog

from agent.config import AgentConfig, InstanceConfig
from agent.gpu import GpuSource
from agent.gpu.smoothing import UtilizationSmoother
from gpufleet.gpuclasses import UNKNOWN
from gpufleet.keyspace.records import GpuRecord, InstanceRecord
from gpufleet.tasks import wait_set

from .admission import Claim, check_admission
from .cgroups import CgroupManager
from .handover import FdStore, lifeline_name, output_name
from .instance import Command, Instance
from .plan import InstancePlan, PlanError, ReloadPlan, Running, plan_instances, plan_reload
from .process import ChildProcess, GroupRecord, GroupRegistry, RotatingLog, adopt, is_alive, kill_session
from .supervision_policy import InstanceState

log = structlog.get_logger("agent.supervisor")

# Instances promised memory they may not hold yet (their allocation may not show in NVML).
_LOADING = frozenset({InstanceState.STARTING})
_SETTLING = frozenset({InstanceState.STOPPED, InstanceState.STARTING})  # not yet probed after adoption
# How long the previous agent's servers wait to be claimed: long enough for the leader's
# assignments to be read back after a restart.
ADOPT_WAIT_S = 60.0


SYSTEMD_ENV = frozenset(
    {"NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC", "JOURNAL_STREAM"}
)


class UnknownInstance(KeyError):
    pass


def _claim(inst: Instance) -> Claim:
    return Claim(inst.name, tuple(inst.cfg.gpus), inst.cfg.gpu_memory_fraction or 0.0)


class Supervisor:
    def __init__(
        self,
        cfg: AgentConfig,
        gpu_source: GpuSource,
        http: aiohttp.ClientSession,
        cgroups: CgroupManager | None = None,
        on_change: Callable[[], None] | None = None,
        fdstore: FdStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.gpu_source = gpu_source
        self.http = http
        self.cgroups = cgroups or CgroupManager()
        self.on_change = on_change or (lambda: None)
        self.log_dir = Path(cfg.agent.log_dir)
        self.registry = GroupRegistry(Path(cfg.agent.state_dir) / "process-groups.json")
        self.fdstore = fdstore or FdStore({})
        # Servers the previous agent left running for us (name -> record and descriptors).
        self._adoptable: dict[str, tuple[GroupRecord, int, int]] = {}
        self._adopting: set[str] = set()  # names that had a server to adopt at start
        self._settled = asyncio.Event()  # an instance changed state (adopted_settled waits on it)
        self.instances: dict[str, Instance] = {}
        # The same instances by the model name clients ask for, in the same order: the proxy
        # looks a model's up on every request (``of_model``).
        self._by_model: dict[str, list[Instance]] = {}
        self.gpus: list[GpuRecord] = []
        self.smoother = UtilizationSmoother(cfg.gpu.utilization_smoothing)
        self.last_tick: float | None = None
        self._unknown_logged: set[str] = set()  # GPU names logged once as of an unknown class
        # Reloads and assignment changes both stop and start instances: one at a time.
        self._reconfiguring = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._take_over_previous()
        self.gpus = self.smoother.apply(await self.gpu_source.sample())
        keep = {n: rec.port for n, (rec, _, _) in self._adoptable.items() if rec.port}
        plan = plan_instances(
            self.cfg.instances,
            assigned=False,
            running={},
            listen_port=self.cfg.agent.listen_port,
            port_base=self.cfg.supervisor.port_base,
            port_span=self.cfg.supervisor.port_span,
            keep_ports=keep,
            check_explicit=False,
        )
        self._start_instances(self._build(plan, assigned=False))
        if self._adoptable:
            # Replicas assigned by the leader come back once the assignments are read; what
            # nobody claims by then is stopped (its shim sees the lifeline close).
            asyncio.get_running_loop().call_later(ADOPT_WAIT_S, self._release_unclaimed)

    async def adopted_settled(self, timeout_s: float) -> None:
        """Until every instance that had a server to adopt has left STARTING (READY after its
        first probe, or failed and restarting), or ``timeout_s``."""
        names = set(self._adopting)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            pending = [
                n
                for n in names
                if n in self.instances and self.instances[n].wanted_running and self.instances[n].state in _SETTLING
            ]
            if not pending:
                return
            self._settled.clear()
            await wait_set(self._settled, deadline - asyncio.get_running_loop().time())
        log.warning("adopted servers not READY in time; serving anyway", timeout_s=timeout_s)

    def _take_over_previous(self) -> None:
        """Adopt the servers whose lifelines systemd passed back; kill any other leftover."""
        for name, rec in self.registry.take_previous().items():
            lifeline = self.fdstore.take(lifeline_name(name))
            output = self.fdstore.take(output_name(name))
            if lifeline is not None and output is not None and is_alive(rec) and rec.fingerprint:
                self._adoptable[name] = (rec, lifeline, output)
                self._adopting.add(name)
                log.info("model server left running by the previous agent", instance=name, pid=rec.pgid)
                continue
            for fd in (lifeline, output):
                if fd is not None:
                    os.close(fd)
            self._forget_fds(name)
            if pids := kill_session(rec):
                log.warning("killed model-server processes left by a previous agent", instance=name, pids=pids)

    def has_adoptable(self, name: str) -> bool:
        return name in self._adoptable

    def claim(self, name: str, fingerprint: str, port: int, output: RotatingLog) -> ChildProcess | None:
        """The previous agent's server for this instance, if it runs the same config on the
        same port; a different one is stopped here (the caller then starts its own)."""
        entry = self._adoptable.pop(name, None)
        if entry is None:
            return None
        rec, lifeline, out = entry
        child = adopt(rec.pgid, lifeline, out, output)
        if rec.fingerprint == fingerprint and rec.port == port and is_alive(rec):
            self.registry.keep(name, rec)
            return child
        log.info("previous agent's server has another config; replacing it", instance=name)
        self._stop_later(name, child)
        return None

    def _release_unclaimed(self) -> None:
        for name in list(self._adoptable):
            rec, lifeline, out = self._adoptable.pop(name)
            log.info("no instance claimed the previous agent's server; stopping it", instance=name)
            sup = self.cfg.supervisor
            output = RotatingLog(self.log_dir / f"{name}.log", sup.log_max_bytes, sup.log_backups)
            self._stop_later(name, adopt(rec.pgid, lifeline, out, output), output)

    def _stop_later(self, name: str, child: ChildProcess, output: RotatingLog | None = None) -> None:
        # Out of the fd store now, by name, before an instance of that name stores its own
        # (FDSTOREREMOVE drops every descriptor of a name); our own copies keep the shim alive
        # until stop() closes them.
        self._forget_fds(name)

        async def stop() -> None:
            await child.stop(self.cfg.supervisor.stop_grace_s)
            if output is not None:
                output.close()

        task = asyncio.create_task(stop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def hand_over(self, name: str, child: ChildProcess) -> None:
        """Give systemd our descriptors for a running server, so the next agent gets them."""
        self.fdstore.store(lifeline_name(name), child.lifeline)
        self.fdstore.store(output_name(name), child.output_fd)

    def _forget_fds(self, name: str) -> None:
        self.fdstore.remove(lifeline_name(name))
        self.fdstore.remove(output_name(name))

    def forget(self, name: str) -> None:
        """The instance's server is gone: its descriptors must not outlive it in systemd."""
        self._forget_fds(name)
        self.registry.remove(name)

    def _running(self) -> dict[str, Running]:
        return {n: Running(i.cfg, i.port, i.assigned) for n, i in self.instances.items()}

    def _build(self, plan: InstancePlan, *, assigned: bool) -> list[Instance]:
        """The new Instance objects of a plan, not started yet. Building opens each one's log
        file: a failure here (log directory not writable) refuses the plan before anything
        stops."""
        built: list[Instance] = []
        try:
            for c, port in plan.start:
                built.append(Instance(c, port, self, assigned=assigned))
        except OSError as e:
            for inst in built:
                inst.output.close()
            raise PlanError("reload_not_applicable", [f"cannot set up instance {c.name!r}: {e}"]) from None
        return built

    def _start_instances(self, built: list[Instance]) -> None:
        for inst in built:
            self.instances[inst.name] = inst
            self._by_model.setdefault(inst.cfg.client_model, []).append(inst)
            inst.start_task()

    def of_model(self, model: str) -> list[Instance]:
        """The instances serving ``model`` (the name clients ask for), whatever their state: a
        new list, the caller's to keep."""
        return list(self._by_model.get(model, ()))

    async def _apply(self, plan: InstancePlan, built: list[Instance]) -> None:
        """Stop what the plan stops, then start what it built. Nothing in here refuses: what
        could fail was checked by the plan."""
        await self._remove([self.instances[n] for n in plan.stop if n in self.instances])
        self._start_instances(built)

    async def stop(self) -> None:
        """Stop every instance, concurrently: the slowest grace period bounds the agent's exit."""
        await asyncio.gather(*(i.shutdown() for i in self.instances.values()), return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)

    async def detach(self) -> int:
        """Exit without stopping the servers: their lifelines are in systemd's fd store, and the
        next agent adopts them (or, if none comes, their shims stop them). Returns how many."""
        running = [i for i in self.instances.values() if i.child is not None and i.child.returncode is None]
        await asyncio.gather(*(i.detach() for i in self.instances.values()), return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        self.cgroups.release_for_restart()
        return len(running)

    async def tick(self) -> str:
        """Sample the GPUs; returns a one-line summary (systemd STATUS=)."""
        try:
            self.gpus = self.smoother.apply(await self.gpu_source.sample())
        except Exception as e:  # a probe bug must not stop supervision
            log.exception("gpu sample failed", error=str(e))
        self._note_unknown_gpus()
        self.last_tick = time.time()
        return self.summary()

    def _note_unknown_gpus(self) -> None:
        for g in self.gpus:
            if g.gpu_class == UNKNOWN and g.name not in self._unknown_logged:
                self._unknown_logged.add(g.name)
                log.warning(
                    "GPU model not in the class table: the coordinator weights it as a default "
                    "(add it to [gpu] classes here and [weights] base on the coordinators)",
                    gpu=g.index,
                    name=g.name,
                )

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for i in self.instances.values():
            counts[i.state.value] = counts.get(i.state.value, 0) + 1
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no instances"
        hot = max((g.temperature_celsius or 0 for g in self.gpus), default=0)
        return f"{len(self.instances)} instances: {states}; {len(self.gpus)} GPUs, hottest {hot:.0f}°C"

    # --- operator actions --------------------------------------------------------------------

    def get(self, name: str) -> Instance:
        try:
            return self.instances[name]
        except KeyError:
            raise UnknownInstance(name) from None

    def command(self, name: str, cmd: Command) -> Instance:
        inst = self.get(name)
        log.info("operator command", instance=name, command=cmd)
        inst.command(cmd)
        return inst

    async def reload(self, new: AgentConfig) -> ReloadPlan:
        """Apply a new config all-or-nothing: plan completely (ports, instances), then apply.
        Raises :class:`PlanError` with nothing changed when it cannot be planned. Only added,
        removed and changed instances are touched; settings that need a restart keep their
        running value and are listed in the plan."""
        async with self._reconfiguring:
            plan = plan_reload(self.cfg, new, self._running())
            # New instances read the new supervision settings as they are built; a plan refused
            # while building puts the running ones back (no await in between: nobody sees it).
            running_cfg, self.cfg = self.cfg, plan.live
            try:
                built = self._build(plan.instances, assigned=False)
            except PlanError:
                self.cfg = running_cfg
                raise
            await self._apply(plan.instances, built)
        for warning in plan.warnings:
            log.warning(warning, config=new.source_path)
        log.info("config reloaded", restart_needed=plan.restart_needed, **plan.instances.summary())
        self.on_change()
        return plan

    async def set_assigned(self, configs: list[InstanceConfig]) -> dict[str, list[str]]:
        """Make the assigned instances exactly ``configs`` (the leader's assignment for this
        node, minus what cannot run here); idempotent. Static instances are never touched: an
        assigned one whose name a static instance already has is skipped. All-or-nothing like a
        reload: :class:`PlanError` when the assignment cannot be planned, nothing changed."""
        async with self._reconfiguring:
            static = {i.name for i in self.instances.values() if not i.assigned}
            for c in configs:
                if c.name in static:
                    log.error("assigned instance has the name of a configured instance; not started", instance=c.name)
            plan = plan_instances(
                [c for c in configs if c.name not in static],
                assigned=True,
                running=self._running(),
                listen_port=self.cfg.agent.listen_port,
                port_base=self.cfg.supervisor.port_base,
                port_span=self.cfg.supervisor.port_span,
            )
            await self._apply(plan, self._build(plan, assigned=True))
        result = plan.summary()
        if result["added"] or result["removed"] or result["changed"]:
            log.info("assignments applied", **result)
            self.on_change()
        return result

    async def _remove(self, gone: list[Instance]) -> None:
        for inst in gone:
            del self.instances[inst.name]
            same = self._by_model[inst.cfg.client_model]
            same.remove(inst)
            if not same:
                del self._by_model[inst.cfg.client_model]
        # One instance that fails to stop cleanly must not keep the others (or the new ones) from
        # their turn: a plan, once applied, is applied whole.
        results = await asyncio.gather(*(i.shutdown() for i in gone), return_exceptions=True)
        for inst, res in zip(gone, results, strict=True):
            if isinstance(res, BaseException):
                log.error("instance did not shut down cleanly", instance=inst.name, error=repr(res))
        for inst in gone:
            self.cgroups.remove_instance(inst.name)

    # --- what instances ask of their host ------------------------------------------------------

    def admit(self, inst: Instance) -> str | None:
        if not inst.cfg.gpus:
            return None
        others = [i for i in self.instances.values() if i is not inst and i.cfg.gpus and i.child is not None]
        return check_admission(
            _claim(inst),
            {g.index: g for g in self.gpus},
            pending=[_claim(i) for i in others if i.state in _LOADING],
            holding=[_claim(i) for i in others if i.state not in _LOADING],
            budget=self.cfg.gpu.memory_budget,
        )

    def child_env(self, cfg: InstanceConfig, backend_env: dict[str, str]) -> dict[str, str]:
        # systemd's variables are the agent's: a server that inherited NOTIFY_SOCKET or
        # LISTEN_FDS would talk to systemd as if it were the agent.
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}
        # Empty for CPU-only instances: a CPU instance must not grab a GPU by default.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in cfg.gpus)
        env.update(backend_env)
        env.update(cfg.env)
        return env

    def cgroup_for(self, inst: Instance) -> str | None:
        if inst.cfg.cpu_quota is not None and not self.cgroups.tried:
            if self.cgroups.setup():
                log.info("cpu quotas enabled", cgroup=str(self.cgroups.base))
            else:
                log.warning("cpu_quota is configured but cannot be applied", reason=self.cgroups.unavailable_reason)
        try:
            return self.cgroups.prepare_instance(inst.name, inst.cfg.cpu_quota)
        except OSError as e:
            log.warning("cannot apply cpu quota", instance=inst.name, error=str(e))
            return None

    def memory_attach(self, inst: Instance) -> None:
        totals = {g.index: g.memory_total_bytes or 0 for g in self.gpus}
        frac = inst.cfg.gpu_memory_fraction or 0.0
        if inst.cfg.gpus:
            self.gpu_source.set_process_memory(inst.name, {g: int(frac * totals.get(g, 0)) for g in inst.cfg.gpus})

    def memory_detach(self, inst: Instance) -> None:
        self.gpu_source.clear_process_memory(inst.name)

    def on_state_change(self, inst: Instance) -> None:
        self._settled.set()
        self.on_change()

    # --- views ----------------------------------------------------------------------------------

    def records(self) -> list[InstanceRecord]:
        return [i.record() for i in self.instances.values()]

    def all_ready(self) -> bool:
        wanted = [i for i in self.instances.values() if i.wanted_running]
        return all(i.state is InstanceState.READY for i in wanted)
