"""The gpu-coordinator process: election + leader loop + HTTP API, under systemd.

SIGTERM resigns (revokes the leader lease so a standby takes over at once) and exits 0.
systemd hears READY=1 once the API serves, STATUS= with the role after each tick, WATCHDOG=1
from the tick loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import structlog
from aiohttp import web

from gpufleet import __version__
from gpufleet.facts import EX_CONFIG, EX_OSERR
from gpufleet.httpserver import ConnectionMetrics, GuardedRunner, listener_guard
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


class CoordinatorRuntime:
    def __init__(self, cfg: CoordinatorConfig, notifier: SystemdNotifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or SystemdNotifier()
        self.keys = Keyspace(cfg.etcd.cluster)
        self.metrics = CoordinatorMetrics()
        self.tick_interval = 1.0
        if self.notifier.watchdog_usec:
            self.tick_interval = min(self.tick_interval, self.notifier.watchdog_usec / 2e6)
        self.last_tick = time.monotonic()
        self._stop = asyncio.Event()

    async def run(self) -> int:
        log.info("gpu-coordinator starting", version=__version__, id=self.cfg.id, cluster=self.cfg.etcd.cluster)
        try:
            self.etcd = self.cfg.etcd.client()
        except OSError as e:
            log.error("cannot start", error=str(e))
            return EX_CONFIG
        e = self.cfg.election
        async with self.etcd:
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
            runner = GuardedRunner(build_app(self), guard, access_log=None, handle_signals=False)
            await runner.setup()
            c = self.cfg.coordinator
            site = web.TCPSite(runner, c.listen_host, c.listen_port, reuse_address=True, backlog=self.cfg.api.backlog)
            try:
                await site.start()
            except OSError as err:
                log.error("cannot listen", address=f"{c.listen_host}:{c.listen_port}", error=err.strerror or str(err))
                await runner.cleanup()
                return EX_OSERR
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            tasks = [
                asyncio.create_task(self.election.run(), name="election"),
                asyncio.create_task(self.leader.run(), name="leader"),
            ]
            self.notifier.ready(self._status_line())
            log.info("gpu-coordinator serving", listen=f"{c.listen_host}:{c.listen_port}")
            try:
                await self._tick_loop()
            finally:
                self.notifier.stopping()
                log.info("gpu-coordinator stopping")
                await self.election.resign()
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
                await runner.cleanup()
        log.info("gpu-coordinator stopped")
        return 0

    async def _tick_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.tick_interval)
            self.last_tick = time.monotonic()
            self.metrics.is_leader.set(1 if self.election.is_leader else 0)
            if self.election.is_leader and self.election.epoch is not None:
                self.metrics.epoch.set(self.election.epoch)
            self.notifier.status(self._status_line())
            self.notifier.watchdog()

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
