"""``gpuctl demo --standalone``: one agent, no etcd, from a config file (the shipped
examples/standalone-demo.toml by default).

The agent runs from the demo's copy of that file in ``./.gpufleet-demo/standalone/agent.toml``:
its state, logs and (when the file has the agent generate one) admin token go there, whatever
the file says, so the shipped example works from an installed wheel without writing into
site-packages. Other relative paths in the file keep meaning "next to the file".
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpufleet import tomlwrite

from .demo_base import StopFlag, demo_dir, run_demo
from .demo_traffic import format_answers, send_chats
from .localfleet import AgentProcess

_CLUSTER_FILES = ("ca_file", "cert_file", "key_file", "password_file")


def demo_copy(config: Path, root: Path) -> str:
    """``config`` as the demo runs it: state, logs and a generated admin token under ``root``,
    the [cluster] section's relative file paths made absolute (they name files next to ``config``)."""
    doc: dict[str, Any] = tomllib.loads(config.read_text())
    agent = doc.setdefault("agent", {})
    agent["state_dir"] = root / "state"
    agent["log_dir"] = root / "logs"
    if agent.get("admin_token_generate"):  # the token is the demo's own: a fresh one each run
        agent["admin_token_file"] = root / "admin-token"
    elif agent.get("admin_token_file"):
        agent["admin_token_file"] = config.parent / agent["admin_token_file"]
    cluster = doc.get("cluster")
    if isinstance(cluster, dict):
        for key in _CLUSTER_FILES:
            if isinstance(cluster.get(key), str):
                cluster[key] = config.parent / cluster[key]
    return tomlwrite.dumps(doc, f"gpuctl demo --standalone: {config.resolve()}, with its state in this directory")


def chat_models(cfg: Any) -> list[str]:
    """Each chat model the config serves, twice (two answers show how the proxy spreads them)."""
    served = []
    for inst in cfg.instances:
        if inst.warmup.kind != "embedding" and inst.client_model not in served:
            served.append(inst.client_model)
    return served * 2


def run_standalone_demo(config: Path, duration: float, show_status: Callable[[str], None]) -> int:
    from agent.config import load_config
    from gpufleet.facts import EX_USAGE
    from gpufleet.tomlconfig import ConfigError

    try:
        load_config(config)  # problems are reported against the file the user gave
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EX_USAGE
    root = demo_dir("standalone")
    text = demo_copy(config, root)
    (root / "agent.toml").write_text(text)
    cfg = load_config(root / "agent.toml")
    agent = AgentProcess(root, text, cfg.agent.listen_port, name="gpu-agent", new_session=True)
    url = agent.base
    print(f"starting gpu-agent with {config} (state and log: {root}/)", flush=True)

    def body(stop: StopFlag) -> int:
        agent.start()
        agent.wait_ready_sync(timeout=90)
        show_status(url)
        print(f"\nchat requests through {url}/v1, and which instance answered:", flush=True)
        node = cfg.agent.node_id
        print(format_answers(send_chats(url, node, agent.log_path, chat_models(cfg)), node), flush=True)
        print(
            f"""
Agent API:   {url}/v1/status   {url}/metrics   {url}/readyz      Proxy: {url}/v1
Admin token: {cfg.agent.admin_token_file}
Try:         curl -s {url}/v1/models
             kill -9 <a PID above>   # and watch it come back: gpuctl status --agent {url}
Ctrl-C stops the agent and every model server it started.""",
            flush=True,
        )
        return stop.serve([agent], duration)

    def cleanup() -> None:
        agent.stop(45)
        print(f"gpu-agent stopped (exit {agent.proc.returncode if agent.proc else None})", flush=True)

    return run_demo(body, cleanup)
