"""Shared test helpers: the local-fleet harness (gpufleet_dev.localfleet) under the names the tests
import, and test-only helpers (NotifySocket: systemd's end of NOTIFY_SOCKET).

No fixed sleeps: every wait is "until this condition holds, or fail after a deadline", with a
short poll interval, so tests are as fast as the machine allows and still pass when it is loaded.
"""

from __future__ import annotations

import array
import os
import socket
import threading
from pathlib import Path

from gpufleet_dev.localfleet import (  # noqa: F401  (re-exported: the tests import them from here)
    SIM_LAUNCHER,
    SIM_LAUNCHER_ARGV,
    TOKEN,
    AgentProcess,
    CoordinatorProcess,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    free_port_block,
    instance_toml,
    pid_alive,
    start_agent_sync,
    wait_until,
)


class NotifySocket:
    """systemd's end of ``NOTIFY_SOCKET``: a thread collects a service's sd_notify datagrams in
    order (the kernel queues only a few datagrams; undrained, the service's sends would stall).
    Descriptors sent along are closed; a subclass that keeps them overrides :meth:`received`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except OSError:
                return
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += list(array.array("i", payload[: len(payload) - len(payload) % 4]))
            with self.lock:
                self.messages.append(data.decode())
                self.received(data.decode(), fds)

    def received(self, message: str, fds: list[int]) -> None:
        """One datagram (called with ``lock`` held)."""
        for fd in fds:
            os.close(fd)

    def ready_after_reload(self, n: int = 1) -> str | None:
        """The first READY=1 after the ``n``-th RELOADING=1, once both arrived."""
        with self.lock:
            msgs = list(self.messages)
        starts = [i for i, m in enumerate(msgs) if "RELOADING=1" in m.splitlines()]
        if len(starts) < n:
            return None
        return next((m for m in msgs[starts[n - 1] + 1 :] if "READY=1" in m.splitlines()), None)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
