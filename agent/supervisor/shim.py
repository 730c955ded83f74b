"""The model server's keeper: a tiny parent process that outlives an agent restart, not an agent.

    gpu-agent ──lifeline pipe (write end)──> shim ──fork/exec──> model server (+ its workers)
       └── also in systemd's fd store ──┘

Every model server runs under a shim of its own. The shim leads the server's session and
process group, starts the server in it and watches two things:

- the server exiting: the shim writes one line saying how, then exits the same way (same code,
  or the same signal), so its parent sees the server's own exit status;
- the *lifeline*: a pipe whose write end the agent holds, and, under systemd, also systemd's
  file descriptor store (``FileDescriptorStoreMax=``). EOF on it means no agent will ever come
  back for this server: the shim stops the group (SIGTERM, grace, SIGKILL) and exits.

systemd keeps a stored descriptor while the unit is running, restarting (``Restart=`` after a
crash) or has a job queued (``systemctl restart``), and drops it when the unit stops for good.
So an upgrade or a crash-and-restart keeps the servers running for the next agent to adopt,
while ``systemctl stop``, an uninstall, a crash with no restart, or an agent killed outside
systemd closes every write end and takes the servers down. That replaces the kernel's
parent-death signal, which cannot tell a restart from a stop.

Stdlib only and no import of the agent: this runs once per model server and must stay small
(started as ``python -I -S shim.py``: no site, no package imports, ~10 MB).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time

MARK = "--- gpufleet-shim:"  # process.SHIM_MARK
PR_SET_PDEATHSIG = 1


def _die_with_shim() -> None:
    # In the server, between fork and exec: if the shim is killed, so is the server (its
    # workers are in the shim's process group, which whoever killed the shim can signal).
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != SHIM_PID:  # the shim died before prctl took effect
        os._exit(1)


SHIM_PID = os.getpid()


def _say(text: str) -> None:
    # The server's stdout is ours too: the line lands in the instance log the agent pumps.
    try:
        os.write(1, f"{MARK} {text} ---\n".encode())
    except OSError:
        pass  # no reader left, or a full disk: the exit status still says it


def _killpg(sig: int) -> None:
    try:
        os.killpg(os.getpgrp(), sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_like(status: int) -> None:
    """Exit the way the server did: its code, or death by its signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        _say(f"server killed by {signal.Signals(sig).name}")
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught anyway
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1)  # SIGKILL/SIGTERM land at once; a stopped signal would not
        os._exit(128 + sig)
    code = os.waitstatus_to_exitcode(status)
    _say(f"server exited with code {code}")
    os._exit(code)


def _stop_group(server: int, pidfd: int, grace_s: float) -> None:
    _say(f"lifeline closed (no agent will come back): stopping the server, grace {grace_s:g}s")
    _killpg(signal.SIGTERM)
    # As systemd does: a stopped (SIGSTOPped) server only sees the SIGTERM once continued;
    # without this it would sit out the whole grace.
    _killpg(signal.SIGCONT)
    ready, _, _ = select.select([pidfd], [], [], grace_s)
    if not ready:
        _say("grace expired: SIGKILL")
    _killpg(signal.SIGKILL)  # forked workers too; this takes the shim down with them


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -I -S shim.py LIFELINE_FD:GRACE_S -- ARGV...", file=sys.stderr)
        return 2
    lifeline_fd, grace = argv[1].split(":")
    lifeline, grace_s = int(lifeline_fd), float(grace)
    if os.getpgrp() != os.getpid():
        os.setsid()  # the group it stops must be its own, whoever started it (the agent already does)
    # The agent signals the whole group to stop the server; the shim stays to report its exit.
    # A handler, not SIG_IGN: exec resets handled signals to default, ignored ones stay ignored.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    try:
        proc = subprocess.Popen(argv[3:], stdin=subprocess.DEVNULL, close_fds=True, preexec_fn=_die_with_shim)
    except OSError as e:
        _say(f"cannot start {argv[3]!r}: {e.strerror or e}")
        return 127
    pidfd = os.pidfd_open(proc.pid)
    while True:
        ready, _, _ = select.select([pidfd, lifeline], [], [])
        if pidfd in ready:
            _, status = os.waitpid(proc.pid, 0)
            _exit_like(status)
        if lifeline in ready and not os.read(lifeline, 64):
            _stop_group(proc.pid, pidfd, grace_s)
            _, status = os.waitpid(proc.pid, 0)
            _exit_like(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
