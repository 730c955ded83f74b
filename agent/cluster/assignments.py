"""Registered models on this host: check their paths, run the replicas the leader assigns here.

    registry (/models/*) ──► path checks (daemon threads) ──► availability in the node record
    assignment (/assignments/<node>) ──► instances started/stopped beside the config's own

Path checks touch shared storage (CephFS, NFS), which can hang; each runs in a daemon thread
(agent/threads.py) with a deadline, and a check still stuck is not started again, so a dead
mount costs one thread per path, not one per round, and never holds up the agent's exit (a
pool's threads are joined at interpreter exit: one stuck in a hung mount kept the agent from
exiting until systemd's SIGKILL). A check past its deadline reports the path unavailable.

Size and sha256 are checked once per registration (a model is immutable once registered;
re-hashing 60 GB every 30 s is not an option); presence and readability are re-checked every
``recheck_interval_s`` because mounts do go away.

While another agent holds this node_id (publisher.py refused the registration), the
assignment is that agent's: nothing is started here, and what was started is stopped.

An assigned replica starts only once its path checked out here. One already running keeps
running when a re-check fails (its weights are loaded): the failure is reported, and the
leader moves the replica, which ends it here.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import structlog

from agent.config import InstanceConfig, ModelsSection
from agent.supervisor.plan import PlanError
from agent.threads import in_daemon_thread
from gpufleet.etcd import EtcdClient, KeyMirror
from gpufleet.keyspace import Keyspace, decode_or_skip
from gpufleet.keyspace.records import AssignedInstance, AssignmentRecord, ModelAvailability, ModelRecord
from gpufleet.registry import PathCheck, check_path, validate_model
from gpufleet.tasks import cancel_and_wait, wait_set, wait_shielded

log = structlog.get_logger("agent.models")

# A failed checksum is retried this many re-check intervals later (the operator may fix the
# copy), not every round.
_FULL_RETRY_ROUNDS = 10


@dataclass(frozen=True)
class Wanted:
    """What to check for one model: the path, and what the registry says it must be."""

    path: str
    size_bytes: int | None
    sha256: str | None


@dataclass
class CheckState:
    result: PathCheck | None = None
    checked_at: float | None = None
    full_done: bool = False  # size/sha256 verified (checked once, then only presence)
    full_failed_at: float | None = None
    running: bool = False


def outside_roots(path: str, roots: list[str]) -> bool:
    return bool(roots) and not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def instance_config(a: AssignedInstance, cfg: ModelsSection) -> InstanceConfig:
    """The instance an assignment asks for, validated like a config-file instance (the name
    pattern keeps a hostile record from naming files outside the log directory)."""
    return msgspec.convert(
        {
            "name": a.name,
            "backend": a.backend,
            "model": a.path,
            "served_model_name": a.model,
            "gpus": a.gpus,
            "gpu_memory_fraction": a.gpu_memory_fraction,
            "launcher": cfg.launchers.get(a.backend),
            "args": a.args,
        },
        InstanceConfig,
    )


class ModelFollower:
    def __init__(
        self,
        etcd: EtcdClient,
        keys: Keyspace,
        node_id: str,
        settings: Callable[[], ModelsSection],
        apply: Callable[[list[InstanceConfig]], Awaitable[object]],
        running: Callable[[], set[str]],
        on_change: Callable[[], None],
        refused: Callable[[], bool] = lambda: False,
    ) -> None:
        self.keys = keys
        self.settings = settings  # read live: a reload applies
        self._apply = apply
        self._running = running
        self._on_change = on_change
        self._refused = refused  # another agent holds our node_id: its assignment, not ours
        self._was_refused = False
        self.registry: dict[str, ModelRecord] = {}
        self.assigned: list[AssignedInstance] = []
        self.checks: dict[Wanted, CheckState] = {}
        self._key = keys.assignment(node_id)
        self._wake = asyncio.Event()
        self._registry = KeyMirror(etcd, keys.models, on_change=lambda _: self._wake.set())
        # A prefix watch on our own key (it also sees "node10" when we are "node1"; filtered).
        self._assignment = KeyMirror(etcd, self._key, on_change=lambda _: self._wake.set())
        self._task: asyncio.Task[None] | None = None
        self._applied: list[InstanceConfig] | None = None
        self._plan_error: str | None = None  # why the assignment could not be applied (said once)

    def wake(self) -> None:
        """Something this follows changed (e.g. the registration was refused or taken): act now."""
        self._wake.set()

    def start(self) -> None:
        self._registry.start()
        self._assignment.start()
        self._task = asyncio.create_task(self._run(), name="model-follower")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._registry.stop()
        await self._assignment.stop()

    # --- what the node record shows ----------------------------------------------------------

    def availability(self) -> list[ModelAvailability]:
        out = []
        for name, rec in sorted(self.registry.items()):
            st = self.checks.get(self._wanted(rec))
            res = st.result if st else None
            out.append(
                ModelAvailability(
                    model=name,
                    path=rec.path,
                    available=None if res is None else res.available,
                    verified=bool(res and res.verified),
                    error=res.error if res else None,
                    checked_at=st.checked_at if st else None,
                )
            )
        return out

    # --- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            interval = self.settings().recheck_interval_s
            await wait_set(self._wake, interval)
            self._wake.clear()
            try:
                self._read_mirrors()
                await self._check_all()
                await self._apply_assignment()
            except Exception as e:  # nothing here may stop following
                log.exception("model follower pass failed", error=str(e))

    def _read_mirrors(self) -> None:
        registry = {}
        for key, kv in self._registry.data.items():
            rec = decode_or_skip(key, kv.value, ModelRecord, kv.mod_revision)
            if rec is None:
                continue
            if Keyspace.name_in(self.keys.models, key) != rec.name or (problems := validate_model(rec)):
                log.warning("invalid model registration skipped", key=key, problems=problems or ["name/key mismatch"])
                continue
            registry[rec.name] = rec
        self.registry = registry
        kv = self._assignment.data.get(self._key)
        rec = decode_or_skip(self._key, kv.value, AssignmentRecord, kv.mod_revision) if kv else None
        self.assigned = rec.instances if rec is not None else []

    def _wanted(self, rec: ModelRecord) -> Wanted:
        return Wanted(rec.path, rec.size_bytes, rec.sha256)

    def _wanted_all(self) -> set[Wanted]:
        out = {self._wanted(r) for r in self.registry.values()}
        for a in self.assigned:  # an assignment may outlive its registration for a moment
            if a.model not in self.registry:
                out.add(Wanted(a.path, None, None))
        return out

    async def _check_all(self) -> None:
        wanted = self._wanted_all()
        for w in [w for w in self.checks if w not in wanted]:
            del self.checks[w]
        await asyncio.gather(*(self._check(w) for w in wanted))

    async def _check(self, w: Wanted) -> None:
        cfg = self.settings()
        st = self.checks.setdefault(w, CheckState())
        if st.running:
            return  # still stuck from an earlier round: do not pile threads onto a dead mount
        now = time.time()
        if outside_roots(w.path, cfg.allowed_roots):
            self._record(w, st, PathCheck(False, False, f"{w.path} is outside models.allowed_roots"), now)
            return
        verify = cfg.verify_checksums and (w.size_bytes is not None or w.sha256 is not None)
        full = verify and not st.full_done  # size/sha256 not verified yet: the full check
        retry_s = _FULL_RETRY_ROUNDS * cfg.recheck_interval_s
        if full and st.full_failed_at is not None and now - st.full_failed_at < retry_s:
            return  # keep reporting the checksum failure until the retry is due
        timeout = cfg.checksum_timeout_s if full else cfg.check_timeout_s
        st.running = True
        check = functools.partial(check_path, w.path, w.size_bytes, w.sha256, full=full)
        fut = in_daemon_thread(check, "model-check")
        fut.add_done_callback(lambda _: setattr(st, "running", False))
        try:
            res = await wait_shielded(fut, timeout)
        except TimeoutError:
            res = PathCheck(False, False, f"{w.path}: check did not finish in {timeout:g}s (storage hung?)")
        except Exception as e:
            res = PathCheck(False, False, f"{w.path}: check failed: {e}")
        if full:
            if res.available:
                st.full_done, st.full_failed_at = True, None
            else:
                st.full_failed_at = now
        elif res.available and verify:
            res = PathCheck(True, True)  # verified once; present and readable now
        self._record(w, st, res, now)

    def _record(self, w: Wanted, st: CheckState, res: PathCheck, now: float) -> None:
        prev = st.result
        st.result, st.checked_at = res, now
        if prev is None or prev.available != res.available or prev.error != res.error:
            if res.available:
                log.info("model path available", path=w.path, verified=res.verified)
            else:
                log.warning("model path unavailable", path=w.path, error=res.error)
            self._on_change()

    async def _apply_assignment(self) -> None:
        cfg = self.settings()
        running = self._running()
        configs = []
        refused = self._refused()
        if refused != self._was_refused:
            self._was_refused = refused
            if refused:
                log.warning("another agent holds this node_id: its assigned replicas are not run here")
            else:
                log.info("registered: following this node's assignment again")
        for a in self.assigned if cfg.enabled and not refused else []:
            rec = self.registry.get(a.model)
            st = self.checks.get(self._wanted(rec) if rec and rec.path == a.path else Wanted(a.path, None, None))
            ok = st is not None and st.result is not None and st.result.available
            if not ok and a.name not in running:
                continue  # not checked yet, or unusable here: do not start it
            try:
                configs.append(instance_config(a, cfg))
            except msgspec.ValidationError as e:
                log.error("invalid assignment skipped", instance=a.name, model=a.model, error=str(e))
        if configs != self._applied:
            try:
                await self._apply(configs)
            except PlanError as e:
                # Nothing changed (all or nothing); tried again next pass, e.g. once a port is free.
                if str(e) != self._plan_error:
                    self._plan_error = str(e)
                    log.error("the assignment cannot be applied on this node; retrying", problems=e.problems)
                return
            if self._plan_error is not None:
                log.info("the assignment is applied", previous_problem=self._plan_error)
                self._plan_error = None
            self._applied = configs
