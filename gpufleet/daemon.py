"""The daemons' one skeleton: gpu-agent and gpu-coordinator are subclasses of :class:`DaemonBase`.

Patroni's ``AbstractPatroniDaemon`` is the model: the base owns the life of the process, and a
daemon says only what is its own. The base does, in this order:

- log ``<prog> starting``; :meth:`DaemonBase.start` the daemon's resources, each registering its
  teardown on a :class:`Teardown` stack right where it is started; a :class:`StartupError` is
  logged ("cannot start") and its exit code returned after what was started is torn down
  (:meth:`DaemonBase.listen` raises one with 71, EX_OSERR, when the port is taken, and
  :meth:`DaemonBase.open_tls` one with 78 when a certificate or key does not load);
- SIGTERM/SIGINT stop; SIGHUP reloads, if the daemon :attr:`~DaemonBase.reloads`;
- ``READY=1`` with :meth:`DaemonBase.ready_status`, then the tick loop: :meth:`DaemonBase.tick` every
  :attr:`~DaemonBase.tick_interval` (at least twice per watchdog period) or sooner when
  :meth:`DaemonBase.tick_soon` is called; ``STATUS=`` after each, and ``WATCHDOG=1`` unless the tick
  says the daemon is unhealthy (then systemd's watchdog restarts it). A tick loop that dies is
  logged and the daemon exits 70 (EX_SOFTWARE): systemd restarts it, it never lingers;
- reloads (SIGHUP or an API call) run one at a time, each to its end once begun, between
  ``RELOADING=1`` and ``READY=1`` whatever the outcome; a bug in one is logged and answered with
  :meth:`DaemonBase.reload_crashed`; shutdown waits for a reload in progress;
- at the stop: ``STOPPING=1``, then the teardown steps in reverse order of their start. A step
  that fails is logged and the rest still run (the exit code is then 70).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from aiohttp import web

from gpufleet import __version__
from gpufleet.facts import EX_CONFIG, EX_OSERR, EX_SOFTWARE
from gpufleet.httpserver import ConnectionGuard, GuardedRunner
from gpufleet.sdnotify import SystemdNotifier
from gpufleet.tlsconfig import ServerTls, TlsError, TlsSection

T = TypeVar("T")
R = TypeVar("R")  # what a reload answers (the agent's admin API returns it)


class StartupError(Exception):
    """The daemon cannot start; ``exit_code`` tells systemd whether to retry (78: do not)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Tick(NamedTuple):
    status: str  # systemd's STATUS= line
    healthy: bool = True  # False: no WATCHDOG=1 this time, so systemd's watchdog restarts us


class Teardown(contextlib.AsyncExitStack):
    """Paired start-up and teardown: whatever starts a resource registers its teardown here at
    once, and the steps run in reverse order at the stop (or after a failed start, for what had
    started). Each step runs whatever the others did: one that raises is logged by name and
    recorded in :attr:`failed`, and the next still runs."""

    def __init__(self, log: Any) -> None:
        super().__init__()
        self._log = log
        self.failed: list[str] = []

    def step(self, what: str, fn: Callable[..., object], *args: object) -> None:
        """Call ``fn(*args)`` (awaiting it if it returns an awaitable) at the teardown."""

        async def run() -> None:
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception as e:  # the next steps (closing sockets, stopping servers) still matter
                self.failed.append(what)
                self._log.exception(
                    "teardown step failed; the others still run", step=what, error=f"{type(e).__name__}: {e}"
                )

        self.push_async_callback(run)

    async def context(self, what: str, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager now and exit it as a teardown step."""
        value = await cm.__aenter__()
        self.step(what, cm.__aexit__, None, None, None)
        return value


class DaemonBase(abc.ABC, Generic[R]):
    """The base of a long-running gpufleet daemon. A subclass sets :attr:`prog` and
    :attr:`log` and implements :meth:`start`, :meth:`ready_status`, :meth:`tick`,
    :meth:`listen_address` and :meth:`identity`; one that :attr:`reloads` also implements
    :meth:`reload_config`, :meth:`reload_crashed` and :meth:`reload_status`."""

    prog: ClassVar[str]  # "gpu-agent": in the start/serving/stop log lines
    log: ClassVar[Any]  # the daemon's structlog logger
    reloads: ClassVar[bool] = False  # SIGHUP reloads; without it SIGHUP keeps its default action

    def __init__(self, notifier: SystemdNotifier | None, interval_s: float) -> None:
        self.notifier = notifier or SystemdNotifier()
        self.tick_interval = interval_s
        if self.notifier.watchdog_usec:
            # Tick at least twice per watchdog period so one slow tick does not trip it.
            self.tick_interval = min(self.tick_interval, self.notifier.watchdog_usec / 2e6)
        self.serving = False
        self.serving_was_up = False  # a start that failed half-way never served
        self._stop = asyncio.Event()
        self._tick_now = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[R]] = set()  # held until done (see spawn_reload)

    # --- what a daemon says about itself --------------------------------------------------------

    @abc.abstractmethod
    async def start(self, teardown: Teardown) -> None:
        """Start everything; register each teardown on ``teardown`` as it starts. Raise
        :class:`StartupError` to exit with its code."""
        raise NotImplementedError

    @abc.abstractmethod
    async def ready_status(self) -> str:
        """STATUS= sent with READY=1."""
        raise NotImplementedError

    @abc.abstractmethod
    async def tick(self) -> Tick:
        """One pass of the tick loop."""
        raise NotImplementedError

    @abc.abstractmethod
    def listen_address(self) -> tuple[str, int]:
        raise NotImplementedError

    def identity(self) -> dict[str, object]:
        """Fields of the "starting" log line besides the version."""
        return {}

    async def reload_config(self) -> R:
        raise NotImplementedError

    def reload_crashed(self, error: Exception) -> R:
        """The answer to a reload that failed with an unexpected error (a bug)."""
        raise NotImplementedError

    def reload_status(self) -> str:
        """STATUS= sent with the READY=1 that ends every reload."""
        raise NotImplementedError

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> int:
        """The daemon's whole life; returns the process's exit code."""
        self.log.info(f"{self.prog} starting", version=__version__, **self.identity())
        loop = asyncio.get_running_loop()
        signals = [signal.SIGTERM, signal.SIGINT, *([signal.SIGHUP] if self.reloads else [])]
        try:
            async with Teardown(self.log) as teardown:
                try:
                    await self.start(teardown)
                except StartupError as e:
                    self.log.error("cannot start", error=str(e))
                    return e.exit_code
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.request_stop)
                if self.reloads:
                    loop.add_signal_handler(signal.SIGHUP, self.spawn_reload)
                self.serving = self.serving_was_up = True
                self.notifier.ready(await self.ready_status())
                host, port = self.listen_address()
                self.log.info(f"{self.prog} serving", listen=f"{host}:{port}")
                code = 0
                try:
                    await self._tick_loop()
                except Exception as e:  # the daemon's heart is gone: exit for systemd to restart it
                    self.log.critical("tick loop died; exiting", error=f"{type(e).__name__}: {e}", exc_info=True)
                    code = EX_SOFTWARE
                self.log.info(f"{self.prog} stopping")
                await asyncio.gather(*self._reloads, return_exceptions=True)  # a reload ends whole, then we stop
                self.serving = False
                self.notifier.stopping()
        finally:
            # A second SIGTERM during the teardown changes nothing (the handlers stay until here).
            for sig in signals:
                loop.remove_signal_handler(sig)
        if teardown.failed and code == 0:
            code = EX_SOFTWARE
        self.log.info(f"{self.prog} stopped")
        return code

    def request_stop(self) -> None:
        self._stop.set()

    def tick_soon(self) -> None:
        """Run the next tick now rather than at the end of the interval."""
        self._tick_now.set()

    async def _tick_loop(self) -> None:
        while not self._stop.is_set():
            waiters = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._tick_now.wait())]
            await asyncio.wait(waiters, timeout=self.tick_interval, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            self._tick_now.clear()
            if self._stop.is_set():
                break
            tick = await self.tick()
            self.notifier.status(tick.status)
            if tick.healthy:
                self.notifier.watchdog()

    # --- the HTTP API ---------------------------------------------------------------------------

    async def http_runner(
        self, teardown: Teardown, app: web.Application, guard: ConnectionGuard, **kwargs: Any
    ) -> web.AppRunner:
        """The API's runner, set up (the app's startup and cleanup_ctx run), its cleanup a
        teardown step. Signals are the daemon's, not aiohttp's."""
        runner = GuardedRunner(app, guard, access_log=None, handle_signals=False, **kwargs)
        await runner.setup()
        teardown.step("stop the HTTP API", runner.cleanup)
        return runner

    def open_tls(self, section: TlsSection) -> ServerTls | None:
        """The port's TLS contexts (None: plain HTTP), or fail the start with 78 (EX_CONFIG)
        naming the field of a certificate, key or CA file that does not load."""
        if not section.enabled and not section.ca_file:
            return None
        try:
            return ServerTls(section)
        except TlsError as e:
            raise StartupError(str(e), EX_CONFIG) from None

    async def listen(
        self, runner: web.AppRunner, host: str, port: int, backlog: int, tls: ServerTls | None = None
    ) -> web.TCPSite:
        """Serve on host:port (HTTPS when ``tls`` has a certificate), or fail the start with 71
        (EX_OSERR) if the port is taken."""
        ssl_context = tls.server if tls is not None else None
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=backlog, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e}", EX_OSERR) from None
        return site

    # --- reload ---------------------------------------------------------------------------------

    async def reload(self) -> R:
        """Reload now (the admin API). The reload runs to its end even if the caller is
        cancelled (an HTTP client that went away): a reload cut in the middle is what
        all-or-nothing rules out."""
        return await asyncio.shield(self.spawn_reload())

    def spawn_reload(self) -> asyncio.Task[R]:
        """Also SIGHUP's handler. The task is held until done: one nobody references can be
        garbage-collected mid-way, and one nobody awaits reports its exception only as "Task
        exception was never retrieved"."""
        task = asyncio.create_task(self._reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)
        return task

    async def _reload(self) -> R:
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                outcome = await self.reload_config()
            except Exception as e:  # a bug: say so, and never leave systemd waiting in "reloading"
                self.log.exception("reload failed unexpectedly", error=f"{type(e).__name__}: {e}")
                outcome = self.reload_crashed(e)
            finally:
                # systemd hears READY=1 after RELOADING=1 whatever happened.
                self.notifier.ready(self.reload_status())
            return outcome
