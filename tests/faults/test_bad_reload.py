"""A reload is all-or-nothing: a new config that cannot be applied leaves the running one alone.

Real agents with simulated model servers. Each scenario checks what an operator and the clients
see: the instances keep their PIDs (nothing stopped, nothing restarted), the proxy keeps
answering, the admin API answers a 4xx JSON error naming the problem, systemd hears
``RELOADING=1`` followed by ``READY=1`` with a status line saying why the reload failed, and the
SIGHUP path leaves no "Task exception was never retrieved" behind.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from helpers import TOKEN, AgentProcess, NotifySocket, agent_toml, free_port, instance_toml, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def notify(tmp_path: Path):  # type: ignore[no-untyped-def]
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


async def pids(agent: AgentProcess) -> dict[str, int]:
    return {i["name"]: i["pid"] for i in (await agent.status())["instances"]}


async def chat_ok(agent: AgentProcess, model: str) -> bool:
    assert agent.http is not None
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with agent.http.post(agent.base + "/v1/chat/completions", json=body) as r:
        return r.status == 200


class Traffic:
    """Chat requests through the agent's proxy, one after another, until stopped."""

    def __init__(self, agent: AgentProcess, models: list[str]) -> None:
        self.agent, self.models = agent, models
        self.answered = self.failed = 0
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            for model in self.models:
                try:
                    ok = await chat_ok(self.agent, model)
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                self.answered, self.failed = self.answered + ok, self.failed + (not ok)

    async def stop(self, at_least: int = 20) -> tuple[int, int]:
        """After ``at_least`` requests in all (before, during and after the fault): (answered, failed)."""
        await wait_until(lambda: self.answered + self.failed >= at_least, timeout=10, what="requests")
        self._stop.set()
        await self._task
        return self.answered, self.failed


def no_unretrieved_task_errors(agent: AgentProcess) -> None:
    text = agent.log_path.read_text()
    assert "Task exception was never retrieved" not in text
    assert "Traceback" not in text


async def sighup_refused(agent: AgentProcess, notify: NotifySocket, count: int) -> str:
    """SIGHUP, then wait until the agent logged its ``count``-th refusal and told systemd READY=1."""
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    await wait_until(
        lambda: sum('"reload refused' in ln for ln in agent.log_lines()) >= count, timeout=10, what="refusal logged"
    )
    return await wait_until(lambda: notify.ready_after_reload(count), timeout=10, what="READY=1 after RELOADING=1")


async def test_empty_config_file_is_refused_and_everything_keeps_running(tmp_path: Path, notify) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    good = agent_toml(tmp_path, port, instance_toml("a") + instance_toml("b"))
    async with AgentProcess(tmp_path, good, port, env={"NOTIFY_SOCKET": str(notify.path)}) as agent:
        await agent.wait_state("a", "READY")
        await agent.wait_state("b", "READY")
        before = await pids(agent)
        clients = Traffic(agent, ["a-model", "b-model"])

        agent.config.write_text("")  # truncated by a failed write
        t0 = time.monotonic()
        status, body = await agent.admin("/admin/reload")
        refused_s = time.monotonic() - t0
        assert status == 422, body
        assert body["error"]["code"] == "config_invalid"
        assert f"{agent.config}: $: empty config file" in body["error"]["message"]
        assert any(f"{agent.config}: $: empty config file" in p for p in body["problems"])
        ready = await wait_until(notify.ready_after_reload, timeout=10, what="READY=1 after RELOADING=1")
        assert "STATUS=reload failed" in ready and "empty config file" in ready

        # The same through SIGHUP (systemctl reload), with a comments-only file.
        agent.config.write_text("# agent config\n\n   \n")
        t0 = time.monotonic()
        ready = await sighup_refused(agent, notify, count=2)
        sighup_s = time.monotonic() - t0
        assert "STATUS=reload failed" in ready
        answered, failed = await clients.stop()
        print(
            f"\nempty-file reload: refused in {refused_s * 1000:.0f} ms (admin API), SIGHUP to READY=1 "
            f"{sighup_s * 1000:.0f} ms; requests during both: {answered} answered, {failed} failed"
        )
        assert failed == 0 and answered > 0

        assert await pids(agent) == before
        assert await chat_ok(agent, "a-model") and await chat_ok(agent, "b-model")

        # The file fixed: the next reload applies (nothing to change) and clears the failure.
        agent.config.write_text(good)
        status, body = await agent.admin("/admin/reload")
        assert status == 200 and body["status"] == "applied" and body["unchanged"] == ["a", "b"], body
        ready = await wait_until(lambda: notify.ready_after_reload(3), timeout=10, what="READY=1 after reload 3")
        assert "reload failed" not in ready and "STATUS=2 instances" in ready
        no_unretrieved_task_errors(agent)


def hold_port(text: str, offset: int) -> socket.socket:
    """Another process's listener on the config's ``port_base + offset``."""
    base = int(re.search(r"^port_base = (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    s = socket.socket()
    s.bind(("127.0.0.1", base + offset))
    s.listen()
    return s


async def test_reload_that_cannot_be_planned_changes_nothing(tmp_path: Path, notify) -> None:  # type: ignore[no-untyped-def]
    """Port span 3, two instances, and another process on the third port: a third instance has
    no port. Instance ``b`` also changes: a half-applied reload stopped it before it found out
    there was no port for ``c``."""
    port = free_port()
    two = instance_toml("a") + instance_toml("b")
    text = agent_toml(tmp_path, port, two, supervisor="port_span = 3")
    with hold_port(text, 2):
        async with AgentProcess(tmp_path, text, port, env={"NOTIFY_SOCKET": str(notify.path)}) as agent:
            await agent.wait_state("a", "READY")
            await agent.wait_state("b", "READY")
            before = await pids(agent)
            clients = Traffic(agent, ["a-model", "b-model"])

            changed_b = instance_toml("b", args='["--latency-ms", "1"]')
            agent.config.write_text(text.replace(instance_toml("b"), changed_b) + instance_toml("c"))
            t0 = time.monotonic()
            status, body = await agent.admin("/admin/reload")
            refused_s = time.monotonic() - t0
            assert status == 409, body
            assert body["error"]["code"] == "reload_not_applicable"
            assert "no free port" in body["error"]["message"] and "'c'" in body["error"]["message"]
            ready = await wait_until(notify.ready_after_reload, timeout=10, what="READY=1 after RELOADING=1")
            assert "STATUS=reload failed" in ready and "no free port" in ready

            t0 = time.monotonic()
            ready = await sighup_refused(agent, notify, count=2)
            sighup_s = time.monotonic() - t0
            assert "no free port" in ready
            answered, failed = await clients.stop()
            print(
                f"\nunplannable reload: refused in {refused_s * 1000:.0f} ms (admin API), SIGHUP to READY=1 "
                f"{sighup_s * 1000:.0f} ms; requests during both: {answered} answered, {failed} failed"
            )
            assert failed == 0 and answered > 0

            assert await pids(agent) == before
            st = await agent.status()
            assert "no free port" in (st["config"]["last_reload_failure"] or "")
            assert {i["name"]: i["state"] for i in st["instances"]} == {"a": "READY", "b": "READY"}
            assert await chat_ok(agent, "b-model")
            no_unretrieved_task_errors(agent)


async def test_cluster_change_on_reload_is_reported_and_the_live_part_applies(tmp_path: Path) -> None:
    port = free_port()
    text = agent_toml(tmp_path, port, instance_toml("a"))
    async with AgentProcess(tmp_path, text, port) as agent:
        await agent.wait_state("a", "READY")
        before = await pids(agent)
        cluster = '\n[cluster]\nendpoints = ["http://127.0.0.1:1"]\ncluster = "prod"\n'
        agent.config.write_text(text + instance_toml("extra") + cluster)
        status, body = await agent.admin("/admin/reload")
        assert status == 200, body
        assert body["added"] == ["extra"] and body["unchanged"] == ["a"]
        assert body["restart_needed"] == ["cluster"]
        assert any("[cluster] changed; restart needed" in w for w in body["warnings"])
        await agent.wait_state("extra", "READY")
        assert (await pids(agent))["a"] == before["a"]
        assert any("[cluster] changed; restart needed" in ln for ln in agent.log_lines())
        # Still standalone: the cluster section waits for the restart, and /v1/status says so.
        st = await agent.status()
        assert st["mode"] == "standalone"
        assert st["config"] == {"last_reload_failure": None, "restart_needed": ["cluster"]}


def test_startup_with_an_unplannable_config_exits_78(tmp_path: Path) -> None:
    port = free_port()
    text = agent_toml(tmp_path, port, instance_toml("a") + instance_toml("b"), supervisor="port_span = 2")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(text)
    with hold_port(text, 1):  # valid on paper (check-config passes), but 'b' finds no free port
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(cfg)], capture_output=True, text=True, timeout=30
        )
    print(f"\nunplannable start-up: exit {res.returncode} after {time.monotonic() - t0:.2f} s")
    out = res.stdout + res.stderr
    assert res.returncode == 78, out
    assert "no free port" in out and "'b'" in out
    assert "Traceback" not in out


_ = TOKEN
