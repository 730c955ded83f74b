"""The gpu-agent process: wires config, GPU source, supervisor and HTTP API; handles signals.

SIGTERM/SIGINT stop the instances (grace, then kill) and exit 0. SIGHUP re-reads the config and
applies only what changed, all or nothing: a new config that is bad or cannot be applied is
logged and the running one kept. systemd hears READY=1 once the API serves, RELOADING=1 then
READY=1 around every reload (whatever its outcome), STATUS= after every supervision tick,
WATCHDOG=1 after each completed tick, and STOPPING=1 at shutdown.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from agent.api.auth import AdminToken, TokenError
from agent.api.server import build_app
from agent.cluster import ClusterPublisher
from agent.cluster.assignments import ModelFollower
from agent.cluster.routes import RouteTable
from agent.config import AgentConfig, load_config
from agent.gpu import GpuSource, GpuSourceUnavailable, open_gpu_source
from agent.supervisor import Supervisor
from agent.supervisor.handover import API, FdStore
from agent.supervisor.plan import PlanError, PlanErrorCode
from gpufleet import __version__
from gpufleet.facts import EX_CONFIG, EX_OSERR, EX_SOFTWARE, EX_UNAVAILABLE
from gpufleet.httpserver import ConnectionGuard, GuardedRunner, listener_guard
from gpufleet.keyspace.records import NodeRecord, ProxyCounters
from gpufleet.sdnotify import SystemdNotifier
from gpufleet.tomlconfig import ConfigError

log = structlog.get_logger("agent")

ADOPT_SETTLE_S = 15.0  # longest a restart keeps its clients waiting for the adopted servers' first probe


# Handing over to the next agent: connections idle this long are closed, and in-flight requests
# get this long before the rest of the shutdown (they go on afterwards, up to aiohttp's limit).
HANDOVER_IDLE_S = 0.5
HANDOVER_DRAIN_S = 5.0


class StartupError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ReloadOutcome(msgspec.Struct, frozen=True):
    """What a reload did, as the admin API answers it: 200 applied, 422 the file has errors,
    409 the file cannot be applied to this host as it runs now (e.g. no free port)."""

    http_status: int
    body: dict[str, Any]


class AgentRuntime:
    def __init__(self, cfg: AgentConfig, notifier: SystemdNotifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or SystemdNotifier()
        # What the previous agent handed over through systemd, and where ours go.
        self.fdstore = FdStore(keep=cfg.supervisor.keep_servers_on_restart)
        self.admin_token = AdminToken(cfg.agent.admin_token_file)
        self.started_at = time.time()
        self.serving = False
        self.serving_was_up = False  # a start that failed half-way hands nothing over
        self.gpu_source: GpuSource
        self.supervisor: Supervisor
        self._stop = asyncio.Event()
        self._tick_now = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[ReloadOutcome]] = set()  # held until done (see _spawn_reload)
        self.reload_failure: str | None = None  # why the last reload was refused (STATUS= says so)
        self.restart_needed: list[str] = []  # settings changed in the file that wait for a restart
        self._runner: web.AppRunner | None = None
        self.http_guard: ConnectionGuard | None = None  # the listener's cap and timeouts (_make_runner)
        self._http: aiohttp.ClientSession | None = None
        self.publisher: ClusterPublisher | None = None
        self.routes: RouteTable | None = None
        self.models: ModelFollower | None = None
        self._said_dead: set[str] = set()  # instances whose dead supervision loop was logged
        self.proxy_counters = ProxyCounters()  # the proxy counts; the node record carries them

    # --- what the API reads ---------------------------------------------------------------

    def node_record(self) -> NodeRecord:
        instances = self.supervisor.records()
        gpus = self.supervisor.gpus
        return NodeRecord(
            node=self.cfg.node_id,
            address=self.cfg.advertise_url,
            mode="cluster" if self.cfg.cluster.enabled else "standalone",
            agent_version=__version__,
            started_at=self.started_at,
            updated_at=time.time(),
            gpu_source=self.gpu_source.kind,
            gpu_classes=sorted({g.gpu_class for g in gpus}),
            gpus=gpus,
            instances=instances,
            ready=self.serving and self.supervisor.all_ready(),
            models=self.models.availability() if self.models is not None else [],
            proxy=msgspec.structs.replace(self.proxy_counters),
        )

    def tick_age(self) -> float | None:
        last = self.supervisor.last_tick
        return None if last is None else time.time() - last

    def supervision_failures(self) -> dict[str, str]:
        """Instances whose lifecycle loop died of an error: nothing probes, restarts or stops
        their servers any more, whatever their state says. The loop catches its own errors, so
        this is a bug (or, before logging dropped on failure, a log write on a full disk); it
        must not pass silently: /healthz fails and systemd's watchdog restarts the agent."""
        return {inst.name: why for inst in self.supervisor.instances.values() if (why := inst.loop_failure) is not None}

    def changed(self) -> None:
        """Something visible changed: the tick loop wakes, cluster mode checks whether to publish."""
        self._tick_now.set()
        if self.publisher is not None:
            self.publisher.poke()

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        log.info("gpu-agent starting", version=__version__, node=self.cfg.node_id, config=self.cfg.source_path)
        try:
            await self._start()
        except StartupError as e:
            log.error("cannot start", error=str(e))
            await self._cleanup()
            return e.exit_code
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
        self.serving = self.serving_was_up = True
        status = await self.supervisor.tick()
        self.notifier.ready(status)
        log.info("gpu-agent serving", listen=f"{self.cfg.agent.listen_host}:{self.cfg.agent.listen_port}")
        code = 0
        try:
            await self._tick_loop()
        except Exception as e:  # supervision is gone: exit for systemd to restart us, never linger
            log.critical("supervision tick loop died; exiting", error=f"{type(e).__name__}: {e}", exc_info=True)
            code = EX_SOFTWARE
        log.info("gpu-agent stopping")
        await asyncio.gather(*self._reloads, return_exceptions=True)  # a reload ends whole, then we stop
        self.serving = False
        self.notifier.stopping()
        await self._cleanup()
        log.info("gpu-agent stopped")
        return code

    def serving_stopped_for_handover(self) -> bool:
        """Under systemd an exit hands the servers over: systemd keeps their lifelines while a
        restart is due and drops them (the shims stop the servers) when the unit stops."""
        return self.fdstore.enabled and self.serving_was_up

    def request_stop(self) -> None:
        self._stop.set()

    async def _start(self) -> None:
        try:
            self.gpu_source = open_gpu_source(self.cfg.gpu)
        except GpuSourceUnavailable as e:
            raise StartupError(str(e), EX_UNAVAILABLE) from None
        try:
            self.admin_token.ensure(self.cfg.agent.admin_token_generate)
        except (TokenError, OSError) as e:
            raise StartupError(str(e), EX_CONFIG) from None
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False), auto_decompress=False
        )
        self.supervisor = Supervisor(
            self.cfg, self.gpu_source, self._http, on_change=self.changed, fdstore=self.fdstore
        )
        # Bind the API before starting model servers: if the port is taken we fail fast and
        # leave no processes behind.
        # handler_cancellation: a client that disconnects cancels its handler, and with it the
        # upstream request, so a model server stops generating for nobody.
        self._runner = self._make_runner()
        await self._runner.setup()
        handed_over = self._handed_over_socket()
        if handed_over is None:
            await self._listen(self._runner)
            await self._start_supervisor()
        else:
            # Clients of the restart wait in the socket's backlog until the servers we adopt
            # have answered a probe: served earlier, they would find no READY instance.
            await self._start_supervisor()
            await self.supervisor.adopted_settled(ADOPT_SETTLE_S)
            await web.SockSite(self._runner, handed_over).start()
            log.info("serving on the socket the previous agent handed over")
        self.fdstore.close_unclaimed()
        if self.cfg.cluster.enabled:
            try:
                self.publisher = ClusterPublisher(
                    self.cfg.cluster,
                    self.cfg.node_id,
                    self.node_record,
                    state_dir=self.cfg.agent.state_dir,
                    on_refusal=lambda: self.models.wake() if self.models is not None else None,
                )
                await self.publisher.start()
            except OSError as e:  # unreadable TLS or password file
                self.publisher = None
                raise StartupError(str(e), EX_CONFIG) from None
            self.routes = RouteTable(
                self.publisher.etcd, self.publisher.keys, self.cfg.node_id, on_rewound=self.publisher.republish
            )
            self.routes.start()
            self.models = ModelFollower(
                self.publisher.etcd,
                self.publisher.keys,
                self.cfg.node_id,
                settings=lambda: self.cfg.models,
                apply=self.supervisor.set_assigned,
                running=lambda: {i.name for i in self.supervisor.instances.values() if i.assigned},
                on_change=self.changed,
                refused=lambda: self.publisher is not None and self.publisher.refused_by is not None,
            )
            self.models.start()

    async def _start_supervisor(self) -> None:
        try:
            await self.supervisor.start()
        except PlanError as e:
            # A config that cannot be planned here (no free port in the span, ...) does not get
            # better by restarting: EX_CONFIG, which the unit's RestartPreventExitStatus= honours.
            raise StartupError("cannot plan the instances: " + "; ".join(e.problems), EX_CONFIG) from None

    def _handed_over_socket(self) -> socket.socket | None:
        """The listening socket the previous agent handed over, if it is for our address."""
        host, port = self.cfg.agent.listen_host, self.cfg.agent.listen_port
        passed = self.fdstore.take(API)
        if passed is None:
            return None
        sock = socket.socket(fileno=passed)
        bound_host, bound_port = sock.getsockname()[:2]
        if bound_port == port and (bound_host == host or host in ("0.0.0.0", "::")):
            return sock
        log.info("the handed-over socket is for another address; opening a new one", was=f"{bound_host}:{bound_port}")
        sock.close()
        self.fdstore.remove(API)
        return None

    def _make_runner(self) -> web.AppRunner:
        """The API's runner: header/body read timeouts and a connection cap under the open-file
        limit (raised to the hard limit here), so a flood of slow connections cannot take the
        port (gpufleet/httpserver.py). Each proxied request holds 2 descriptors."""
        self.http_guard = listener_guard(self.cfg.api, fds_per_connection=2)
        return GuardedRunner(
            build_app(self), self.http_guard, access_log=None, handle_signals=False, handler_cancellation=True
        )

    async def _listen(self, runner: web.AppRunner) -> None:
        """Serve on a new socket (failing fast if the port is taken) and hand it to systemd,
        so the next agent serves on it without refusing anyone in between."""
        host, port = self.cfg.agent.listen_host, self.cfg.agent.listen_port
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=self.cfg.api.backlog)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e}", EX_OSERR) from None
        server = site._server
        if server is not None and self.fdstore.enabled:
            for listening in server.sockets:  # type: ignore[attr-defined]
                self.fdstore.store(API, listening.fileno())

    async def _tick_loop(self) -> None:
        interval = self.cfg.supervisor.probe_interval_s
        if self.notifier.watchdog_usec:
            # Tick at least twice per watchdog period so one slow tick does not trip it.
            interval = min(interval, self.notifier.watchdog_usec / 2e6)
        while not self._stop.is_set():
            waiters = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._tick_now.wait())]
            await asyncio.wait(waiters, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            self._tick_now.clear()
            if self._stop.is_set():
                break
            status = await self.supervisor.tick() + self._reload_notes()
            if self.publisher is not None:
                self.publisher.poke()
                status += f"; etcd {self.publisher.state}"
            if dead := self.supervision_failures():
                # No WATCHDOG=1: systemd restarts the agent, and the next one adopts the servers.
                self._say_dead(dead)
                self.notifier.status(f"supervision failed for {', '.join(sorted(dead))}; {status}")
                continue
            self.notifier.status(status)
            self.notifier.watchdog()

    def _say_dead(self, dead: dict[str, str]) -> None:
        for name, error in dead.items():
            if name not in self._said_dead:
                self._said_dead.add(name)
                log.critical(
                    "instance supervision loop died; /healthz fails until a restart", instance=name, error=error
                )

    async def _cleanup(self) -> None:
        handing_over = hasattr(self, "supervisor") and self.serving_stopped_for_handover()
        if handing_over:
            await self._drain_for_handover()
        # Deregister first: the cluster moves traffic away before the instances go down.
        if self.models is not None:
            await self.models.stop()
        if self.routes is not None:
            await self.routes.stop()
        if self.publisher is not None:
            await self.publisher.stop(revoke=not handing_over)
        if hasattr(self, "supervisor"):
            if handing_over:
                n = await self.supervisor.detach()
                log.info("leaving the model servers to the next agent", servers=n)
            else:
                await self.supervisor.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()
        if hasattr(self, "gpu_source"):
            self.gpu_source.close()

    async def _drain_for_handover(self) -> None:
        """Stop accepting (new connections wait in the socket's backlog for the next agent) and
        let the connections we hold end cleanly while everything still serves: a kept-alive
        connection closed under a client sending on it fails that request (see
        ConnectionGuard.drain)."""
        if self._runner is None or self.http_guard is None:
            return
        for site in list(self._runner.sites):
            await site.stop()
        left = await self.http_guard.drain(idle_s=HANDOVER_IDLE_S, timeout_s=HANDOVER_DRAIN_S)
        log.info("connections handed over", still_open=left)

    # --- reload ---------------------------------------------------------------------------------

    async def reload(self) -> ReloadOutcome:
        """POST /admin/reload. The reload runs to its end even if the HTTP client goes away (the
        handler is cancelled then): a reload cut in the middle is what all-or-nothing rules out."""
        return await asyncio.shield(self._spawn_reload())

    def _spawn_reload(self) -> asyncio.Task[ReloadOutcome]:
        """Also SIGHUP's handler. The task is held until done: one nobody references can be
        garbage-collected mid-way, and one nobody awaits reports its exception only as "Task
        exception was never retrieved"."""
        task = asyncio.create_task(self._reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        return task

    async def _reload(self) -> ReloadOutcome:
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                outcome = await self._reload_once()
            except Exception as e:  # a bug: say so, and never leave systemd waiting in "reloading"
                log.exception("reload failed unexpectedly", error=f"{type(e).__name__}: {e}")
                outcome = self._refused("internal_error", [f"unexpected error: {type(e).__name__}: {e}"], 500)
            finally:
                # systemd hears READY=1 after RELOADING=1 whatever happened.
                summary = self.supervisor.summary() + self._reload_notes(ready=False)
                failed = f"reload failed: {self.reload_failure}; running config kept; " if self.reload_failure else ""
                self.notifier.ready(failed + summary)
            return outcome

    async def _reload_once(self) -> ReloadOutcome:
        try:
            new = load_config(self.cfg.source_path)
        except ConfigError as e:
            return self._refused("config_invalid", str(e).splitlines())
        try:
            plan = await self.supervisor.reload(new)
        except PlanError as e:
            return self._refused(e.code, e.problems)
        self.cfg = self.supervisor.cfg
        self.reload_failure = None
        self.restart_needed = plan.restart_needed
        body = {
            "status": "applied",
            **plan.instances.summary(),
            "restart_needed": plan.restart_needed,
            "warnings": plan.warnings,
        }
        return ReloadOutcome(200, body)

    def _refused(self, code: PlanErrorCode | str, problems: list[str], http_status: int | None = None) -> ReloadOutcome:
        for line in problems:
            log.error("reload refused, keeping the running config", problem=line, reason=code)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        self.reload_failure = f"{problems[0]}{more}"
        status = http_status or (422 if code == "config_invalid" else 409)
        error = {
            "message": f"reload refused, running config kept: {self.reload_failure}",
            "type": "invalid_request_error" if status < 500 else "server_error",
            "code": code,
        }
        return ReloadOutcome(status, {"status": "refused", "error": error, "problems": problems})

    def _reload_notes(self, ready: bool = True) -> str:
        """What STATUS= keeps saying after a reload until the next one (or a restart) clears it."""
        notes = ""
        if self.reload_failure and ready:
            notes += f"; last reload failed: {self.reload_failure}"
        if self.restart_needed:
            notes += f"; restart needed for {', '.join(self.restart_needed)}"
        return notes
