"""Small pieces with I/O of their own: cgroup quotas, rotating logs, the token file, sd_notify."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.api.auth import AdminToken, TokenError
from agent.supervisor.cgroups import CgroupManager
from agent.supervisor.process import RotatingLog
from gpufleet.sdnotify import SystemdNotifier


def fake_cgroup_tree(
    tmp_path: Path, controllers: str = "cpu memory pids", procs: str = "0::/system.slice/gpu-agent.service\n"
) -> CgroupManager:
    """A directory laid out like a delegated cgroup v2 subtree. It cannot move processes, but it
    shows which files the manager writes and what it writes into them."""
    base = tmp_path / "cg" / "system.slice" / "gpu-agent.service"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text(controllers + "\n")
    (base / "cgroup.subtree_control").write_text("")
    (base / "cgroup.procs").write_text("")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(procs)
    return CgroupManager(root=str(tmp_path / "cg"), proc_self_cgroup=str(proc))


def test_cgroup_quota_written_when_delegated(tmp_path: Path) -> None:
    cg = fake_cgroup_tree(tmp_path)
    assert cg.setup() is True
    base = tmp_path / "cg" / "system.slice" / "gpu-agent.service"
    assert (base / "agent" / "cgroup.procs").read_text() == str(os.getpid())
    assert (base / "cgroup.subtree_control").read_text() == "+cpu"
    procs = cg.prepare_instance("qwen-a", 2.5)
    assert procs == str(base / "inst-qwen-a" / "cgroup.procs")
    assert (base / "inst-qwen-a" / "cpu.max").read_text() == "250000 100000"
    assert cg.prepare_instance("no-quota", None) is None


@pytest.mark.parametrize(
    ("controllers", "procs", "reason"),
    [
        ("cpu", "12:cpu:/x\n0::/x\n", "cgroup v1 or hybrid"),
        ("memory pids", "0::/system.slice/gpu-agent.service\n", "cpu controller is not available"),
    ],
)
def test_cgroup_not_available_gives_reason(tmp_path: Path, controllers: str, procs: str, reason: str) -> None:
    cg = fake_cgroup_tree(tmp_path, controllers, procs)
    assert cg.setup() is False and reason in (cg.unavailable_reason or "")
    assert cg.prepare_instance("a", 1.0) is None


def test_this_host_cgroups_are_detected_without_crashing() -> None:
    cg = CgroupManager()
    # This CI host is hybrid (v1 + v2) and not delegated, so quotas are off with a reason; on a
    # delegated systemd host they would be on. Either way setup() must answer, not raise.
    if not cg.setup():
        assert cg.unavailable_reason


def test_rotating_log_rotates_and_keeps_tail(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "x.log", max_bytes=100, backups=2)
    for i in range(30):
        log.write(f"line {i:02d} ........\n".encode())
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["x.log", "x.log.1", "x.log.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    assert list(log.tail)[-1] == "line 29 ........"
    assert "line 29" in (tmp_path / "x.log").read_text()


def test_admin_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    tok = AdminToken(str(path))
    tok.ensure(generate=True)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    secret = path.read_text().strip()
    assert tok.check(f"Bearer {secret}") and tok.check(f"bearer {secret}")
    assert not tok.check(f"Bearer {secret}x") and not tok.check(secret) and not tok.check(None)
    # Rotation without restart.
    path.write_text("a-new-token-that-is-long-enough\n")
    assert tok.check("Bearer a-new-token-that-is-long-enough")
    short = AdminToken(str(tmp_path / "short"))
    (tmp_path / "short").write_text("abc")
    with pytest.raises(TokenError, match="shorter than 16"):
        short.ensure(generate=False)
    with pytest.raises(TokenError, match="cannot read admin token file"):
        AdminToken(str(tmp_path / "absent")).ensure(generate=False)


def test_sdnotify_plain_and_abstract_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert SystemdNotifier().notify("READY=1") is False  # no systemd: silently nothing
    for addr in (str(tmp_path / "n.sock"), "@gpufleet-test-" + str(os.getpid())):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(addr if not addr.startswith("@") else "\0" + addr[1:])
        n = SystemdNotifier(addr)
        assert n.ready("up") and n.status("two\nlines")
        assert s.recv(100) == b"READY=1\nSTATUS=up"
        assert s.recv(100) == b"STATUS=two lines"
        n.close()
        s.close()
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert SystemdNotifier("").watchdog_usec is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert SystemdNotifier("").watchdog_usec == 4000000
