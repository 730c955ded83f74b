"""Child processes of the agent: spawn, adopt, output capture, stop, and the no-orphans rules.

Model servers that outlive their agent keep holding GPU memory until someone notices; a model
server restarted with every agent upgrade costs minutes of loading. So:

1. every server runs under a shim (shim.py) that stops it when the *lifeline* closes: no write
   end left with this agent nor with systemd's fd store (handover.py), i.e. when no agent will
   come back for it. A restart or upgrade under systemd keeps the servers; an agent stopped for
   good, killed outside systemd or crashed without a restart takes them down;
2. the server dies with its shim (``PR_SET_PDEATHSIG`` set by the shim), so killing the shim
   can never orphan it;
3. every shim leads its own session / process group, so a stop or kill reaches the workers a
   server forks (vLLM's engine processes) through ``killpg``;
4. the process groups we start are recorded in the state dir with what the next agent needs to
   adopt them; the next agent adopts those whose lifelines systemd passed back and kills any
   other group still alive (covers grandchildren that 2. cannot reach).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import structlog

from gpufleet.fileio import atomic_write_bytes
from gpufleet.tasks import wait_shielded

log = structlog.get_logger("agent.process")


def _make_preexec(cgroup_procs: str | None) -> Callable[[], None] | None:
    if not cgroup_procs:
        return None

    def preexec() -> None:  # runs in the child between fork and exec: keep it tiny
        with open(cgroup_procs, "w") as f:
            f.write("0")  # "0" = the writing process itself; the server inherits it

    return preexec


MAX_LINE = 8192  # a "line" longer than this is quoted as it is, not buffered further
RETRY_S = 1.0  # a failing log file is retried this often: one open and one failed write a second


class _Outage:
    """Writes to the log file failing: since when, why, and what was dropped meanwhile."""

    def __init__(self, error: OSError) -> None:
        self.since = time.time()
        self.error = error.strerror or str(error)
        self.lines = 0


class RotatingLog:
    """Size-rotated log file (name.log, name.log.1, …) plus the last lines kept in memory for
    error reports. Written from the event loop; files are small appends, no thread needed.

    Writing never raises: the output pump that calls it must keep draining the server's pipe
    whatever the disk does, or the server blocks on a full pipe and stops serving. A write or
    open that fails (ENOSPC, EDQUOT, EIO, EFBIG...) drops lines, counts them, says so once in
    the agent's log, and retries at most every ``RETRY_S`` seconds; the first write that works
    again puts a line in the file saying how much is missing, and the agent's log says so too.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int, tail_lines: int = 30) -> None:
        self.path = path
        self.name = path.stem  # the instance's name: the file is <name>.log
        self.max_bytes = max_bytes
        self.backups = backups
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.dropped_lines = 0  # over the agent's life, for gpu_agent_instance_log_lines_dropped_total
        self._partial = b""
        self._f: io.FileIO | None = None
        self._size = 0
        self._line_start = True  # the file ends with a newline (or is empty)
        self._outage: _Outage | None = None
        self._retry_at = 0.0
        try:
            self._open()
        except OSError as e:  # a full disk at start-up must not keep the instance from starting
            self._failed(e)

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

    @property
    def dropping(self) -> bool:
        return self._outage is not None

    def _append(self, data: bytes) -> None:
        if self._outage is not None and time.monotonic() < self._retry_at:
            self._drop(data)
            return
        try:
            if self._f is None:
                self._open()
            if self._outage is not None:
                self._write_all(self._resume_note(self._outage))
            if self._size + len(data) > self.max_bytes and self._size > 0:
                self._rotate()
            self._write_all(data)
        except OSError as e:
            self._failed(e)
            self._drop(data)
            return
        if (outage := self._outage) is not None:
            self._outage = None
            log.info(
                "instance log writes work again",
                instance=self.name,
                path=str(self.path),
                dropped_lines=outage.lines,
                dropped_for_s=round(time.time() - outage.since, 1),
            )

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing pending
        self._size = self._f.seek(0, os.SEEK_END)
        self._line_start = True

    def _write_all(self, data: bytes) -> None:
        assert self._f is not None
        view = memoryview(data)
        while view:
            n = self._f.write(view) or 0  # a short write before ENOSPC; the next one raises
            self._size += n
            if n:
                self._line_start = view[n - 1] == ord("\n")
            view = view[n:]

    def _resume_note(self, outage: _Outage) -> bytes:
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(outage.since))
        note = f"--- gpu-agent: {outage.lines} lines of output dropped since {since}Z ({outage.error}) ---\n"
        return (b"" if self._line_start else b"\n") + note.encode()

    def _failed(self, e: OSError) -> None:
        # Reopened at the next try: after EIO or a remount the old descriptor may never work again.
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        self._retry_at = time.monotonic() + RETRY_S
        if self._outage is None:
            self._outage = _Outage(e)
            log.warning(
                "instance log write failed; dropping its lines until writes work again",
                instance=self.name,
                path=str(self.path),
                error=self._outage.error,
                retry_every_s=RETRY_S,
            )

    def _drop(self, data: bytes) -> None:
        n = data.count(b"\n")
        self.dropped_lines += n
        assert self._outage is not None
        self._outage.lines += n

    def _rotate(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    src.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._f = open(self.path, "wb", buffering=0)
        self._size = 0
        self._line_start = True

    def mark(self, text: str) -> None:
        """A line from the agent itself (start/stop markers) so the file reads as a history.
        Not part of the tail: the tail is what the *server* said, quoted in error reports."""
        self._append(f"--- gpu-agent: {text} ---\n".encode())

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


SHIM = Path(__file__).with_name("shim.py")
EXIT_UNKNOWN = -255  # an adopted server's exit status is its shim's, which only its parent (PID 1) saw


class ChildProcess:
    """One model server under its shim: the shim's pid (leader of the server's process group),
    the lifeline, the output pump and the exit status.

    Either spawned by this agent (``proc`` set: an ordinary child) or adopted from the previous
    agent through systemd's fd store (``proc`` None: the shim is PID 1's child now, so its exit
    is watched through a pidfd and its status read from the shim's last line)."""

    def __init__(
        self,
        pid: int,
        lifeline: int,
        output_fd: int,
        output: RotatingLog,
        proc: asyncio.subprocess.Process | None = None,
    ) -> None:
        self.pid = pid
        self.lifeline = lifeline
        self.output_fd = output_fd
        self.output = output
        self.proc = proc
        self._gone = asyncio.Event()
        self._server_pid: int | None = None
        self._pump_owns_fd = False
        self._record_failed = False
        if proc is not None:
            self._watch = asyncio.create_task(self._wait_child(proc))
        else:
            self._watch = asyncio.create_task(self._wait_pidfd())
        self._pump = asyncio.create_task(self._pump_output(output_fd))

    @property
    def adopted(self) -> bool:
        return self.proc is None

    async def _wait_child(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        self._gone.set()

    async def _wait_pidfd(self) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._gone.set()
            return
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(pidfd, readable.set)
        try:
            await readable.wait()
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._gone.set()

    async def _pump_output(self, fd: int) -> None:
        # The pump owns our copy of the descriptor: its transport closes it, once (closing it
        # here as well would close whatever socket reused the number in between). systemd's
        # copy in the fd store is separate and keeps the pipe readable for the next agent.
        self._pump_owns_fd = True
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while chunk := await reader.read(65536):
                self._record(chunk)
        finally:
            transport.close()

    def _record(self, chunk: bytes) -> None:
        # Whatever happens to the output, the pump keeps reading: a server that cannot write
        # its stdout blocks, and with it every request it serves. RotatingLog.write drops on
        # I/O errors itself; this catches a bug there, said once.
        try:
            self.output.write(chunk)
        except Exception as e:
            if not self._record_failed:
                self._record_failed = True
                log.exception("cannot record the server's output; dropping it", pid=self.pid, error=str(e))

    @property
    def returncode(self) -> int | None:
        if not self._gone.is_set():
            return None
        return self.proc.returncode if self.proc is not None else EXIT_UNKNOWN

    async def wait_exit(self) -> None:
        await self._gone.wait()

    async def wait(self) -> int:
        await self._gone.wait()
        # Let the pump drain what the process printed last: that is usually the error.
        with contextlib.suppress(TimeoutError):
            await wait_shielded(self._pump, 1.0)
        code = self.returncode
        assert code is not None
        return code

    def server_pid(self) -> int:
        """The model server's own pid (what nvidia-smi shows), else the shim's."""
        if self._server_pid is None and self.returncode is None:
            with contextlib.suppress(OSError, ValueError):
                children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
                self._server_pid = int(children[0]) if children else None
        return self._server_pid or self.pid

    def describe_exit(self) -> str:
        code = self.returncode
        if code is None:
            return "running"
        # The shim's own report of how the server ended: the only source for an adopted one.
        reports = [ln for ln in self.output.tail if ln.startswith(SHIM_EXIT_MARK)]
        if code == EXIT_UNKNOWN:
            what = reports[-1].removeprefix(SHIM_MARK).strip(" -") if reports else "exited (status unknown)"
        else:
            what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        last = " | ".join([ln for ln in self.output.tail if not ln.startswith(SHIM_EXIT_MARK)][-3:])
        return f"{what}" + (f"; last output: {last}" if last else "")

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the group, wait ``grace_s``, SIGKILL the group; always reap the leader.

        A group with a stopped member (SIGSTOP, SIGTSTP, a debugger) is killed at once:
        a stopped process holds SIGTERM pending and would cost the whole grace for nothing."""
        if self.returncode is None and (frozen := stopped_members(self.pid)):
            log.warning("server process stopped (state T): SIGKILL without grace", pid=self.pid, stopped=frozen)
        elif self.returncode is None:
            _killpg(self.pid, signal.SIGTERM)
            _killpg(self.pid, signal.SIGCONT)  # as systemd does: one stopped since the check gets it too
            try:
                await wait_shielded(self._gone.wait(), grace_s)
            except TimeoutError:
                log.warning("stop grace expired, killing", pid=self.pid, grace_s=grace_s)
        # Whatever the leader did, members of its group (forked workers) must not survive it.
        _killpg(self.pid, signal.SIGKILL)
        code = await self.wait()
        self.release()
        return code

    def release(self) -> None:
        """Close our ends of the lifeline and the output pipe (the process is gone, or is to
        go: with no other write end left, its shim stops it)."""
        if self.lifeline >= 0:
            with contextlib.suppress(OSError):
                os.close(self.lifeline)
            self.lifeline = -1
        self._pump.cancel()  # its transport closes the output pipe
        if not self._pump_owns_fd and self.output_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.output_fd)  # the pump never ran: nothing else will close it
        self.output_fd = -1


SHIM_MARK = "--- gpufleet-shim:"  # lines the shim writes (shim.MARK)
SHIM_EXIT_MARK = SHIM_MARK + " server "


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields of /proc/PID/stat after the command name) of every process: [0] state,
    [2] process group, [3] session, [19] start time. The command name (field 2) may contain
    spaces and parentheses, hence the split after the last ')'."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        yield int(entry.name), stat[stat.rfind(")") + 2 :].split()


def stopped_members(pgid: int) -> list[int]:
    """Members of process group ``pgid`` that are stopped (state T, or t under ptrace)."""
    return [pid for pid, f in _proc_stats() if f[0] in ("T", "t") and int(f[2]) == pgid]


async def spawn(
    argv: list[str],
    env: dict[str, str],
    output: RotatingLog,
    cgroup_procs: str | None = None,
    grace_s: float = 30.0,
) -> ChildProcess:
    """Start ``argv`` under a shim (shim.py) in a new session; raises OSError if the shim
    cannot start (a server that cannot start makes the shim exit 127 with a line saying why)."""
    lifeline_r, lifeline_w = os.pipe()  # both non-inheritable; the shim gets its end by pass_fds
    out_r, out_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(SHIM),
            f"{lifeline_r}:{grace_s:g}",
            "--",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_w,
            stderr=out_w,
            pass_fds=(lifeline_r,),
            env=env,
            start_new_session=True,
            preexec_fn=_make_preexec(cgroup_procs),
        )
    except BaseException:
        for fd in (lifeline_w, out_r):
            os.close(fd)
        raise
    finally:
        os.close(lifeline_r)
        os.close(out_w)
    return ChildProcess(proc.pid, lifeline_w, out_r, output, proc)


def adopt(pid: int, lifeline: int, output_fd: int, output: RotatingLog) -> ChildProcess:
    """Take over a shim the previous agent started (its descriptors came from systemd)."""
    output.mark(f"adopted from the previous agent: shim pid {pid}")
    return ChildProcess(pid, lifeline, output_fd, output)


# --- leftovers from a previous agent (rule 3) ------------------------------------------------


class GroupRecord(msgspec.Struct):
    pgid: int  # the shim's pid: it leads the server's session and process group
    start_ticks: int  # /proc/<pid>/stat field 22: tells a reused pid apart
    port: int = 0  # what the next agent needs to adopt it (0: written by an older agent)
    fingerprint: str = ""  # the instance's config, hashed: adopt only an unchanged instance


def proc_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


def _session_members(sid: int, not_before: int) -> list[int]:
    # The start time guards against an unrelated reuse of the session id.
    return [pid for pid, f in _proc_stats() if int(f[3]) == sid and int(f[19]) >= not_before]


def is_alive(rec: GroupRecord) -> bool:
    """Is the recorded shim still the process it was (not a reused pid)?"""
    return proc_start_ticks(rec.pgid) == rec.start_ticks


def kill_session(rec: GroupRecord) -> list[int]:
    """SIGKILL every process still in the recorded session; returns their pids."""
    members = _session_members(rec.pgid, rec.start_ticks)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return members


class GroupRegistry:
    """Process groups we started, persisted so the next agent can adopt or reap them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._groups: dict[str, GroupRecord] = {}

    def add(self, name: str, pid: int, port: int = 0, fingerprint: str = "") -> None:
        self._groups[name] = GroupRecord(pid, proc_start_ticks(pid) or 0, port, fingerprint)
        self._save()

    def keep(self, name: str, rec: GroupRecord) -> None:
        """Record an adopted group as ours."""
        self._groups[name] = rec
        self._save()

    def remove(self, name: str) -> None:
        if self._groups.pop(name, None) is not None:
            self._save()

    def _save(self) -> None:
        atomic_write_bytes(self.path, msgspec.json.encode(self._groups))

    def take_previous(self) -> dict[str, GroupRecord]:
        """What the previous agent recorded; the file starts over empty."""
        try:
            old = msgspec.json.decode(self.path.read_bytes(), type=dict[str, GroupRecord])
        except FileNotFoundError:
            old = {}
        except (OSError, msgspec.DecodeError) as e:
            log.warning("unreadable process-group registry, ignoring", path=str(self.path), error=str(e))
            old = {}
        self._groups = {}
        self._save()
        return old
