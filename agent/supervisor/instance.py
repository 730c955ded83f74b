"""One supervised model-server instance and its lifecycle loop.

    STARTING --health ok--> WARMING --warm-up ok--> READY
        |                      |                      | 3 failed probes / process exit
        +----- failure --------+----------------------+--> UNHEALTHY --> RESTARTING (back-off)
                                                                            | crash loop
                                                                            v
                                                                          FAILED

Operator commands (start/stop/restart) wake the loop wherever it waits. Every wait in the loop
is bounded, and a failure of one instance never touches another.

*In rotation* (routable) is narrower than READY: a READY instance whose last probe failed, or
that real requests found failing, takes no new requests, and attempts on it that have not
answered yet are abandoned and retried elsewhere (rotation.py), so a frozen server costs its
in-flight requests seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import msgspec
import structlog

from agent.backends import Backend, Judgement, Upstream, get_backend
from agent.config import InstanceConfig, SupervisorSection
from gpufleet.keyspace.records import InstanceLoad, InstanceRecord
from gpufleet.tasks import wait_set

from .ports import port_is_free
from .process import ChildProcess, RotatingLog, spawn
from .rotation import Rotation
from .supervision_policy import HealthWindow, InstanceState, OutlierPolicy, RestartPolicy

if TYPE_CHECKING:
    from .supervisor import Supervisor

Command = Literal["start", "stop", "restart"]
# After a failed probe the next comes this soon (at most), so a hung server is restarted in a
# few seconds and a passing one is back in rotation at once.
RECHECK_S = 1.0


class _Interrupted(Exception):
    """An operator command arrived; unwind to the top of the loop."""


class Instance:
    def __init__(self, cfg: InstanceConfig, port: int, host: Supervisor, *, assigned: bool = False) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.assigned = assigned  # started for the leader's assignment, not from the config file
        self.port = port
        self.host = host
        self.backend: Backend = get_backend(cfg.backend)
        self.log = structlog.get_logger("agent.instance").bind(instance=cfg.name, model=cfg.client_model)
        self.state = InstanceState.STOPPED
        self.state_since = time.time()
        self._ready_since: float | None = None
        self.last_error: str | None = None
        self.restarts = 0
        self.load: InstanceLoad | None = None
        self.child: ChildProcess | None = None
        self.health = HealthWindow(self.sup.failure_threshold, self.sup.recovery_window)
        self.rotation = Rotation(self.log)
        self.policy = self._new_policy()
        self._want: Command = "start" if cfg.autostart else "stop"
        self._pending: Command | None = None
        self._wake = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.upstream = self._upstream(None)  # the key is read at each start (it may rotate)
        self.output = RotatingLog(host.log_dir / f"{cfg.name}.log", self.sup.log_max_bytes, self.sup.log_backups)

    # --- public -------------------------------------------------------------------------

    @property
    def wanted_running(self) -> bool:
        return self._want == "start"

    @property
    def sup(self) -> SupervisorSection:
        return self.host.cfg.supervisor

    @property
    def base_url(self) -> str:
        return self.upstream.base_url

    def _upstream(self, key: str | None) -> Upstream:
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::") else "127.0.0.1"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return Upstream(f"http://{host}:{self.port}", headers)

    def start_task(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"instance:{self.name}")
        self._task.add_done_callback(self._loop_ended)

    @property
    def loop_failure(self) -> str | None:
        """Why this instance's lifecycle loop died, if it did. The loop catches its own errors,
        so this is a bug: nothing probes, restarts or stops the server any more."""
        task = self._task
        if task is None or not task.done() or task.cancelled() or (exc := task.exception()) is None:
            return None
        return f"{type(exc).__name__}: {exc}"

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        # Whatever state it was in is no longer known (the server may have died since): say
        # FAILED, so neither this node's proxy nor the leader routes to it; the agent's
        # /healthz fails and the watchdog restarts the agent, whose successor adopts the server.
        if (why := self.loop_failure) is not None:
            self._set_state(InstanceState.FAILED, f"supervision loop died: {why}")

    def command(self, cmd: Command) -> None:
        """start / stop / restart, as an operator asked. Returns at once; the loop acts."""
        if cmd in ("start", "restart"):
            self.policy.reset()
        self._want = "stop" if cmd == "stop" else "start"
        self._pending = cmd
        self._wake.set()

    def judge(self, status: int, body: bytes) -> Judgement:
        return self.backend.judge(status, body)

    def request_probe(self) -> None:
        """Passive health: a caller saw this instance fail; probe it now, not at the next tick."""
        self._probe_now.set()

    # --- rotation (what the proxy may send requests to) ------------------------------------

    def routable(self, in_flight: int, *, suspect_ok: bool = False) -> bool:
        """May the proxy send it a request? ``in_flight``: the proxy's requests on it now (a
        half-open instance takes one trial at a time). ``suspect_ok``: even though its last probe
        failed (when nothing else can serve: one slow probe answer must not turn into 503s)."""
        return self.state is InstanceState.READY and self.rotation.routable(in_flight, suspect_ok)

    @property
    def ejected(self) -> bool:
        return self.rotation.ejected

    def watch(self, on_leave: Callable[[], None]) -> None:
        """Call ``on_leave`` if this instance leaves rotation (state, failed probes, ejection)
        before ``unwatch``. A plain callback, not a task per attempt: this is the proxy's hot path."""
        self.rotation.watch(on_leave)

    def unwatch(self, on_leave: Callable[[], None]) -> None:
        self.rotation.unwatch(on_leave)

    # --- outcomes the proxy reports (agent/proxy/upstreams.py: LocalUpstream) -----------------

    def report_success(self) -> None:
        """A real request got its first byte from this instance."""
        self.rotation.success()

    def report_failure(self, detail: str, answered: bool = False) -> bool:
        """A gateway failure of a real request on this instance (timeout, connection refused or
        reset, a 5xx judged its fault: ``answered``). True when it has just been ejected
        (logged, once)."""
        if self.state is not InstanceState.READY:
            return False  # already out; a new run starts with a clean record
        peers = [
            i
            for i in self.host.instances.values()
            if i.cfg.client_model == self.cfg.client_model and i.state is InstanceState.READY
        ]
        ejected = sum(i.ejected for i in peers if i is not self)
        p = self.host.cfg.proxy
        policy = OutlierPolicy(
            p.eject_after_failures, p.eject_base_s, p.eject_max_s, p.max_ejected_fraction, p.restart_after_ejections
        )
        just_ejected = self.rotation.failure(detail, policy, len(peers), ejected, answered)
        if self.rotation.restart_why is not None:
            self._probe_now.set()  # the monitor loop restarts it now
        return just_ejected

    async def shutdown(self) -> None:
        """Stop the process and end the loop (agent exit or instance removed by a reload)."""
        await self._end_loop()
        await self._stop_process("agent shutdown")
        self._set_state(InstanceState.STOPPED)
        self.output.close()

    async def detach(self) -> None:
        """End the loop but leave the server running for the next agent (handover.py)."""
        await self._end_loop()
        if self.child is not None and self.child.returncode is None:
            self.output.mark(f"handed over to the next agent: shim pid {self.child.pid}")
        self.output.close()

    async def _end_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # A loop that died of an error was reported then (loop_failure): a shutdown must
            # still stop its server.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def fingerprint(self) -> str:
        """What must not have changed for the next agent to adopt this instance's server."""
        return hashlib.sha256(msgspec.json.encode(self.cfg)).hexdigest()[:16]

    def record(self) -> InstanceRecord:
        last_error, health_ratio = self.last_error, round(self.health.ratio, 3)
        if self.state is InstanceState.READY and (ejection := self.rotation.describe()) is not None:
            # Ejected, still READY: its state stays (the leader would eject it cluster-wide for
            # 30 s on a state change); a zero health ratio lowers its weight to the floor instead.
            last_error, health_ratio = ejection, 0.0
        return InstanceRecord(
            name=self.name,
            model=self.cfg.client_model,
            backend=self.cfg.backend,
            state=self.state.value,
            state_since=self.state_since,
            port=self.port,
            gpus=list(self.cfg.gpus),
            gpu_memory_fraction=self.cfg.gpu_memory_fraction,
            pid=self.child.server_pid() if self.child and self.child.returncode is None else None,
            restarts=self.restarts,
            last_error=last_error,
            health_ratio=health_ratio,
            load=self.load,
            # requests_total and errors_total are the proxy's counts (ProxyStats.annotate)
            assigned=self.assigned,
        )

    # --- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._cycle()
            except _Interrupted:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must not kill supervision of this instance
                self.log.exception("instance loop error", error=str(e))
                await self._stop_process("internal error")
                self._set_state(InstanceState.RESTARTING, f"internal error: {e}")
                await self._sleep(self.sup.backoff_max_s)

    async def _cycle(self) -> None:
        cmd, self._pending = self._pending, None
        self._wake.clear()
        if self._want == "stop":
            await self._stop_process(f"operator {cmd or 'stop'}")
            self._set_state(InstanceState.STOPPED)
            await self._wait_for_command()
            return
        if cmd == "restart" and self.child is not None:
            await self._stop_process("operator restart")
        if self.state is InstanceState.FAILED and cmd is None:
            await self._wait_for_command()
            return

        failure = await self._start_and_serve()
        # Only failures reach here; commands unwind through _Interrupted.
        ready_for = time.monotonic() - self._ready_since if self._ready_since else 0.0
        self._ready_since = None
        self._set_state(InstanceState.UNHEALTHY, failure)
        self.log.warning("instance unhealthy", reason=failure)
        await self._stop_process(failure, self.sup.failed_stop_grace_s)
        decision = self.policy.on_failure(time.monotonic(), ready_for)
        if decision.give_up:
            self._set_state(InstanceState.FAILED, f"{decision.reason}; last failure: {failure}")
            self.log.error("instance failed", reason=decision.reason)
            await self._wait_for_command()
            return
        self._set_state(InstanceState.RESTARTING, failure)
        self.log.info("restarting after back-off", delay_s=decision.delay_s)
        await self._sleep(decision.delay_s)
        self.restarts += 1

    async def _start_and_serve(self) -> str:
        """Start, gate readiness on health + warm-up, then monitor. Returns the failure reason."""
        refusal = None if self.host.has_adoptable(self.name) else self.host.admit(self)
        if refusal is None and not self.host.has_adoptable(self.name) and not port_is_free(self.port, self.cfg.host):
            refusal = f"port {self.port} is already in use by another process"
        if refusal is not None:
            self._set_state(InstanceState.FAILED, f"refused: {refusal}")
            self.log.error("instance refused", reason=refusal)
            await self._wait_for_command()
            raise _Interrupted

        self.health.reset()
        self.load = None
        self._set_state(InstanceState.STARTING)
        try:
            key = self.backend.api_key(self.cfg)
        except (OSError, ValueError) as e:
            return f"cannot read the instance's API key: {e}"
        self.upstream = self._upstream(key)
        spec = self.backend.launch(self.cfg, self.port)
        env = self.host.child_env(self.cfg, {**spec.env, **self.backend.key_env(self.cfg, key)})
        self.output.new_run()  # error reports quote this run's output, not the last one's
        fingerprint = self.fingerprint()
        adopted = self.host.claim(self.name, fingerprint, self.port, self.output)
        if adopted is not None:
            self.child = adopted
            self.host.cgroup_for(self)  # re-applies the quota if the restart lifted it
            self.log.info("instance adopted from the previous agent", pid=adopted.server_pid(), port=self.port)
        else:
            self.output.mark(f"starting: {' '.join(spec.argv)}")
            try:
                self.child = await spawn(
                    spec.argv, env, self.output, self.host.cgroup_for(self), grace_s=self.sup.stop_grace_s
                )
            except OSError as e:
                return f"cannot start the shim for {spec.argv[0]!r}: {e.strerror or e}"
            self.host.registry.add(self.name, self.child.pid, self.port, fingerprint)
            self.host.hand_over(self.name, self.child)
            self.log.info("instance started", pid=self.child.server_pid(), port=self.port, argv=spec.argv)

        if (failure := await self._await_healthy()) is not None:
            return failure
        self._set_state(InstanceState.WARMING)
        self.host.memory_attach(self)
        # An adopted server has served all along: its warm-up was paid when it first started.
        if adopted is None and (failure := await self._warm_up()) is not None:
            return failure
        self._ready_since = time.monotonic()
        self._set_state(InstanceState.READY)
        self.log.info("instance ready", startup_s=round(time.time() - self._started_wall, 2))
        return await self._monitor()

    async def _await_healthy(self) -> str | None:
        timeout = self.cfg.startup_timeout_s or self.sup.startup_timeout_s
        deadline = time.monotonic() + timeout
        self._started_wall = time.time()
        interval = 0.1  # loading servers are polled fast at first, then every second
        last = ""
        while True:
            if (exited := await self._exit_reason()) is not None:
                return f"exited during start-up: {exited}"
            result = await self.backend.probe(self.host.http, self.upstream, self.cfg, self.sup.probe_timeout_s)
            if result.ok:
                return None
            if result.misconfigured:
                # Say why it is not ready yet (a wrong health_path answers 404 forever): the
                # start-up timeout is minutes away and the state alone says only STARTING.
                self.last_error = f"not ready yet: {result.detail}"
            last = result.detail
            if time.monotonic() >= deadline:
                return f"not ready after {timeout:g}s (last: {last})"
            await self._sleep_or_exit(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, 1.0)

    async def _warm_up(self) -> str | None:
        w = self.cfg.warmup
        if not w.enabled:
            return None
        detail = ""
        for attempt in range(1, w.attempts + 1):
            if (exited := await self._exit_reason()) is not None:
                return f"exited during warm-up: {exited}"
            result = await self.backend.warm_up(self.host.http, self.upstream, self.cfg)
            if result.ok:
                return None
            detail = result.detail
            self.log.warning("warm-up failed", attempt=attempt, detail=detail)
            await self._sleep_or_exit(min(2.0 * attempt, 10.0))
        return f"warm-up failed {w.attempts} times (last: {detail})"

    async def _monitor(self) -> str:
        """Probe every interval (or at once when asked); return when the instance must restart."""
        while True:
            if (exited := await self._exit_reason()) is not None:
                return exited
            if self.rotation.restart_why is not None:
                return self.rotation.restart_why
            ok_result = await self.backend.probe(self.host.http, self.upstream, self.cfg, self.sup.probe_timeout_s)
            if (exited := await self._exit_reason()) is not None:
                return exited
            if ok_result.ok:
                self.health.record(True)
                if self.rotation.probe_failed:
                    self.rotation.probe_failed = False
                    self.log.info("probe passed: back in rotation")
                self.load = await self.backend.read_load(
                    self.host.http, self.upstream, self.cfg, self.sup.probe_timeout_s
                )
            elif self.health.record(False):
                return f"{self.health.consecutive_failures} consecutive failed probes (last: {ok_result.detail})"
            else:
                # No new requests at once (a frozen server holds every request sent to it), but
                # restarted only after failure_threshold probes: one slow answer is not a crash.
                # Requests already on it are abandoned at the second failure in a row: one slow
                # probe answer (a load spike, a GC pause) must not throw away their prefill.
                self.rotation.probe_failed = True
                abandoned = self.rotation.leave() if self.health.consecutive_failures >= 2 else 0
                self.log.warning(
                    "probe failed: out of rotation",
                    detail=ok_result.detail,
                    consecutive=self.health.consecutive_failures,
                    abandoned_requests=abandoned,
                )
            self._probe_now.clear()
            interval = self.sup.probe_interval_s
            await self._sleep_or_exit(
                min(interval, RECHECK_S) if self.rotation.probe_failed else interval, probe_event=True
            )

    # --- helpers ------------------------------------------------------------------------

    async def _exit_reason(self) -> str | None:
        if self.child is None:
            return "process is gone"
        if self.child.returncode is None:
            return None
        await self.child.wait()  # drains what it printed last: usually the reason it died
        return self.child.describe_exit()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake for an operator command."""
        if await wait_set(self._wake, seconds):
            raise _Interrupted

    async def _sleep_or_exit(self, seconds: float, probe_event: bool = False) -> None:
        """Sleep until the timeout, a command, the process exiting, or (optionally) a probe request."""
        waits = [asyncio.ensure_future(self._wake.wait())]
        if self.child is not None and self.child.returncode is None:
            waits.append(asyncio.ensure_future(self.child.wait_exit()))
        if probe_event:
            waits.append(asyncio.ensure_future(self._probe_now.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._wake.is_set():
            raise _Interrupted

    async def _wait_for_command(self) -> None:
        await self._wake.wait()

    async def _stop_process(self, why: str, grace_s: float | None = None) -> None:
        child, self.child = self.child, None
        if child is None:
            return
        self.host.memory_detach(self)
        if grace_s is None and (self.rotation.probe_failed or self.ejected):
            grace_s = self.sup.failed_stop_grace_s  # not answering (an operator's restart of a hung server)
        grace = self.sup.stop_grace_s if grace_s is None else min(grace_s, self.sup.stop_grace_s)
        if child.returncode is None:
            self.log.info("stopping instance", pid=child.pid, reason=why, grace_s=grace)
        await child.stop(grace)
        self.output.mark(f"stopped ({why}): {child.describe_exit()}")
        self.host.forget(self.name)
        self.load = None

    def _set_state(self, state: InstanceState, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if state is self.state:
            return
        self.log.info(
            "state change", state=state.value, previous=self.state.value, **({"error": error} if error else {})
        )
        self.state = state
        self.state_since = time.time()
        if state is InstanceState.READY:  # a new run (or a passed warm-up): a clean slate
            self.rotation.reset()
        else:
            self.rotation.leave()
        self.host.on_state_change(self)

    def _new_policy(self) -> RestartPolicy:
        s = self.sup
        return RestartPolicy(
            initial_s=s.backoff_initial_s,
            max_s=s.backoff_max_s,
            crash_loop_restarts=s.crash_loop_restarts,
            crash_loop_window_s=s.crash_loop_window_s,
            stable_after_s=s.backoff_max_s,
        )
