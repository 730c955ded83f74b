"""What every local daemon of the harness shares: free loopback ports, waiting on a condition with a
deadline, and :class:`Daemon`, one process with a log file that can be stopped, killed and signalled.

No fixed sleeps anywhere in the harness: every wait is "until this condition holds, or fail after a
deadline", with a short poll interval, so a fleet starts as fast as the machine allows and still
starts when it is loaded. Failures raise :class:`FleetError` with the daemon's log tail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any

import aiohttp


class FleetError(AssertionError):
    """A local daemon did not start, exited, or a wait ran past its deadline.

    An AssertionError so that pytest reports it as a failed check with the message (the log
    tail), as the test harness always did; the demo and the benchmarks catch it by this name."""


_handed_out: collections.deque[int] = collections.deque(maxlen=4096)


def free_port() -> int:
    """A loopback port free now, and not one this process handed out recently: the socket is
    closed before the caller binds the port, so two calls in a row can get the same port from
    the kernel (an etcd member once got it for both its client and peer listeners)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.append(port)
            return port
    raise FleetError("no free port that was not handed out already")


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to outgoing connections and to ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Port blocks come from below the kernel's ephemeral range, walked with a cursor: the kernel never
# hands those ports to a client connection or to free_port(), so a block cannot collide with them,
# and walking instead of drawing at random means a process never needs a window that avoids every
# port it handed out before (with thousands of scattered single ports handed out, a random 260-port
# window free of all of them was practically never found: CI failed with "no free port block").
_BLOCK_FLOOR = 10000
_block_cursor: list[int] = []


def free_port_block(span: int = 20) -> int:
    """A base port whose next ``span`` ports are free now (agents side by side, each with a block
    of ports for its model servers). Successive calls in one process get disjoint blocks until the
    range below the ephemeral ports wraps around; each process starts at its own offset (by pid),
    and a port some other process holds is skipped by trying to bind it."""
    ceiling = _ephemeral_floor()
    size = ceiling - _BLOCK_FLOOR
    if span > size:
        raise FleetError(f"no port block of {span} below the ephemeral range ({_BLOCK_FLOOR}-{ceiling})")
    if not _block_cursor:
        _block_cursor.append(_BLOCK_FLOOR + (os.getpid() * 7919) % size)
    for _ in range(2 * size // span + 2):
        base = _block_cursor[0]
        if base + span > ceiling:
            base = _BLOCK_FLOOR
        _block_cursor[0] = base + span
        if all(_bindable(p) for p in range(base, base + span)):
            return base
    raise FleetError(f"no free port block of {span} below {ceiling}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        # As the servers bind (asyncio sets SO_REUSEADDR): a port with connections in TIME_WAIT
        # is free for them, and on a busy machine many ports have some.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def wait_until(
    cond: Callable[[], Awaitable[Any] | Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with the last value after ``timeout``.
    A refused connection or a timeout counts as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
            if asyncio.iscoroutine(last) or isinstance(last, Awaitable):
                last = await last
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            last = e  # not there yet (connection refused, ...): keep waiting
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise FleetError(f"timed out after {timeout}s waiting for {what or cond}; last: {last!r}")
        await asyncio.sleep(interval)


def wait_for(
    cond: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "",
    daemons: Sequence[Daemon] = (),
    interval: float = 0.05,
) -> Any:
    """:func:`wait_until` for synchronous callers (module-scoped fixtures, the demo, benchmarks);
    fails at once, with its log tail, when one of ``daemons`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        for d in daemons:
            d.check()
        try:
            last = cond()
        except OSError as e:  # urllib's errors (refused, HTTP 503) are OSErrors: not yet
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise FleetError(f"timed out after {timeout}s waiting for {what or cond}; last: {last!r}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (it holds no GPU memory); it waits for its reaper.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


class Daemon:
    """One local process started from :meth:`argv`, its output appended to ``log_path``.

    ``wrapper`` goes before the command (``unshare``, ``ip netns exec NS``, ``env`` with
    libfaketime). With ``new_session`` the process leads a session of its own and signals go to
    its whole process group: a SIGKILL takes the model servers an agent started with it (the
    demo's chaos), and Ctrl-C in the demo's terminal reaches the demo alone, which then stops
    what it started in order."""

    name = "daemon"
    stop_timeout = 30.0

    def __init__(
        self,
        log_path: Path,
        *,
        wrapper: list[str] | None = None,
        env: dict[str, str] | None = None,
        new_session: bool = False,
    ) -> None:
        self.log_path = log_path
        self.wrapper = list(wrapper or [])
        self.env = {**os.environ, **(env or {})}
        self.new_session = new_session
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Any:
        """Start the process (again, after stop/kill: same config, ports and data)."""
        if self.running():
            raise FleetError(f"{self.name} is already running")
        self._close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, *self.argv()],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=self.new_session,
        )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise FleetError(f"{self.name} was never started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Raise with the log tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise FleetError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def send(self, sig: int) -> None:
        if not self.running():
            return
        with contextlib.suppress(ProcessLookupError):
            if self.new_session:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def sigstop(self) -> None:
        self.send(signal.SIGSTOP)

    def sigcont(self) -> None:
        self.send(signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM without waiting (after SIGCONT, in case it is stopped): :func:`stop_all`."""
        self.send(signal.SIGCONT)
        self.send(signal.SIGTERM)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (the graceful path), SIGKILL if it lingers past ``timeout``; reap, close the log."""
        self.terminate()
        self._reap(self.stop_timeout if timeout is None else timeout)

    def kill(self) -> None:
        """SIGKILL and reap (a stopped process dies too)."""
        self.send(signal.SIGKILL)
        self._reap(None)

    def _reap(self, timeout: float | None) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []


def stop_all(daemons: Sequence[Daemon], timeout: float = 45.0) -> None:
    """SIGTERM every daemon at once (in reverse order of start), then wait for all of them within one
    ``timeout``; whatever is left is SIGKILLed. Faster than stopping them one by one: agents take
    a moment each to stop their model servers."""
    for d in reversed(daemons):
        d.terminate()
    deadline = time.monotonic() + timeout
    for d in reversed(daemons):
        d._reap(max(0.1, deadline - time.monotonic()))
