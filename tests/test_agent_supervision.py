"""gpu-agent as users run it: a real agent process, real simulated model servers, real HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

import aiohttp
from helpers import AgentProcess, agent_toml, free_port, instance_toml, pid_alive, wait_until


async def test_instances_reach_ready_and_report_status(tmp_path: Path) -> None:
    port = free_port()
    cfg = agent_toml(
        tmp_path,
        port,
        instance_toml("a", gpus="[0]", fraction=0.4, args='["--startup-delay", "0.5"]')
        + instance_toml("b", gpus="[0]", fraction=0.3)
        + instance_toml("cpu", extra='warmup = { kind = "embedding" }'),
    )
    async with AgentProcess(tmp_path, cfg, port) as agent:
        assert agent.http is not None
        async with agent.http.get(agent.base + "/readyz") as r:
            # Right after start the instances are still loading: not ready, and it says why.
            body = await r.json()
            if r.status == 503:
                assert body["status"] == "not ready"
        for name in ("a", "b", "cpu"):
            await agent.wait_state(name, "READY")
        async with agent.http.get(agent.base + "/readyz") as r:
            assert r.status == 200
        st = await agent.status()
        assert st["node"] == "test-node" and st["gpu_source"] == "simulated" and st["gpu_classes"] == ["A100"]
        a = next(i for i in st["instances"] if i["name"] == "a")
        assert a["model"] == "a-model" and a["gpus"] == [0] and a["pid"] and a["restarts"] == 0
        assert a["load"]["requests_running"] == 0.0
        # The simulated GPU reports the two loaded instances' memory (0.4 + 0.3 of 80 GiB).
        gpu = st["gpus"][0]
        assert gpu["memory_used_bytes"] == int(0.4 * 80 * 2**30) + int(0.3 * 80 * 2**30)
        # The instance really serves on its port with the CUDA_VISIBLE_DEVICES we set.
        async with agent.http.get(f"http://127.0.0.1:{a['port']}/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "a-model"
        env = Path(f"/proc/{a['pid']}/environ").read_bytes().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=0" in env
        cpu = next(i for i in st["instances"] if i["name"] == "cpu")
        assert b"CUDA_VISIBLE_DEVICES=" in Path(f"/proc/{cpu['pid']}/environ").read_bytes().split(b"\0")
        # Per-instance log files with the server's own output.
        assert "Application startup complete" in (tmp_path / "logs" / "a.log").read_text()

        async with agent.http.get(agent.base + "/metrics") as r:
            text = await r.text()
        for needle in (
            'gpu_agent_gpu_temperature_celsius{gpu="0"',
            "gpu_agent_gpu_memory_used_bytes{",
            'gpu_agent_instance_state{backend="vllm",instance="a",model="a-model",state="READY"} 1.0',
            "gpu_agent_instance_restarts_total{",
            "gpu_agent_ready 1.0",
        ):
            assert needle in text, needle
        pids = [i["pid"] for i in st["instances"]]
    # SIGTERM: the agent stops its instances before exiting 0.
    assert agent.proc is not None and agent.proc.returncode == 0
    assert not any(pid_alive(p) for p in pids)


async def test_kill_9_instance_is_restarted(tmp_path: Path) -> None:
    port = free_port()
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, instance_toml("a")), port) as agent:
        first = await agent.wait_state("a", "READY")
        os.kill(first["pid"], signal.SIGKILL)
        again = await agent.wait_state("a", "READY", restarts=1)
        assert again["pid"] != first["pid"]
        assert "SIGKILL" in (again["last_error"] or "")


async def test_hung_instance_is_restarted(tmp_path: Path) -> None:
    port = free_port()
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, instance_toml("a")), port) as agent:
        first = await agent.wait_state("a", "READY")
        assert agent.http is not None
        async with agent.http.post(f"http://127.0.0.1:{first['port']}/sim/control", json={"hang": True}) as r:
            assert r.status == 200
        again = await agent.wait_state("a", "READY", restarts=1)
        assert again["pid"] != first["pid"]
        assert "consecutive failed probes" in again["last_error"]
        assert not pid_alive(first["pid"])


async def test_crash_loop_ends_in_failed(tmp_path: Path) -> None:
    port = free_port()
    # The server crashes on its first inference request, i.e. the warm-up: it never gets READY.
    inst = instance_toml("a", args='["--crash-after", "1"]')
    cfg = agent_toml(tmp_path, port, inst, supervisor="crash_loop_restarts = 2\n")
    async with AgentProcess(tmp_path, cfg, port) as agent:
        failed = await agent.wait_state("a", "FAILED", timeout=60)
        assert "crash loop" in failed["last_error"] and failed["restarts"] == 2
        assert failed["pid"] is None
        # An operator start forgives the history and tries again.
        status, _ = await agent.admin("/admin/instances/a/start")
        assert status == 202
        await agent.wait_state("a", "STARTING", timeout=10)


async def test_sigkill_of_agent_leaves_no_model_server(tmp_path: Path) -> None:
    port = free_port()
    cfg = agent_toml(tmp_path, port, instance_toml("a") + instance_toml("b"))
    async with AgentProcess(tmp_path, cfg, port) as agent:
        pids = [(await agent.wait_state(n, "READY"))["pid"] for n in ("a", "b")]
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait()
        await wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10, what="model servers to die")


async def test_forked_workers_go_with_the_server_or_the_next_agent(tmp_path: Path) -> None:
    """A worker a model server forks (as vLLM forks its engine) stays in the server's process
    group, which the shim takes down when the agent dies. One that left the group for its own
    (still in the session) outlives that; the next agent start kills what is left of the session."""
    port = free_port()
    # backend = "command": sh forks two long-lived "workers", one that moves to a process group
    # of its own (setpgid), then execs the server in its place.
    script = (
        "sleep 600 & echo worker=$! ; "
        "{python} -c 'import os, time; os.setpgid(0, 0); time.sleep(601)' & echo escaped=$! ; "
        "exec {python} -m gpufleet_dev.simulated_server serve m --port {port}"
    )
    inst = f"""
[[instances]]
name = "forker"
backend = "command"
served_model_name = "m"
command = ["sh", "-c", "{script}"]
"""
    cfg = agent_toml(tmp_path, port, inst)
    async with AgentProcess(tmp_path, cfg, port) as agent:
        server = await agent.wait_state("forker", "READY")
        log_text = (tmp_path / "logs" / "forker.log").read_text()
        worker = int(re.search(r"worker=(\d+)", log_text).group(1))  # type: ignore[union-attr]
        escaped = int(re.search(r"escaped=(\d+)", log_text).group(1))  # type: ignore[union-attr]
        assert pid_alive(worker) and pid_alive(escaped)
        assert os.getpgid(escaped) != os.getpgid(worker) and os.getsid(escaped) == os.getsid(worker)
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait()
        await wait_until(lambda: not pid_alive(server["pid"]), timeout=10, what="server stopped by its shim")
        await wait_until(lambda: not pid_alive(worker), timeout=10, what="worker stopped with its group")
        assert pid_alive(escaped)  # the gap that the registry closes
    try:
        async with AgentProcess(tmp_path, cfg, port) as agent2:
            await wait_until(lambda: not pid_alive(escaped), timeout=10, what="escaped worker reaped")
            await wait_until(lambda: any("previous agent" in ln and "forker" in ln for ln in agent2.log_lines()))
            await agent2.wait_state("forker", "READY")
    finally:
        # The second run forked an escaped worker of its own, and nothing starts after it to reap it.
        for pid in map(int, re.findall(r"escaped=(\d+)", (tmp_path / "logs" / "forker.log").read_text())):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_over_committed_gpu_memory_is_refused(tmp_path: Path) -> None:
    """NVML (here the simulated GPU) says 70 of 80 GiB are in use: a 0.4 instance cannot fit."""
    port = free_port()
    gpus = '\n[[gpu.simulated]]\nname = "NVIDIA A10"\nmemory_total_gib = 80\nmemory_used_gib = 70\n'
    cfg = agent_toml(
        tmp_path,
        port,
        instance_toml("big", gpus="[0]", fraction=0.4) + instance_toml("small", gpus="[0]", fraction=0.1),
        gpus=gpus,
    )
    async with AgentProcess(tmp_path, cfg, port) as agent:
        big = await agent.wait_state("big", "FAILED")
        assert big["last_error"].startswith("refused: GPU 0 has")
        assert "big needs 32.0 GiB" in big["last_error"]
        await agent.wait_state("small", "READY")
        # Free memory appears (another tenant exits): an operator start now admits it.
        status, _ = await agent.admin("/admin/gpus/0", body={"memory_used_gib": 0})
        assert status == 200
        assert (await agent.admin("/admin/instances/big/start"))[0] == 202
        await agent.wait_state("big", "READY")


async def test_admin_endpoints_need_the_token(tmp_path: Path) -> None:
    port = free_port()
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, instance_toml("a")), port) as agent:
        first = await agent.wait_state("a", "READY")
        for token in (None, "wrong-token-wrong-token", ""):
            status, body = await agent.admin("/admin/instances/a/restart", token=token)
            assert status == 401 and body["error"]["type"] == "authentication_error"
        assert agent.http is not None
        async with agent.http.post(agent.base + "/admin/instances/a/stop", headers={"Authorization": "Basic x"}) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await agent.admin("/admin/instances/nope/restart"))[0] == 404
        assert (await agent.admin("/admin/instances/a/explode"))[0] == 404
        # Still the same process: nothing happened without the token.
        assert (await agent.instance("a"))["pid"] == first["pid"]

        status, body = await agent.admin("/admin/instances/a/stop")
        assert status == 202 and body["accepted"] == "stop"
        stopped = await agent.wait_state("a", "STOPPED")
        assert stopped["pid"] is None and not pid_alive(first["pid"])
        assert (await agent.admin("/admin/instances/a/start"))[0] == 202
        started = await agent.wait_state("a", "READY")
        assert (await agent.admin("/admin/instances/a/restart"))[0] == 202
        restarted = await wait_until(
            lambda: _pid_changed(agent, "a", started["pid"]), timeout=30, what="restart with a new pid"
        )
        assert restarted["restarts"] == 0  # an operator restart is not a failure
        # The token never appears in the agent's logs.
        assert all("test-admin-token" not in line for line in agent.log_lines())


async def _pid_changed(agent: AgentProcess, name: str, old: int) -> dict | None:
    i = await agent.instance(name)
    return i if i.get("state") == "READY" and i["pid"] != old else None


async def test_admin_disabled_without_token_file(tmp_path: Path) -> None:
    port = free_port()
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, "", token=False), port) as agent:
        status, body = await agent.admin("/admin/instances/a/restart")
        assert status == 403 and body["error"]["code"] == "admin_disabled"


async def test_readyz_is_not_constant(tmp_path: Path) -> None:
    port = free_port()
    cfg = agent_toml(tmp_path, port, instance_toml("a", args='["--startup-delay", "60"]'))
    async with AgentProcess(tmp_path, cfg, port) as agent:
        assert agent.http is not None
        async with agent.http.get(agent.base + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["instances"] == {"a": "STARTING"}


async def test_sighup_reload_applies_only_changes(tmp_path: Path) -> None:
    port = free_port()
    keep, change, drop = instance_toml("keep"), instance_toml("change"), instance_toml("drop")
    cfg = agent_toml(tmp_path, port, keep + change + drop)
    async with AgentProcess(tmp_path, cfg, port) as agent:
        before = {n: await agent.wait_state(n, "READY") for n in ("keep", "change", "drop")}
        new_cfg = cfg.replace(change, instance_toml("change", args='["--latency-ms", "1"]')).replace(
            drop, instance_toml("new")
        )
        agent.config.write_text(new_cfg)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        await agent.wait_state("new", "READY")
        changed = await wait_until(lambda: _pid_changed(agent, "change", before["change"]["pid"]), timeout=30)
        assert changed["port"] == before["change"]["port"]  # allocated ports survive a reload
        st = await agent.status()
        names = {i["name"] for i in st["instances"]}
        assert names == {"keep", "change", "new"}
        assert (await agent.instance("keep"))["pid"] == before["keep"]["pid"]
        assert not pid_alive(before["drop"]["pid"])

        # A broken config is refused; the running one stays.
        agent.config.write_text(new_cfg + "\n[[instances]]\nname = 'x'\n")
        agent.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: any("reload refused" in ln for ln in agent.log_lines()), what="refusal logged")
        assert (await agent.instance("keep"))["pid"] == before["keep"]["pid"]


async def test_sd_notify_messages(tmp_path: Path) -> None:
    import socket

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    port = free_port()
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
    messages: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    try:
        async with AgentProcess(tmp_path, agent_toml(tmp_path, port, instance_toml("a")), port, env=env) as agent:
            await wait_until(lambda: any(m.startswith("READY=1") for m in drain()), what="READY=1")
            await agent.wait_state("a", "READY")
            await wait_until(lambda: any("STATUS=1 instances: 1 ready" in m for m in drain()), what="status line")
            await wait_until(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= 2, what="watchdog pings")
        drain()
        assert "STOPPING=1" in messages
    finally:
        sock.close()


async def test_healthz_and_unknown_route_errors_are_json(tmp_path: Path) -> None:
    port = free_port()
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, ""), port) as agent:
        assert agent.http is not None
        async with agent.http.get(agent.base + "/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "invalid_request_error"
        status, _ = await agent.admin("/admin/gpus/0", body=None)
        assert status == 400
        async with agent.http.post(
            agent.base + "/admin/gpus/0",
            data=b"{not json",
            headers={"Authorization": "Bearer test-admin-token-0123456789abcdef"},
        ) as r:
            assert r.status == 400 and "invalid request" in (await r.json())["error"]["message"]
        async with agent.http.post(
            agent.base + "/admin/gpus/7",
            json={"temperature_c": 90},
            headers={"Authorization": "Bearer test-admin-token-0123456789abcdef"},
        ) as r:
            assert r.status == 404


async def test_heating_a_simulated_gpu_shows_in_status_and_metrics(tmp_path: Path) -> None:
    port = free_port()
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, ""), port) as agent:
        status, gpu = await agent.admin("/admin/gpus/0", body={"temperature_c": 91, "utilization_percent": 75})
        assert status == 200 and gpu["temperature_celsius"] == 91
        assert (await agent.status())["gpus"][0]["temperature_celsius"] == 91
        assert agent.http is not None
        async with agent.http.get(agent.base + "/metrics") as r:
            text = await r.text()
        assert 'gpu_agent_gpu_utilization_ratio{gpu="0",gpu_class="A100"' in text
        assert any(
            line.startswith("gpu_agent_gpu_temperature_celsius{") and line.endswith(" 91.0")
            for line in text.splitlines()
        )


_ = aiohttp  # used through helpers' sessions
