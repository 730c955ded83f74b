"""Restarts that keep the model servers: the handover through systemd's fd store, protocol level.

systemd's side is played here by a small notify-socket server that does what systemd does
with ``FDSTORE=1``/``FDSTOREREMOVE=1`` messages and passes the stored descriptors to the next
process as ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` (sd_listen_fds(3)). The real
systemd does the same in the deployment tests on booted hosts (tests/deploy/).

Checked: the servers outlive the agent while a next agent is due, the next one adopts them
(same PIDs, no restart, no warm-up), the API socket is handed over too, and when the "unit"
stops for good the shims take the servers down (no orphan).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from etcd_fixtures import EtcdCluster
from helpers import (
    AgentProcess,
    NotifySocket,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    instance_toml,
    pid_alive,
    wait_until,
)

from gpufleet.keyspace import Keyspace

pytestmark = pytest.mark.timeout(120)

# Runs as the next agent: puts the passed descriptors at 3, 4, ... and execs the agent with
# LISTEN_PID = its own pid, as systemd's exec does.
LAUNCH = """
import fcntl, os, sys
pairs = [p.split("=") for p in os.environ.pop("PASS_FDS").split(",") if p]
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for _, fd in pairs]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(pairs)), LISTEN_FDNAMES=":".join(n for n, _ in pairs), LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "agent", *sys.argv[1:]])
"""


class FakeFdStore(NotifySocket):
    """The part of systemd's notify socket that keeps descriptors for a service."""

    def __init__(self, path: Path) -> None:
        self.fds: dict[str, list[int]] = {}
        super().__init__(path)

    def received(self, message: str, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in message.splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1":
            self.fds.setdefault(name, []).extend(fds)
        elif fields.get("FDSTOREREMOVE") == "1":
            for fd in self.fds.pop(name, []):
                os.close(fd)
        else:
            super().received(message, fds)

    def names(self) -> set[str]:
        with self.lock:
            return set(self.fds)

    def passing(self) -> str:
        """PASS_FDS for the next process: one descriptor per name, as systemd passes them."""
        with self.lock:
            return ",".join(f"{name}={fds[-1]}" for name, fds in self.fds.items())

    def flush(self) -> None:
        """The unit stopped for good: systemd closes the store."""
        with self.lock:
            for fds in self.fds.values():
                for fd in fds:
                    os.close(fd)
            self.fds = {}

    def close(self) -> None:
        self.flush()
        self.sock.close()


async def test_restart_keeps_servers_and_stop_takes_them_down(tmp_path: Path) -> None:
    store = FakeFdStore(tmp_path / "notify")
    port = free_port()
    cfg = agent_toml(tmp_path, port, instance_toml("a") + instance_toml("b", extra="cpu_quota = 1.0"))
    env = {"NOTIFY_SOCKET": str(store.path)}
    first = AgentProcess(tmp_path, cfg, port, env=env)
    async with first:
        before = {n: await first.wait_state(n, "READY") for n in ("a", "b")}
        want = {"api", "lifeline/a", "output/a", "lifeline/b", "output/b"}
        await wait_until(lambda: want <= store.names(), timeout=10, what="descriptors stored")
    # The first agent exited on SIGTERM (the stop half of `systemctl restart`): servers run on.
    assert first.proc is not None and first.proc.returncode == 0
    assert all(pid_alive(i["pid"]) for i in before.values())
    assert any("leaving the model servers to the next agent" in ln for ln in first.log_lines())
    async with aiohttp.ClientSession() as http:
        # Served while no agent runs at all.
        body = {"model": "a-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with http.post(f"http://127.0.0.1:{before['a']['port']}/v1/chat/completions", json=body) as r:
            assert r.status == 200

    second = AgentProcess(tmp_path, cfg, port, env={**env, "PASS_FDS": store.passing()})
    fds = [int(p.split("=")[1]) for p in store.passing().split(",")]
    second.start = lambda: _start_with_fds(second, fds)  # type: ignore[method-assign]
    async with second:
        for name, old in before.items():
            now = await second.wait_state(name, "READY", timeout=20)
            assert now["pid"] == old["pid"] and now["restarts"] == 0 and now["port"] == old["port"]
        lines = second.log_lines()
        assert sum("instance adopted from the previous agent" in ln for ln in lines) == 2
        assert any("serving on the socket the previous agent handed over" in ln for ln in lines)
        assert not any('"warm-up' in ln for ln in lines)
        assert second.http is not None
        async with second.http.post(second.base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
    # `systemctl stop`: the agent exits, systemd drops the store, the shims stop the servers.
    store.flush()
    await wait_until(
        lambda: not any(pid_alive(i["pid"]) for i in before.values()), timeout=20, what="servers stopped by shims"
    )
    store.close()


def _start_with_fds(agent: AgentProcess, fds: list[int]) -> None:
    agent._log = open(agent.log_path, "ab")
    agent.proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--config", str(agent.config)],
        stdout=agent._log,
        stderr=subprocess.STDOUT,
        env=agent.env,
        pass_fds=fds,
    )


async def test_without_systemd_sigkill_of_the_agent_stops_the_servers(tmp_path: Path) -> None:
    # No notify socket: the agent alone holds the lifelines; its death closes them.
    port = free_port()
    cfg = agent_toml(tmp_path, port, instance_toml("a"))
    async with AgentProcess(tmp_path, cfg, port) as agent:
        pid = (await agent.wait_state("a", "READY"))["pid"]
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        await wait_until(lambda: not pid_alive(pid), timeout=20, what="server stopped by its shim")


async def test_cluster_registration_is_taken_over_not_dropped(tmp_path: Path, etcd: EtcdCluster) -> None:
    """A restart that hands the servers over keeps the node in etcd: the old lease is left, the
    next agent takes the registration over, and the node key never goes away."""
    store = FakeFdStore(tmp_path / "notify")
    port = free_port()
    cfg = as_node(agent_toml(tmp_path, port, instance_toml("a")), "n1") + cluster_toml(
        etcd.endpoints, "handover", lease_ttl_s=10
    )
    key = Keyspace("handover").node("n1")
    env = {"NOTIFY_SOCKET": str(store.path)}
    async with etcd.client() as client:
        async with AgentProcess(tmp_path, cfg, port, env=env) as first:
            await first.wait_state("a", "READY")
            kv = await wait_until(lambda: client.get(key), what="registered")
            first_lease = kv.lease
        assert await client.get(key) is not None  # still registered: the lease was left
        assert any("lease left for the next agent" in ln for ln in first.log_lines())
        second = AgentProcess(tmp_path, cfg, port, env={**env, "PASS_FDS": store.passing()})
        fds = [int(p.split("=")[1]) for p in store.passing().split(",")]
        second.start = lambda: _start_with_fds(second, fds)  # type: ignore[method-assign]
        async with second:
            await second.wait_state("a", "READY")

            async def taken_over() -> bool:
                now = await client.get(key)
                return now is not None and now.lease != first_lease

            await wait_until(taken_over, timeout=10, what="registration taken over")
            assert any("took over the registration" in ln for ln in second.log_lines())
    store.close()


async def test_a_changed_instance_is_replaced_not_adopted(tmp_path: Path) -> None:
    store = FakeFdStore(tmp_path / "notify")
    port = free_port()
    env = {"NOTIFY_SOCKET": str(store.path)}
    cfg = agent_toml(tmp_path, port, instance_toml("a"))
    async with AgentProcess(tmp_path, cfg, port, env=env) as first:
        old = await first.wait_state("a", "READY")
        await wait_until(lambda: {"lifeline/a", "output/a"} <= store.names(), timeout=10, what="stored")
    changed = cfg.replace(instance_toml("a"), instance_toml("a", args='["--latency-ms", "1"]'))
    second = AgentProcess(tmp_path, changed, port, env={**env, "PASS_FDS": store.passing()})
    fds = [int(p.split("=")[1]) for p in store.passing().split(",")]
    second.start = lambda: _start_with_fds(second, fds)  # type: ignore[method-assign]
    async with second:
        new = await second.wait_state("a", "READY", timeout=20)
        assert new["pid"] != old["pid"]
        await wait_until(lambda: not pid_alive(old["pid"]), timeout=20, what="old server stopped")
        assert any("has another config; replacing it" in ln for ln in second.log_lines())
        # The new server's descriptors are the ones systemd keeps now.
        await wait_until(lambda: {"lifeline/a", "output/a"} <= store.names(), timeout=10, what="new ones stored")
    store.close()


async def test_keep_servers_on_restart_false_hands_nothing_over(tmp_path: Path) -> None:
    store = FakeFdStore(tmp_path / "notify")
    port = free_port()
    cfg = agent_toml(tmp_path, port, instance_toml("a"), supervisor="keep_servers_on_restart = false")
    async with AgentProcess(tmp_path, cfg, port, env={"NOTIFY_SOCKET": str(store.path)}) as agent:
        pid = (await agent.wait_state("a", "READY"))["pid"]
        await wait_until(lambda: any("READY=1" in m for m in store.messages), what="READY=1 sent")
        assert store.names() == set()  # so not even a crash leaves the server running
    assert not pid_alive(pid)  # SIGTERM stopped it
    store.close()
