"""The gpu-coordinator process: election + leader loop + HTTP API, under systemd.

The skeleton (signals, tick loop, sd_notify, paired start-up and teardown) is
gpufleet/daemon.py's; this says what is the coordinator's own. SIGTERM resigns (revokes the
leader lease so a standby takes over at once) and exits 0. A tick publishes the role: STATUS=
and the leader/epoch gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import structlog

from gpufleet.daemon import DaemonBase, StartupError, Teardown, Tick
from gpufleet.facts import EX_CONFIG
from gpufleet.httpserver import ConnectionMetrics, listener_guard
from gpufleet.keyspace import Keyspace
from gpufleet.sdnotify import SystemdNotifier

from .api import build_app
from .config import CoordinatorConfig
from .election import Election
from .leader import Leader
from .metrics import CoordinatorMetrics

log = structlog.get_logger("coordinator")


def _epoch_file() -> Path | None:
    """Where the highest epoch seen is kept across restarts: systemd's ``StateDirectory=``
    (``$STATE_DIRECTORY``); none when run without one (the floors in etcd and memory remain)."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) / "epoch" if state else None


class CoordinatorRuntime(DaemonBase[None]):
    prog = "gpu-coordinator"
    log = log

    def __init__(self, cfg: CoordinatorConfig, notifier: SystemdNotifier | None = None) -> None:
        super().__init__(notifier, 1.0)
        self.cfg = cfg
        self.keys = Keyspace(cfg.etcd.cluster)
        self.metrics = CoordinatorMetrics()
        self.last_tick = time.monotonic()

    def identity(self) -> dict[str, object]:
        return {"id": self.cfg.id, "cluster": self.cfg.etcd.cluster}

    def listen_address(self) -> tuple[str, int]:
        return self.cfg.coordinator.listen_host, self.cfg.coordinator.listen_port

    async def start(self, teardown: Teardown) -> None:
        """Torn down in reverse: resign, stop the election and leader loops, close the API,
        close the etcd client."""
        tls = self.open_tls(self.cfg.tls)  # a certificate that does not load stops the start (78)
        try:
            self.etcd = self.cfg.etcd.client()
        except OSError as e:  # unreadable TLS or password file
            raise StartupError(str(e), EX_CONFIG) from None
        await teardown.context("close the etcd client", self.etcd)
        e = self.cfg.election
        self.election = Election(
            self.etcd,
            self.keys,
            self.cfg.id,
            self.cfg.advertise_url,
            ttl=e.lease_ttl_s,
            renew_deadline=e.renew_deadline_s,
            retry_period=e.retry_period_s,
            on_change=self._role_changed,
            on_rejected=self.metrics.guard_rejections.inc,
            epoch_file=_epoch_file(),
        )
        self.leader = Leader(self.cfg, self.etcd, self.election, self.keys, self.metrics)
        # Read timeouts and a connection cap under the open-file limit (raised to the hard
        # limit here): a flood of slow connections cannot make the API unreachable.
        guard = listener_guard(self.cfg.api, fds_per_connection=1)
        self.metrics.registry.register(ConnectionMetrics(guard, "gpu_coordinator"))
        try:
            app = build_app(self)
        except OSError as e:  # an unusable status token file
            raise StartupError(str(e), EX_CONFIG) from None
        runner = await self.http_runner(teardown, app, guard)
        await self.listen(runner, *self.listen_address(), backlog=self.cfg.api.backlog, tls=tls)
        tasks = [
            asyncio.create_task(self.election.run(), name="election"),
            asyncio.create_task(self.leader.run(), name="leader"),
        ]
        teardown.step("stop the election and leader loops", _cancel, tasks)
        teardown.step("resign", self.election.resign)

    async def ready_status(self) -> str:
        return self._status_line()

    async def tick(self) -> Tick:
        self.last_tick = time.monotonic()
        self.metrics.is_leader.set(1 if self.election.is_leader else 0)
        if self.election.is_leader and self.election.epoch is not None:
            self.metrics.epoch.set(self.election.epoch)
        return Tick(self._status_line())

    def _role_changed(self) -> None:
        self.metrics.elections.inc()
        self.metrics.is_leader.set(1 if self.election.is_leader else 0)
        if hasattr(self, "leader"):
            self.leader.poke()

    def _status_line(self) -> str:
        el = self.election
        if el.is_leader:
            return f"leader, epoch {el.epoch}; {self.leader.decision.summary}"
        return f"standby; leader {el.leader or 'unknown'} (epoch {el.leader_epoch})"


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
