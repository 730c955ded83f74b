"""Child processes of the agent: spawn, output capture, stop, and the no-orphans guarantees.

Model servers that outlive their agent keep holding GPU memory until someone notices, so:

1. every child gets ``PR_SET_PDEATHSIG(SIGKILL)``: the kernel kills it when the agent dies,
   even by SIGKILL (SIGKILL because the agent is gone and cannot wait on a graceful stop);
2. every child leads its own session / process group, so a stop or kill reaches the workers a
   server forks (vLLM's engine processes) through ``killpg``;
3. the process groups we start are recorded in the state dir, and the next agent start kills
   any group still alive (covers grandchildren that 1. cannot reach);
4. under systemd, ``KillMode=mixed`` takes the whole cgroup down with the unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections import deque
from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog

from gpufleet.fileio import atomic_write_bytes

log = structlog.get_logger("agent.process")

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _make_preexec(parent_pid: int, cgroup_procs: str | None) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec: keep it tiny
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the agent died before prctl took effect
            os._exit(1)
        if cgroup_procs:
            with open(cgroup_procs, "w") as f:
                f.write("0")  # "0" = the writing process itself

    return preexec


MAX_LINE = 8192  # a "line" longer than this is quoted as it is, not buffered further


class RotatingLog:
    """Size-rotated log file (name.log, name.log.1, …) plus the last lines kept in memory for
    error reports. Written from the event loop; files are small appends, no thread needed."""

    def __init__(self, path: Path, max_bytes: int, backups: int, tail_lines: int = 30) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._partial = b""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "ab")
        self._size = self._f.tell()

    def write(self, data: bytes) -> None:
        self._append(data)
        # Pipe reads cut lines anywhere: keep the unfinished end for the next chunk.
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line.strip():
                self.tail.append(line)

    def new_run(self) -> None:
        self.tail.clear()
        self._partial = b""

    def _append(self, data: bytes) -> None:
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        self._f.write(data)
        self._f.flush()
        self._size += len(data)

    def _rotate(self) -> None:
        self._f.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    src.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(self.path.name + ".1"))
            self._f = open(self.path, "wb")
        else:
            self._f = open(self.path, "wb")
        self._size = 0

    def mark(self, text: str) -> None:
        """A line from the agent itself (start/stop markers) so the file reads as a history.
        Not part of the tail: the tail is what the *server* said, quoted in error reports."""
        self._append(f"--- gpu-agent: {text} ---\n".encode())

    def close(self) -> None:
        self._f.close()


class ChildProcess:
    """One running model server: its asyncio process, output pump and exit status."""

    def __init__(self, proc: asyncio.subprocess.Process, output: RotatingLog) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.output = output
        self._pump = asyncio.create_task(self._pump_output())

    async def _pump_output(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.output.write(chunk)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        code = await self.proc.wait()
        # Let the pump drain what the process printed last: that is usually the error.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pump), 1.0)
        return code

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "running"
        what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        last = " | ".join(list(self.output.tail)[-3:])
        return f"{what}" + (f"; last output: {last}" if last else "")

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the group, wait ``grace_s``, SIGKILL the group; always reap the leader."""
        if self.proc.returncode is None:
            _killpg(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace_s)
            except TimeoutError:
                log.warning("stop grace expired, killing", pid=self.pid, grace_s=grace_s)
        # Whatever the leader did, members of its group (forked workers) must not survive it.
        _killpg(self.pid, signal.SIGKILL)
        return await self.wait()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def spawn(
    argv: list[str],
    env: dict[str, str],
    output: RotatingLog,
    cgroup_procs: str | None = None,
) -> ChildProcess:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=_make_preexec(os.getpid(), cgroup_procs),
    )
    return ChildProcess(proc, output)


# --- leftovers from a previous agent (rule 3) ------------------------------------------------


class GroupRecord(msgspec.Struct):
    pgid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid apart


def proc_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


def _session_members(sid: int, not_before: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[3] is the session id; start time guards against an unrelated reuse of the id.
        if int(fields[3]) == sid and int(fields[19]) >= not_before:
            out.append(int(entry.name))
    return out


class GroupRegistry:
    """Process groups we started, persisted so the next agent can reap what survived us."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._groups: dict[str, GroupRecord] = {}

    def add(self, name: str, pid: int) -> None:
        self._groups[name] = GroupRecord(pid, proc_start_ticks(pid) or 0)
        self._save()

    def remove(self, name: str) -> None:
        if self._groups.pop(name, None) is not None:
            self._save()

    def _save(self) -> None:
        atomic_write_bytes(self.path, msgspec.json.encode(self._groups))

    def reap_leftovers(self) -> list[tuple[str, list[int]]]:
        """Kill every process still in a session recorded by a previous run; returns what was killed."""
        try:
            old = msgspec.json.decode(self.path.read_bytes(), type=dict[str, GroupRecord])
        except FileNotFoundError:
            return []
        except (OSError, msgspec.DecodeError) as e:
            log.warning("unreadable process-group registry, ignoring", path=str(self.path), error=str(e))
            old = {}
        killed = []
        for name, rec in old.items():
            members = _session_members(rec.pgid, rec.start_ticks)
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if members:
                killed.append((name, members))
        self._groups = {}
        self._save()
        return killed
