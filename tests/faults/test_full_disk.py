"""A full log disk must never take serving down.

Each scenario puts a log on a real tmpfs mount of a few hundred KiB, fills it to the last byte
(and, for the start-up case, the last inode), and checks what users and operators see: every
request answered, instances READY and not restarted, supervision still working, the dropped
lines counted and reported once, and logging back by itself once space is freed.

Needs root (mount(8)); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from helpers import AgentProcess, agent_toml, free_port, instance_toml, pid_alive, wait_until

from agent.config import load_config
from agent.daemon import AgentRuntime
from gpufleet.sdnotify import SystemdNotifier

PAD = "x" * 4000  # in the query string: every proxied request makes a 4 KB access-log line upstream


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "tmpfs mounts need root"
    probe = Path(f"/tmp/gf-tmpfs-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if r.returncode != 0:
            return f"cannot mount a tmpfs here: {r.stderr.decode().strip()}"
        subprocess.run(["umount", str(probe)], capture_output=True)
        return None
    finally:
        probe.rmdir()


_REASON = _why_not()
requires_tmpfs = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class Tmpfs:
    """A small tmpfs that can be filled to the last byte (and inode) and freed again."""

    def __init__(self, path: Path, size: str, inodes: int = 64) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes},mode=0755", "tmpfs", str(path)], check=True
        )
        self._fillers: list[Path] = []

    def fill(self, inodes: bool = False, slack: Path | None = None) -> None:
        """Write until ENOSPC; with ``inodes``, also create empty files until none can be. A
        file's last page has room left even then: ``slack`` is topped up with empty lines."""
        filler = self.path / f".filler{len(self._fillers)}"
        self._fillers.append(filler)
        with open(filler, "wb", buffering=0) as f:
            block = b"\0" * 65536
            with contextlib.suppress(OSError):
                while True:
                    f.write(block)
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0")  # the last partial block
        if slack is not None:
            with open(slack, "ab", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\n")
        while inodes:
            extra = self.path / f".inode{len(self._fillers)}"
            try:
                extra.touch()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
            self._fillers.append(extra)
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        for f in self._fillers:
            f.unlink()
        self._fillers.clear()

    def unmount(self) -> None:
        # The logs outlive the mount, for whoever reads a failure.
        saved = self.path.with_name(self.path.name + "-saved")
        saved.mkdir(exist_ok=True)
        for f in self.path.glob("*.log*"):
            with contextlib.suppress(OSError):
                shutil.copyfile(f, saved / f.name)
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, inodes: int = 64) -> Iterator[Tmpfs]:
    fs = Tmpfs(path, size, inodes)
    try:
        yield fs
    finally:
        fs.unmount()


async def _traffic(agent: AgentProcess, n: int, model: str = "m", concurrency: int = 8) -> list[float]:
    """``n`` chat requests; asserts every one got 200; returns their latencies."""
    assert agent.http is not None
    http = agent.http
    sem = asyncio.Semaphore(concurrency)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    latencies: list[float] = []
    failures: list[str] = []

    async def one() -> None:
        async with sem:
            t0 = time.monotonic()
            try:
                async with http.post(
                    f"{agent.base}/v1/chat/completions?pad={PAD}", json=body, timeout=aiohttp.ClientTimeout(total=8)
                ) as r:
                    if r.status != 200:
                        failures.append(f"{r.status} {(await r.text())[:200]}")
                    else:
                        await r.read()
            except (TimeoutError, aiohttp.ClientError) as e:
                failures.append(repr(e))
            latencies.append(time.monotonic() - t0)

    await asyncio.gather(*(one() for _ in range(n)))
    assert not failures, f"{len(failures)}/{n} requests failed, e.g. {failures[:3]}"
    return latencies


async def _dropped_at_least(agent: AgentProcess, n: int) -> None:
    async def dropped() -> bool:
        return await _metric(agent, "gpu_agent_log_lines_dropped_total") >= n

    await wait_until(dropped, timeout=10, what=f"{n} log lines counted as dropped")


async def _metric(agent: AgentProcess, name: str, **labels: str) -> float:
    assert agent.http is not None
    async with agent.http.get(agent.base + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _events(agent: AgentProcess, event: str) -> list[dict[str, object]]:
    out = []
    for line in agent.log_path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("event") == event:
                out.append(rec)
    return out


def _two_instances(tmp: Path, port: int) -> str:
    return agent_toml(tmp, port, instance_toml("a", model="m") + instance_toml("b", model="m"))


async def _ready_pids(agent: AgentProcess) -> dict[str, int]:
    for name in ("a", "b"):
        await agent.wait_state(name, "READY")
    st = await agent.status()
    return {i["name"]: i["pid"] for i in st["instances"]}


async def _unchanged(agent: AgentProcess, pids: dict[str, int]) -> None:
    st = await agent.status()
    for i in st["instances"]:
        assert (i["state"], i["restarts"], i["pid"]) == ("READY", 0, pids[i["name"]]), i


@requires_tmpfs
async def test_full_instance_log_disk_under_traffic(tmp_path: Path) -> None:
    """(a) Instance logs on a full disk: every request answered, no restart, drops counted and
    said once per instance; space freed -> the logs are written again and that is said too."""
    port = free_port()
    with tmpfs(tmp_path / "logs", "512k") as fs:
        async with AgentProcess(tmp_path, _two_instances(tmp_path, port), port) as agent:
            pids = await _ready_pids(agent)
            fs.fill()
            t0 = time.monotonic()
            # 2 x 64 KiB of pipe at 4 KB a line: the servers block after ~16 requests each if
            # nothing drains their output.
            latencies = await _traffic(agent, 120)
            await _unchanged(agent, pids)
            dropped = [await _metric(agent, "gpu_agent_instance_log_lines_dropped_total", instance=n) for n in "ab"]
            assert min(dropped) > 0 and sum(dropped) >= 118, dropped  # all but what fit in the files' last pages
            failing = _events(agent, "instance log write failed; dropping its lines until writes work again")
            assert sorted(e["instance"] for e in failing) == ["a", "b"], failing  # once each
            assert all("No space left" in str(e["error"]) for e in failing)
            size_full = (fs.path / "a.log").stat().st_size

            fs.free()
            t_free = time.monotonic()
            await wait_until(
                lambda: len(_events(agent, "instance log writes work again")) == 2, timeout=10, what="recovery logged"
            )
            recovered_s = time.monotonic() - t_free
            resumed = _events(agent, "instance log writes work again")
            assert sum(int(str(e["dropped_lines"])) for e in resumed) >= 118, resumed
            await _traffic(agent, 10)
            await wait_until(lambda: "chat/completions" in (fs.path / "a.log").read_bytes()[size_full:].decode())
            text = (fs.path / "a.log").read_text()
            assert re.search(r"--- gpu-agent: \d+ lines of output dropped", text), text[-2000:]
            await _unchanged(agent, pids)
            print(
                f"\nfull instance log disk: 120 requests, max latency {max(latencies):.2f}s, "
                f"{time.monotonic() - t0:.1f}s; logs resumed {recovered_s:.2f}s after space was freed"
            )


@requires_tmpfs
async def test_instances_start_and_serve_with_a_full_log_disk(tmp_path: Path) -> None:
    """(b) Full (bytes and inodes) before the agent starts: the log files cannot even be
    created; instances start and serve anyway, and get their files once space is freed."""
    port = free_port()
    with tmpfs(tmp_path / "logs", "256k", inodes=16) as fs:
        fs.fill(inodes=True)
        t0 = time.monotonic()
        async with AgentProcess(tmp_path, _two_instances(tmp_path, port), port) as agent:
            pids = await _ready_pids(agent)
            ready_s = time.monotonic() - t0
            await _traffic(agent, 40)
            await _unchanged(agent, pids)
            assert not (fs.path / "a.log").exists()
            assert await _metric(agent, "gpu_agent_instance_log_lines_dropped_total", instance="a") > 0
            fs.free()
            await wait_until(lambda: (fs.path / "a.log").exists() and (fs.path / "b.log").exists(), timeout=10)
            await wait_until(lambda: "dropped" in (fs.path / "a.log").read_text(), timeout=10)
            await _unchanged(agent, pids)
            print(f"\nlog disk full at start-up: both instances READY {ready_s:.2f}s after the agent started")


@requires_tmpfs
async def test_full_agent_log_disk(tmp_path: Path) -> None:
    """(c) The agent's own log (its stderr) on a full disk: requests all succeed, supervision
    keeps working (a SIGKILLed server is restarted), /healthz tells the truth, and the log
    resumes by itself with a line saying how much was lost."""
    port = free_port()
    with tmpfs(tmp_path / "agentlog", "256k") as fs:
        agent = AgentProcess(tmp_path, _two_instances(tmp_path, port), port)
        agent.log_path = fs.path / "agent.log"
        async with agent:
            pids = await _ready_pids(agent)
            fs.fill(slack=agent.log_path)
            size_full = agent.log_path.stat().st_size
            await _traffic(agent, 100)  # an access-log line each
            await _unchanged(agent, pids)
            await _dropped_at_least(agent, 100)  # access-log lines go out in batches: the last within 50 ms

            os.kill(pids["a"], signal.SIGKILL)
            t_kill = time.monotonic()
            again = await agent.wait_state("a", "READY", restarts=1, timeout=20)
            restarted_s = time.monotonic() - t_kill
            assert again["pid"] != pids["a"]
            await _traffic(agent, 20)
            await _dropped_at_least(agent, 120)  # before space is freed: these lines are lost
            assert agent.http is not None
            async with agent.http.get(agent.base + "/healthz") as r:
                assert r.status == 200, await r.text()
            assert agent.log_path.stat().st_size == size_full  # nothing could be written

            fs.free()
            t_free = time.monotonic()

            async def noticed() -> list[dict[str, object]]:
                await _traffic(agent, 1)  # the writer retries on the next line, after its back-off
                return _events(agent, "agent log lines dropped")

            notice = await wait_until(noticed, timeout=10, interval=0.1, what="notice")
            recovered_s = time.monotonic() - t_free
            assert int(str(notice[0]["dropped_lines"])) >= 120, notice
            await _traffic(agent, 5)
            await wait_until(lambda: len(_events(agent, "request")) >= 3, timeout=10, what="access log resumes")
            print(
                f"\nfull agent log disk: SIGKILLed server READY again in {restarted_s:.2f}s; "
                f"log resumed {recovered_s:.2f}s after space was freed"
            )


class _Recorder(SystemdNotifier):
    def __init__(self) -> None:
        super().__init__(address="")
        self.sent: list[str] = []

    def notify(self, *fields: str) -> bool:
        self.sent.extend(fields)
        return True


async def test_a_dead_supervision_loop_is_not_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The class behind "supervision dies silently": an instance loop that dies (made to fail
    inside its own error handler, as a log write on a full disk did) fails /healthz naming it,
    is logged once, and ends the watchdog pings, so systemd restarts the agent (which adopts the
    servers). An agent in this process: the failure is injected into its instance object."""
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(tmp_path, port, instance_toml("a")))
    notifier = _Recorder()
    rt = AgentRuntime(load_config(config), notifier=notifier)
    run = asyncio.create_task(rt.run())
    pid: int | None = None
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    return r.status == 200

            await wait_until(ready, timeout=30, what="READY")
            inst = rt.supervisor.instances["a"]

            async def broken(*_: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            inst._cycle = broken  # type: ignore[method-assign]
            inst._stop_process = broken  # type: ignore[method-assign]
            inst.command("restart")  # the loop wakes, fails, and fails again handling it
            t0 = time.monotonic()

            async def unhealthy() -> dict[str, object] | None:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    return await r.json() if r.status == 503 else None

            body = await wait_until(unhealthy, timeout=10, what="/healthz 503")
            detected_s = time.monotonic() - t0
            assert body["status"] == "supervision failed" and "No space left" in str(body["instances"]), body
            await wait_until(lambda: any("supervision failed for a" in f for f in notifier.sent), timeout=5)
            pings, statuses = notifier.sent.count("WATCHDOG=1"), len(notifier.sent)
            rt.changed()  # another tick, and still no ping
            await wait_until(lambda: len(notifier.sent) > statuses, timeout=5, what="a tick")
            assert notifier.sent.count("WATCHDOG=1") == pings
            dead = [ln for ln in capsys.readouterr().out.splitlines() if "supervision loop died; /healthz" in ln]
            assert len(dead) == 1, dead
            # Its state is no longer known: FAILED, so no proxy or leader routes to it.
            rec = next(i for i in rt.node_record().instances if i.name == "a")
            assert rec.state == "FAILED" and "supervision loop died" in (rec.last_error or ""), rec
            with capsys.disabled():
                print(f"\ndead supervision loop: /healthz 503 after {detected_s:.2f}s")
            # The agent's shutdown still stops the server of the dead loop (with a working stop).
            del inst._cycle, inst._stop_process
            pid = rec.pid
    finally:
        rt.request_stop()
        assert await asyncio.wait_for(run, 30) == 0
    assert pid is None or not pid_alive(pid), "the dead loop's server outlived the agent"
