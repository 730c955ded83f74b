"""The daemons' one skeleton (gpufleet/daemon.py), in this process with a toy daemon: start-up
and teardown in pairs, signals, the tick loop and what systemd hears, reloads, exit codes.

The agent and the coordinator are tested on it as processes (test_agent_supervision.py,
test_handover.py, test_coordinator.py, faults/test_bad_reload.py); this pins the base's own
contract, including what those cannot easily provoke: a teardown step that fails, a tick loop
that dies, a reload that crashes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from helpers import free_port, wait_until
from structlog.testing import capture_logs

from gpufleet.daemon import DaemonBase, StartupError, Teardown, Tick
from gpufleet.facts import EX_OSERR, EX_SOFTWARE, EX_UNAVAILABLE
from gpufleet.httpserver import ApiSection, listener_guard
from gpufleet.sdnotify import SystemdNotifier


class Recorder(SystemdNotifier):
    """Keeps what would go to systemd, one message per notify call."""

    def __init__(self, watchdog_usec: int | None = None) -> None:
        super().__init__(address="")
        self.watchdog_usec = watchdog_usec
        self.sent: list[str] = []

    def notify(self, *fields: str) -> bool:
        self.sent.append("\n".join(fields))
        return True

    def starting(self, prefix: str) -> list[str]:
        return [m for m in self.sent if m.startswith(prefix)]


class Toy(DaemonBase[str]):
    """A daemon with a web app, two teardown steps around it, and knobs to make it fail."""

    prog = "toy"
    log = structlog.get_logger("toy")
    reloads = True

    def __init__(self, notifier: Recorder, port: int, *, interval_s: float = 30.0) -> None:
        super().__init__(notifier, interval_s)
        self.port = port
        self.events: list[str] = []
        self.ticks = 0
        self.healthy = True
        self.fail_start_with: int | None = None
        self.fail_step = False
        self.fail_tick = False
        self.reload_gate: asyncio.Event | None = None  # a reload waits on it
        self.fail_reload = False

    async def start(self, teardown: Teardown) -> None:
        self.events.append("open a")
        teardown.step("close a", self.events.append, "close a")
        if self.fail_start_with is not None:
            raise StartupError("no such device", self.fail_start_with)
        app = web.Application()

        async def hello(_: web.Request) -> web.Response:
            return web.Response(text="hi")

        app.router.add_get("/", hello)

        async def app_ctx(_: web.Application) -> AsyncIterator[None]:
            self.events.append("app up")
            yield
            self.events.append("app down")

        app.cleanup_ctx.append(app_ctx)
        runner = await self.http_runner(teardown, app, listener_guard(ApiSection(), fds_per_connection=1))
        await self.listen(runner, "127.0.0.1", self.port, backlog=16)
        self.events.append("open b")
        teardown.step("close b", self._close_b)

    async def _close_b(self) -> None:
        if self.fail_step:
            raise RuntimeError("b would not close")
        self.events.append("close b")

    async def ready_status(self) -> str:
        return "up"

    async def tick(self) -> Tick:
        if self.fail_tick:
            raise RuntimeError("tick broke")
        self.ticks += 1
        return Tick(f"tick {self.ticks}", healthy=self.healthy)

    def listen_address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    async def reload_config(self) -> str:
        self.events.append("reload begins")
        if self.reload_gate is not None:
            await self.reload_gate.wait()
        if self.fail_reload:
            raise ValueError("bug")
        self.events.append("reload ends")
        return "applied"

    def reload_crashed(self, error: Exception) -> str:
        return f"crashed: {error}"

    def reload_status(self) -> str:
        return "reloaded"


async def _get(port: int) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as r:
        return r.status == 200


async def _started(d: Toy, n: Recorder) -> asyncio.Task[int]:
    run = asyncio.create_task(d.run())
    await wait_until(lambda: run.done() or n.starting("READY=1"), timeout=10, what="READY=1")
    assert not run.done(), run.result()
    return run


async def test_lifecycle_signals_and_what_systemd_hears() -> None:
    n = Recorder(watchdog_usec=2_000_000)
    port = free_port()
    d = Toy(n, port)
    assert d.tick_interval == 1.0  # twice per watchdog period
    run = await _started(d, n)
    assert n.sent[0] == "READY=1\nSTATUS=up" and d.serving
    assert d.events == ["open a", "app up", "open b"]
    assert await _get(port)
    d.tick_soon()  # no need to wait out the interval
    await wait_until(lambda: "STATUS=tick 1" in n.sent, timeout=5, what="a tick")
    assert n.sent[-1] == "WATCHDOG=1"
    d.healthy = False  # an unhealthy tick says so in STATUS= and keeps back the watchdog ping
    d.tick_soon()
    await wait_until(lambda: "STATUS=tick 2" in n.sent, timeout=5, what="a second tick")
    assert n.sent[-1] == "STATUS=tick 2" and n.sent.count("WATCHDOG=1") == 1

    os.kill(os.getpid(), signal.SIGTERM)  # the handler stops the daemon, as systemd's stop does
    assert await asyncio.wait_for(run, 10) == 0
    assert n.sent[-1] == "STOPPING=1" and not d.serving
    # Torn down in reverse order of the start; the app's cleanup_ctx with the runner.
    assert d.events == ["open a", "app up", "open b", "close b", "app down", "close a"]
    assert not await _port_open(port)
    # The handlers went with the daemon: none left on this loop.
    loop = asyncio.get_running_loop()
    assert not any(loop.remove_signal_handler(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))


async def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_sighup_reloads_one_at_a_time_between_reloading_and_ready() -> None:
    n = Recorder()
    d = Toy(n, free_port())
    run = await _started(d, n)
    d.reload_gate = asyncio.Event()
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_until(lambda: "reload begins" in d.events, timeout=5, what="the reload")
    assert n.sent[-1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    second = asyncio.create_task(d.reload())  # as the admin API calls it: waits for the first
    await asyncio.sleep(0)
    assert d.events.count("reload begins") == 1
    d.reload_gate.set()
    assert await asyncio.wait_for(second, 5) == "applied"
    assert d.events[-4:] == ["reload begins", "reload ends", "reload begins", "reload ends"]
    assert n.starting("RELOADING=1")[1:] and n.sent[-1] == "READY=1\nSTATUS=reloaded"

    # A bug in a reload is answered and logged; systemd still hears READY=1.
    d.fail_reload = True
    with capture_logs() as logs:
        assert await d.reload() == "crashed: bug"
    assert [e["event"] for e in logs] == ["reload failed unexpectedly"]
    assert n.sent[-1] == "READY=1\nSTATUS=reloaded"

    # A stop waits for a reload in progress to end whole.
    d.fail_reload = False
    d.reload_gate = asyncio.Event()
    reload = d.spawn_reload()
    await wait_until(lambda: d.events.count("reload begins") == 4, timeout=5, what="the last reload")
    with capture_logs() as logs:
        d.request_stop()
        await wait_until(lambda: {"event": "toy stopping", "log_level": "info"} in logs, timeout=5, what="stopping")
        assert not run.done() and "STOPPING=1" not in n.sent
        d.reload_gate.set()
        assert await asyncio.wait_for(run, 10) == 0
    assert reload.result() == "applied" and d.events[-4:] == ["reload ends", "close b", "app down", "close a"]


async def test_a_failing_teardown_step_does_not_skip_the_rest() -> None:
    n = Recorder()
    d = Toy(n, free_port())
    d.fail_step = True
    run = await _started(d, n)
    with capture_logs() as logs:
        d.request_stop()
        assert await asyncio.wait_for(run, 10) == EX_SOFTWARE
    assert d.events[-2:] == ["app down", "close a"]
    [failed] = [e for e in logs if e["event"] == "teardown step failed; the others still run"]
    assert failed["step"] == "close b" and "b would not close" in failed["error"]


async def test_a_failed_start_tears_down_what_started_and_exits_with_its_code() -> None:
    n = Recorder()
    d = Toy(n, free_port())
    d.fail_start_with = EX_UNAVAILABLE
    with capture_logs() as logs:
        assert await d.run() == EX_UNAVAILABLE
    assert d.events == ["open a", "close a"]
    assert not n.starting("READY=1") and not d.serving_was_up
    assert {"event": "cannot start", "error": "no such device", "log_level": "error"} in logs


async def test_a_taken_port_exits_71() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        n = Recorder()
        d = Toy(n, port)
        with capture_logs() as logs:
            assert await d.run() == EX_OSERR
    [err] = [e for e in logs if e["event"] == "cannot start"]
    assert err["error"].startswith(f"cannot listen on 127.0.0.1:{port}: ")
    assert d.events == ["open a", "app up", "app down", "close a"]  # the runner was set up: cleaned up
    assert not n.sent


async def test_a_dead_tick_loop_exits_70_after_the_teardown() -> None:
    n = Recorder()
    d = Toy(n, free_port())
    run = await _started(d, n)
    d.fail_tick = True
    with capture_logs() as logs:
        d.tick_soon()
        assert await asyncio.wait_for(run, 10) == EX_SOFTWARE
    assert "tick loop died; exiting" in [e["event"] for e in logs]
    assert n.sent[-1] == "STOPPING=1" and d.events[-1] == "close a"


async def test_sighup_is_left_alone_by_a_daemon_that_does_not_reload() -> None:
    class Fixed(Toy):
        reloads = False

    n = Recorder()
    d = Fixed(n, free_port())
    run = await _started(d, n)
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)  # none was installed
    d.request_stop()
    assert await asyncio.wait_for(run, 10) == 0


async def test_ticks_run_on_the_interval() -> None:
    n = Recorder()
    d = Toy(n, free_port(), interval_s=0.05)
    run = await _started(d, n)
    await wait_until(lambda: d.ticks >= 3, timeout=5, what="three ticks without a wake-up")
    d.request_stop()
    assert await asyncio.wait_for(run, 10) == 0
