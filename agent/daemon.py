"""The gpu-agent process: wires config, GPU source, supervisor and HTTP API.

The skeleton (signals, tick loop, sd_notify, reload serialisation, paired start-up and teardown)
is gpufleet/daemon.py's; this says what is the agent's own. SIGTERM/SIGINT stop the instances
(grace, then kill) and exit 0, or under systemd leave them to the next agent. SIGHUP re-reads
the config and applies only what changed, all or nothing: a new config that is bad or cannot be
applied is logged and the running one kept. A tick is a supervision pass: STATUS= after each,
WATCHDOG=1 unless an instance's supervision loop died.
"""

from __future__ import annotations

import errno
import gc
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from agent.api.auth import AdminToken, TokenError
from agent.api.server import build_app
from agent.cluster import ClusterPublisher
from agent.cluster.assignments import ModelFollower
from agent.cluster.demand import DemandTracker
from agent.cluster.routes import RouteTable
from agent.config import AgentConfig, load_config
from agent.gpu import GpuSource, GpuSourceUnavailable, open_gpu_source
from agent.keys.config import effective_mode
from agent.keys.gate import KeyGate
from agent.keys.journal import UsageJournal
from agent.keys.rollup import ROLLED_FILE, EtcdUsageStore, FileUsageStore, UsageRoller, UsageStore
from agent.keys.source import EtcdKeySource, FileKeySource, KeysFileError, KeySource
from agent.proxy.coldstart import ColdStart
from agent.proxy.front import install_front
from agent.proxy.stats import ProxyStats
from agent.supervisor import Supervisor
from agent.supervisor.handover import API, FdStore
from agent.supervisor.plan import PlanError, PlanErrorCode
from gpufleet import __version__
from gpufleet.daemon import DaemonBase, StartupError, Teardown, Tick
from gpufleet.facts import EX_CONFIG, EX_UNAVAILABLE
from gpufleet.hopauth import HopAuthError
from gpufleet.httpserver import ConnectionGuard, listener_guard
from gpufleet.keyspace.records import NodeRecord
from gpufleet.sdnotify import SystemdNotifier
from gpufleet.tlsconfig import ServerTls, TlsError
from gpufleet.tomlconfig import ConfigError

log = structlog.get_logger("agent")

ADOPT_SETTLE_S = 15.0  # longest a restart keeps its clients waiting for the adopted servers' first probe


# Handing over to the next agent: connections idle this long are closed, and in-flight requests
# get this long before the rest of the shutdown (they go on afterwards, up to aiohttp's limit).
HANDOVER_IDLE_S = 0.5
HANDOVER_DRAIN_S = 5.0


class ReloadOutcome(msgspec.Struct, frozen=True):
    """What a reload did, as the admin API answers it: 200 applied, 422 the file has errors,
    409 the file cannot be applied to this host as it runs now (e.g. no free port)."""

    http_status: int
    body: dict[str, Any]


# The cyclic garbage collector's oldest generation, collected after this many collections of
# the middle one (CPython's default: 10), and then only once a quarter of the heap is new. A
# full collection walks every tracked object and each open stream holds about 80
# (docs/benchmarks.md, issue 18 step 10): with the default, a run with 5,000 open streams had
# six full collections, each stalling every stream, the longest 183 ms; at 100 its added
# gap p99 went from about 100 ms to 2-4 ms and its first event p99 from 220-330 ms to 12 ms,
# with the same RSS per stream and throughput. The younger generations, where a request's own
# cycles die, are collected as often as before.
FULL_COLLECTION_EVERY = 100


def collect_less_often() -> Callable[[], None]:
    """Set FULL_COLLECTION_EVERY; returns what puts the thresholds back (a test's agent runs
    in the tests' process)."""
    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], FULL_COLLECTION_EVERY)
    return lambda: gc.set_threshold(*before)


class AgentRuntime(DaemonBase[ReloadOutcome]):
    prog = "gpu-agent"
    log = log
    reloads = True

    def __init__(self, cfg: AgentConfig, notifier: SystemdNotifier | None = None) -> None:
        super().__init__(notifier, cfg.supervisor.probe_interval_s)
        self.cfg = cfg
        # What the previous agent handed over through systemd, and where ours go.
        self.fdstore = FdStore(keep=cfg.supervisor.keep_servers_on_restart)
        self.admin_token = AdminToken(cfg.agent.admin_token_file)
        self.started_at = time.time()
        self.gpu_source: GpuSource
        self.supervisor: Supervisor
        self.reload_failure: str | None = None  # why the last reload was refused (STATUS= says so)
        self.restart_needed: list[str] = []  # settings changed in the file that wait for a restart
        self._runner: web.AppRunner | None = None
        self.http_guard: ConnectionGuard | None = None  # the listener's cap and timeouts (start)
        self.tls: ServerTls | None = None  # HTTPS on the port, and the context other nodes are verified with
        self._http: aiohttp.ClientSession | None = None
        self.publisher: ClusterPublisher | None = None
        self.routes: RouteTable | None = None
        self.models: ModelFollower | None = None
        self._said_dead: set[str] = set()  # instances whose dead supervision loop was logged
        self.proxy_stats = ProxyStats()  # the proxy counts (the API hands it to the proxy); the node record reads it
        # API keys: the proxy's gate (made with the proxy, None without it) and where the keys
        # come from (a standalone agent's keys file; in a cluster, etcd once joined).
        self.key_gate: KeyGate | None = None
        self.key_source: KeySource | None = None
        self.usage_journal: UsageJournal | None = None  # what keyed requests used, until rolled up
        self._entry_nodes = (0.0, 1)  # (when counted, nodes in the route table): see entry_nodes
        # Requests for on-demand models, for the node record (empty until the registry is followed).
        self.demand = DemandTracker(
            lambda: self.models.registry if self.models is not None else {},
            lambda: self.publisher.poke() if self.publisher is not None else None,
        )
        self.cold_start: ColdStart | None = None  # the proxy's, made with it (agent/api/server.py)

    # --- what the API reads ---------------------------------------------------------------

    def node_record(self) -> NodeRecord:
        instances = self.proxy_stats.annotate(self.supervisor.records())
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
            proxy=self.proxy_stats.snapshot(),
            key_demand=self.key_gate.limiter.demand(time.time()) if self.key_gate is not None else {},
            model_demand=self.demand.published(),
        )

    def entry_nodes(self) -> int:
        """The nodes a client may enter the cluster through (each enforces its share of a key's
        limits): those in the route table, counted at most once a second; 1 standalone."""
        counted_at, n = self._entry_nodes
        now = time.monotonic()
        if self.routes is not None and now - counted_at >= 1.0:
            n = self.routes.node_count(also=self.cfg.node_id)
            self._entry_nodes = (now, n)
        return n

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
        self.tick_soon()
        if self.publisher is not None:
            self.publisher.poke()
        if self.cold_start is not None:
            self.cold_start.poke()  # a local instance may have become READY

    # --- lifecycle ------------------------------------------------------------------------------

    def identity(self) -> dict[str, object]:
        return {"node": self.cfg.node_id, "config": self.cfg.source_path}

    def listen_address(self) -> tuple[str, int]:
        return self.cfg.agent.listen_host, self.cfg.agent.listen_port

    def serving_stopped_for_handover(self) -> bool:
        """Under systemd an exit hands the servers over: systemd keeps their lifelines while a
        restart is due and drops them (the shims stop the servers) when the unit stops."""
        return self.fdstore.enabled and self.serving_was_up

    async def start(self, teardown: Teardown) -> None:
        """Each resource's teardown is registered where it starts, so the stop runs them in
        reverse: drain for a handover, leave the cluster (the cluster moves traffic away before
        the instances go down), stop or hand over the instances, close the API, the HTTP client,
        the GPU source."""
        teardown.step("put the collector's thresholds back", collect_less_often())
        self.tls = self.open_tls(self.cfg.tls)  # a certificate that does not load stops the start (78)
        try:
            self.gpu_source = open_gpu_source(self.cfg.gpu)
        except GpuSourceUnavailable as e:
            raise StartupError(str(e), EX_UNAVAILABLE) from None
        teardown.step("close the GPU source", self.gpu_source.close)
        try:
            self.admin_token.ensure(self.cfg.agent.admin_token_generate)
        except (TokenError, OSError) as e:
            raise StartupError(str(e), EX_CONFIG) from None
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False), auto_decompress=False
        )
        teardown.step("close the HTTP client", self._http.close)
        self._open_usage_journal(teardown)  # before the listener: closed after its last request
        self.supervisor = Supervisor(
            self.cfg, self.gpu_source, self._http, on_change=self.changed, fdstore=self.fdstore
        )
        # Bind the API before starting model servers: if the port is taken we fail fast and
        # leave no processes behind. The runner's read timeouts and connection cap sit under the
        # open-file limit (raised to the hard limit here), so a flood of slow connections cannot
        # take the port (gpufleet/httpserver.py); each proxied request holds 2 descriptors.
        # handler_cancellation: a client that disconnects cancels its handler, and with it the
        # upstream request, so a model server stops generating for nobody.
        self.http_guard = listener_guard(self.cfg.api, fds_per_connection=2)
        try:
            app = build_app(self)
        except OSError as e:  # an unusable status token file
            raise StartupError(str(e), EX_CONFIG) from None
        self._runner = await self.http_runner(teardown, app, self.http_guard, handler_cancellation=True)
        # The proxy's data path is served by its own protocol, which hands every other request
        # to aiohttp on the same port (agent/proxy/front.py); the sites below all make it.
        install_front(self._runner)
        self._open_keys()
        handed_over = self._handed_over_socket()
        if handed_over is None:
            await self._listen(self._runner)
            await self._start_supervisor(teardown)
        else:
            # Clients of the restart wait in the socket's backlog until the servers we adopt
            # have answered a probe: served earlier, they would find no READY instance.
            await self._start_supervisor(teardown)
            await self.supervisor.adopted_settled(ADOPT_SETTLE_S)
            ssl_context = self.tls.server if self.tls is not None else None  # TLS on the handed-over socket too
            await web.SockSite(self._runner, handed_over, ssl_context=ssl_context).start()
            log.info("serving on the socket the previous agent handed over")
        self.fdstore.close_unclaimed()
        if self.cfg.cluster.enabled:
            await self._join_cluster(teardown)
        elif self.usage_journal is not None:
            self._roll_usage(teardown, FileUsageStore(self.usage_journal.directory / ROLLED_FILE))
        # Last to start, first at the stop: only an agent that came up serving hands over.
        teardown.step("drain connections for the handover", self._drain_for_handover)

    async def _join_cluster(self, teardown: Teardown) -> None:
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
        # A handover keeps the registration (its lease) for the next agent to take over.
        publisher = self.publisher
        teardown.step(
            "withdraw from the cluster", lambda: publisher.stop(revoke=not self.serving_stopped_for_handover())
        )
        # Mirrored whatever the mode, so a reload that turns keys on has them at once.
        keys = EtcdKeySource(publisher.etcd, publisher.keys, Path(self.cfg.agent.state_dir))
        self.key_source = keys
        await keys.start()
        teardown.step("stop following API keys", keys.stop)
        self._roll_usage(teardown, EtcdUsageStore(publisher.etcd, publisher.keys, self.cfg.node_id))
        self.routes = RouteTable(
            publisher.etcd,
            publisher.keys,
            self.cfg.node_id,
            on_rewound=publisher.republish,
            pinned=lambda: {i.cfg.client_model for i in self.supervisor.instances.values()},
            settings=lambda: self.cfg.cluster,
            classes=lambda: {g.gpu_class for g in self.supervisor.gpus},
        )
        self.routes.on_route = lambda model: self.cold_start.poke(model) if self.cold_start is not None else None
        self.routes.start()
        teardown.step("stop following routes", self.routes.stop)
        self.models = ModelFollower(
            publisher.etcd,
            publisher.keys,
            self.cfg.node_id,
            settings=lambda: self.cfg.models,
            apply=self.supervisor.set_assigned,
            running=lambda: {i.name for i in self.supervisor.instances.values() if i.assigned},
            on_change=self.changed,
            refused=lambda: self.publisher is not None and self.publisher.refused_by is not None,
        )
        self.models.start()
        teardown.step("stop following assignments", self.models.stop)

    def _open_keys(self) -> None:
        """The hop secret, and a standalone agent's keys file: unreadable ones stop the start
        (exit 78), as nothing may fall back to letting everyone in."""
        if self.key_gate is None:
            return
        self.key_gate.journal = self.usage_journal
        try:
            self.key_gate.load_hop_secret()
            if self.cfg.auth.keys_file and not self.cfg.cluster.enabled:
                self.key_source = FileKeySource(Path(self.cfg.auth.keys_file))
        except (OSError, HopAuthError, KeysFileError) as e:
            raise StartupError(str(e), EX_CONFIG) from None
        if self.key_gate.keys_required:
            log.info("API keys required on the OpenAI routes", source="etcd" if self.cfg.cluster.enabled else "file")

    def _reload_keys(self) -> None:
        """After a reload: the hop secret and keys file read again; an unreadable one keeps the
        one in force (and says so)."""
        if self.key_gate is None:
            return
        try:
            self.key_gate.load_hop_secret()
        except (OSError, HopAuthError) as e:
            log.error("hop secret not reloaded; the one in force stays", error=str(e))
        if self.cfg.cluster.enabled:
            return
        path = self.cfg.auth.keys_file
        source = self.key_source
        if isinstance(source, FileKeySource) and path and source.path == Path(path):
            source.reload()
            return
        try:
            self.key_source = FileKeySource(Path(path)) if path else None
        except KeysFileError as e:
            log.error("keys file not loaded; the keys in force stay", error=str(e))

    def _reload_tls(self) -> None:
        """After a reload: the certificate, key and CA files read again (rotated in place, as
        certbot or the playbook do); one that does not load keeps the one in force (and says so)."""
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except TlsError as e:
            log.error("TLS files not reloaded; the certificate in force stays", error=str(e))
            return
        log.info("TLS files reloaded", cert_file=self.tls.section.cert_file)

    def _open_usage_journal(self, teardown: Teardown) -> None:
        """The usage journal (agent/keys/journal.py). An agent that needs keys and cannot keep
        it does not start: 78 when the directory is unusable (fix the config or its modes), 69
        otherwise (a full disk: systemd starts it again); an open one runs without it."""
        journal = UsageJournal(Path(self.cfg.agent.state_dir) / "usage")
        try:
            journal.open()
        except OSError as e:
            if effective_mode(self.cfg.auth, self.cfg.agent.listen_host) == "keys":
                unusable = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)
                code = EX_CONFIG if unusable else EX_UNAVAILABLE
                raise StartupError(f"cannot keep the usage journal in {journal.directory}: {e}", code) from None
            log.warning("no usage journal: API key usage would not be kept", dir=str(journal.directory), error=str(e))
            return
        self.usage_journal = journal
        teardown.step("close the usage journal", journal.close)

    def _roll_usage(self, teardown: Teardown, store: UsageStore) -> None:
        """Roll the journal up into the node's usage record (etcd, or rolled.json standalone)."""
        if self.usage_journal is None:
            return
        roller = UsageRoller(self.usage_journal, store, self.cfg.node_id)
        roller.start()
        teardown.step("roll usage up a last time", roller.stop)

    async def _start_supervisor(self, teardown: Teardown) -> None:
        # Registered before the start: a start that fails half-way stops what it started.
        teardown.step("stop the instances", self._stop_instances)
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

    async def _listen(self, runner: web.AppRunner) -> None:
        """Serve on a new socket (failing fast if the port is taken) and hand it to systemd,
        so the next agent serves on it without refusing anyone in between."""
        site = await self.listen(runner, *self.listen_address(), backlog=self.cfg.api.backlog, tls=self.tls)
        server = site._server
        if server is not None and self.fdstore.enabled:
            for listening in server.sockets:  # type: ignore[attr-defined]
                self.fdstore.store(API, listening.fileno())

    async def ready_status(self) -> str:
        return await self.supervisor.tick()

    async def tick(self) -> Tick:
        status = await self.supervisor.tick() + self._reload_notes()
        if self.publisher is not None:
            self.publisher.poke()
            status += f"; etcd {self.publisher.state}"
        if dead := self.supervision_failures():
            # No WATCHDOG=1: systemd restarts the agent, and the next one adopts the servers.
            self._say_dead(dead)
            return Tick(f"supervision failed for {', '.join(sorted(dead))}; {status}", healthy=False)
        return Tick(status)

    def _say_dead(self, dead: dict[str, str]) -> None:
        for name, error in dead.items():
            if name not in self._said_dead:
                self._said_dead.add(name)
                log.critical(
                    "instance supervision loop died; /healthz fails until a restart", instance=name, error=error
                )

    async def _stop_instances(self) -> None:
        if self.serving_stopped_for_handover():
            n = await self.supervisor.detach()
            log.info("leaving the model servers to the next agent", servers=n)
        else:
            await self.supervisor.stop()

    async def _drain_for_handover(self) -> None:
        """Stop accepting (new connections wait in the socket's backlog for the next agent) and
        let the connections we hold end cleanly while everything still serves: a kept-alive
        connection closed under a client sending on it fails that request (see
        ConnectionGuard.drain)."""
        if not self.serving_stopped_for_handover() or self._runner is None or self.http_guard is None:
            return
        for site in list(self._runner.sites):
            await site.stop()
        left = await self.http_guard.drain(idle_s=HANDOVER_IDLE_S, timeout_s=HANDOVER_DRAIN_S)
        log.info("connections handed over", still_open=left)

    # --- reload ---------------------------------------------------------------------------------

    def reload_crashed(self, error: Exception) -> ReloadOutcome:
        return self._refused("internal_error", [f"unexpected error: {type(error).__name__}: {error}"], 500)

    def reload_status(self) -> str:
        summary = self.supervisor.summary() + self._reload_notes(ready=False)
        failed = f"reload failed: {self.reload_failure}; running config kept; " if self.reload_failure else ""
        return failed + summary

    async def reload_config(self) -> ReloadOutcome:
        try:
            new = load_config(self.cfg.source_path)
        except ConfigError as e:
            return self._refused("config_invalid", str(e).splitlines())
        try:
            plan = await self.supervisor.reload(new)
        except PlanError as e:
            return self._refused(e.code, e.problems)
        self.cfg = self.supervisor.cfg
        self._reload_keys()
        self._reload_tls()
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
