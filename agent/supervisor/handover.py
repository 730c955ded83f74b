"""Handing running model servers (and the API socket) from one agent process to the next.

Under systemd the agent keeps, in systemd's file descriptor store (``FileDescriptorStoreMax=``
in the unit), for every running instance:

- ``lifeline/<name>``: the write end of the pipe its shim watches (shim.py): while systemd
  holds it, the shim keeps the server running even with no agent alive;
- ``output/<name>``: the read end of the server's stdout/stderr pipe, so the server never
  writes into a pipe nobody can read again;

and ``api``, the listening socket, so clients queue in its backlog during a restart instead of
being refused. Descriptors are stored when an instance starts (so a crash hands them over too,
not only a clean exit) and removed when it stops. systemd passes them to the next agent
(``LISTEN_FDS``/``LISTEN_FDNAMES``); it drops them when the unit stops for good, and the shims
then take their servers down. See docs/architecture.md, "Restarts and upgrades".

Outside systemd (tests, ``gpuctl demo``) nothing is stored, nothing is passed, and the
lifelines close when the agent exits, as the parent-death signal did before.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket

import structlog

log = structlog.get_logger("agent.handover")

LISTEN_FDS_START = 3
API = "api"


def lifeline_name(instance: str) -> str:
    return f"lifeline/{instance}"  # FDNAME may hold any printable ASCII but ':'


def output_name(instance: str) -> str:
    return f"output/{instance}"


class FdStore:
    """systemd's fd store for this service: store, remove, and what the last run left us."""

    def __init__(self, environ: dict[str, str] | None = None, keep: bool = True) -> None:
        """``keep`` false (``keep_servers_on_restart = false``): store nothing, so no exit,
        a crash included, leaves a server running; what a previous agent passed is still taken
        (and, unclaimed, closed)."""
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "") if keep else ""
        self._addr: str | None = ("\0" + addr[1:] if addr.startswith("@") else addr) or None
        self._sock: socket.socket | None = None
        self.passed: dict[str, int] = self._take_passed(env)

    @property
    def enabled(self) -> bool:
        """Under systemd and asked to: running servers survive this process (if the unit keeps
        the store)."""
        return self._addr is not None

    def store(self, name: str, fd: int) -> None:
        self._send(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove(self, name: str) -> None:
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])

    def take(self, name: str) -> int | None:
        """A descriptor the previous agent stored under ``name``; ours from now on."""
        return self.passed.pop(name, None)

    def close_unclaimed(self) -> None:
        for name, fd in self.passed.items():
            log.info("closing a descriptor nobody claimed", name=name)
            with contextlib.suppress(OSError):
                os.close(fd)
            self.remove(name)
        self.passed = {}

    def _send(self, text: str, fds: list[int]) -> None:
        if self._addr is None:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            self._sock.sendmsg([text.encode()], ancillary, 0, self._addr)
        except OSError as e:
            # Not fatal: without the store a restart stops the servers, as it always did.
            log.warning("systemd did not take a descriptor", message=text.replace("\n", " "), error=str(e))

    @staticmethod
    def _take_passed(env: dict[str, str]) -> dict[str, int]:
        """Parse and consume LISTEN_FDS (sd_listen_fds_with_names): name -> descriptor."""
        if env.get("LISTEN_PID") != str(os.getpid()):
            return {}
        try:
            count = int(env.get("LISTEN_FDS", "0"))
        except ValueError:
            return {}
        names = env.get("LISTEN_FDNAMES", "").split(":")
        out = {}
        for i in range(count):
            fd = LISTEN_FDS_START + i
            try:
                os.set_inheritable(fd, False)  # ours, not the model servers'
            except OSError as e:
                log.warning("a descriptor systemd announced is not open", fd=fd, error=str(e))
                continue
            name = names[i] if i < len(names) else f"unknown-{i}"
            if name in out:  # systemd dedups descriptors, not names: keep the first
                os.close(fd)
                continue
            out[name] = fd
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
        return out
