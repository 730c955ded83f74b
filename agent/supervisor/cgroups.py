"""Per-instance CPU quotas through cgroup v2 ``cpu.max``, when systemd delegated our cgroup.

With ``Delegate=yes`` the agent owns its cgroup subtree. cgroup v2 forbids processes in a
cgroup whose children have controllers enabled, so the agent first moves itself into a leaf
``agent`` child, enables ``+cpu`` for the children, and gives each instance an ``inst-<name>``
child with ``cpu.max = quota×period period``. A child process joins its cgroup itself between
fork and exec (see process.py), so no instance runs unthrottled for a moment.

Without delegation (or on cgroup v1 / hybrid hosts) quotas cannot be applied; we say so once.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

log = structlog.get_logger("agent.cgroups")

PERIOD_US = 100_000


class CgroupManager:
    def __init__(self, root: str = "/sys/fs/cgroup", proc_self_cgroup: str = "/proc/self/cgroup") -> None:
        self.root = Path(root)
        self.proc_self_cgroup = Path(proc_self_cgroup)
        self.base: Path | None = None
        self.unavailable_reason: str | None = None
        self.tried = False

    def setup(self) -> bool:
        """Detect delegation and prepare the subtree. Returns True when quotas will be applied.

        Done only once some instance has a quota: a unit cgroup with controllers enabled for
        its children cannot take a process itself, so systemd (before 254's DelegateSubgroup=)
        cannot start the next agent in it while the adopted servers still run below it;
        :meth:`release_for_restart` undoes it on a handover."""
        self.tried = True
        reason = self._detect()
        if reason is not None:
            self.unavailable_reason = reason
            return False
        assert self.base is not None
        try:
            leaf = self.base / "agent"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            (self.base / "cgroup.subtree_control").write_text("+cpu")
        except OSError as e:
            self.unavailable_reason = f"cannot prepare delegated cgroup {self.base}: {e}"
            self.base = None
            return False
        return True

    def _detect(self) -> str | None:
        try:
            lines = self.proc_self_cgroup.read_text().splitlines()
        except OSError as e:
            return f"cannot read {self.proc_self_cgroup}: {e}"
        unified = [ln[3:] for ln in lines if ln.startswith("0::")]
        if not unified or len(lines) > 1:
            return "host does not use the unified cgroup v2 hierarchy (cgroup v1 or hybrid)"
        base = self.root / unified[0].lstrip("/")
        if not (base / "cgroup.controllers").exists():
            return f"{base} is not a cgroup v2 directory"
        if "cpu" not in (base / "cgroup.controllers").read_text().split():
            return f"the cpu controller is not available in {base} (parent did not delegate it)"
        if not os.access(base / "cgroup.subtree_control", os.W_OK) or not os.access(base, os.W_OK):
            return f"{base} is not delegated to us (run under systemd with Delegate=yes)"
        self.base = base
        return None

    @property
    def enabled(self) -> bool:
        return self.base is not None

    def prepare_instance(self, name: str, cpu_quota: float | None) -> str | None:
        """Create/update the instance's cgroup; returns its cgroup.procs path for the child."""
        if self.base is None or cpu_quota is None:
            return None
        d = self.base / f"inst-{name}"
        d.mkdir(exist_ok=True)
        (d / "cpu.max").write_text(f"{int(cpu_quota * PERIOD_US)} {PERIOD_US}")
        return str(d / "cgroup.procs")

    def release_for_restart(self) -> None:
        """Turn the cpu controller off for our children (the quotas lapse until the next agent
        applies them again), so systemd can place the next agent in the unit's cgroup."""
        if self.base is None:
            return
        try:
            (self.base / "cgroup.subtree_control").write_text("-cpu")
        except OSError as e:
            log.warning("cannot release the cgroup subtree for the next agent", error=str(e))

    def remove_instance(self, name: str) -> None:
        if self.base is None:
            return
        try:
            (self.base / f"inst-{name}").rmdir()
        except OSError:
            pass  # still populated (a process lingers) or already gone; harmless
