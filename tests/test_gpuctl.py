"""gpuctl against a real agent: the demo command, status, instance actions and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import TOKEN, AgentProcess, agent_toml, free_port, instance_toml

ROOT = Path(__file__).resolve().parent.parent


def gpuctl(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuctl.main", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_demo_starts_everything_and_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    text = (ROOT / "examples" / "standalone-demo.toml").read_text()
    text = text.replace("listen_port = 8080", f"listen_port = {port}").replace('"../.demo/', f'"{tmp_path}/')
    text = text.replace("port_base = 8100", f"port_base = {port + 1}")
    cfg = tmp_path / "demo.toml"
    cfg.write_text(text)
    res = gpuctl("demo", "--standalone", "--config", str(cfg), "--duration", "0.5", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ready=yes" in res.stdout
    for name in ("qwen-a", "qwen-b", "llama-70b", "embed"):
        assert name in res.stdout
    assert "gpu-agent stopped (exit 0)" in res.stdout
    pids = [int(line.split()[6]) for line in res.stdout.splitlines() if line.split()[:1] in (["qwen-a"], ["embed"])]
    assert pids and not any(Path(f"/proc/{p}").exists() for p in pids)


def test_cluster_demo_with_chaos() -> None:
    """The README's first command: etcd, two coordinators, three agents; a node killed, its
    routes marked DOWN; every process stopped at the end."""
    from helpers import free_port_block

    base = free_port_block(span=260)
    res = gpuctl("demo", "--base-port", str(base), "--duration", "3", "--chaos", "0.5", timeout=240)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-2000:]
    assert "leader: c" in out and "gpu-h100-1" in out and "qwen2.5-7b" in out
    assert "chaos: gpu-a100-1 DOWN in the routes" in out
    assert f"Dashboard:          http://127.0.0.1:{base + 20}/ui" in out
    assert "model qwen2-7b registered: 2 replica(s)" in out
    assert "all demo processes stopped" in out
    left = subprocess.run(["pgrep", "-f", f"demo/cluster|127.0.0.1:{base}"], capture_output=True, text=True).stdout
    assert left.strip() == ""


async def test_status_and_instance_commands(tmp_path: Path) -> None:
    port = free_port()
    async with AgentProcess(tmp_path, agent_toml(tmp_path, port, instance_toml("a")), port) as agent:
        await agent.wait_state("a", "READY")
        res = gpuctl("--agent", agent.base, "status")
        assert res.returncode == 0 and "READY" in res.stdout and "A100" in res.stdout
        res = gpuctl("--agent", agent.base, "-o", "json", "status")
        assert json.loads(res.stdout)["instances"][0]["name"] == "a"
        (tmp_path / "tok").write_text(TOKEN)
        res = gpuctl("--agent", agent.base, "instance", "restart", "a", "--token-file", str(tmp_path / "tok"))
        assert res.returncode == 0 and "accepted" in res.stdout
        res = gpuctl("--agent", agent.base, "instance", "restart", "zzz", "--token-file", str(tmp_path / "tok"))
        assert res.returncode == 1 and "no instance named 'zzz'" in res.stderr


def test_exit_codes_unreachable_and_usage() -> None:
    res = gpuctl("--agent", f"http://127.0.0.1:{free_port()}", "status")
    assert res.returncode == 2 and "cannot reach" in res.stderr
    assert gpuctl("frobnicate").returncode == 64
