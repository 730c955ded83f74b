"""systemd notification protocol (sd_notify) on a plain datagram socket, no libsystemd.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET``; a path starting with ``@`` is in the
abstract namespace. Without the variable every call is a no-op, so the daemons run the same way
by hand, in tests and under systemd.
"""

from __future__ import annotations

import os
import socket
import time

SEND_TIMEOUT_S = 0.25


class SystemdNotifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        self._sock: socket.socket | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Sent from the event loop: a receiver that stops reading (its queue holds only
            # net.unix.max_dgram_qlen datagrams) must not stall the agent for more than this.
            self._sock.settimeout(SEND_TIMEOUT_S)
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        # WATCHDOG_PID, when set, names the process the watchdog is meant for.
        self.watchdog_usec = int(usec) if usec and (not pid or int(pid) == os.getpid()) else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; never raises (a lost status line is not fatal)."""
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._addr)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        """Also the end of every reload, successful or not: after RELOADING=1 systemd keeps the
        unit in "reloading" until it hears READY=1."""
        return self.notify("READY=1", *([_status(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC: when the reload began; systemd >= 253 (Type=notify-reload) requires it
        # in the same message, older ones ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> str:
    # STATUS is one line by protocol; a newline would start a new assignment.
    return "STATUS=" + text.replace("\n", " ")
