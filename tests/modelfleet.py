"""Clusters for registry tests: etcd, one coordinator, and agents with simulated GPUs that run
the replicas the leader assigns with the simulated vLLM server; gpuctl against them.

``one_node_fleet``: one agent; a model directory ``shared/<name>`` is made for each model name
given. ``model_fleet``: several agents, one simulated GPU each (node -> GPU name); the caller
lays out the shared storage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etcd_fixtures import EtcdCluster
from helpers import (
    SIM_LAUNCHER,
    AgentProcess,
    CoordinatorProcess,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    start_agent_sync,
)

NODE = "n1"


def agent_config(
    cluster: str,
    etcd: EtcdCluster,
    agent_dir: Path,
    port: int,
    roots: list[Path],
    gpus: str | None,
    node: str = NODE,
) -> str:
    """An agent of the cluster that runs assigned replicas from ``roots``; its last section is
    ``[models]``, so text appended goes there until the next section header."""
    text = as_node(agent_toml(agent_dir, port, "", gpus=gpus), node, f"http://127.0.0.1:{port}")
    text += cluster_toml(etcd.endpoints, cluster, telemetry_min_gap_s=0.2)
    allowed = ", ".join(f'"{r}"' for r in roots)
    return text + f"\n[models]\nlaunchers = {{ vllm = {SIM_LAUNCHER} }}\nallowed_roots = [{allowed}]\n"


def gpuctl(etcd: EtcdCluster, cluster: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gpuctl.main", "--etcd", ",".join(etcd.endpoints), "--cluster", cluster, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@dataclass
class OneNodeFleet:
    cluster: str
    etcd: EtcdCluster
    agent: AgentProcess
    coordinator: CoordinatorProcess
    shared: Path
    gpus: str | None

    def agent_config(self, extra: str = "") -> str:
        """The agent's config text (``extra``: more TOML, e.g. a [proxy] section), for a reload."""
        base = agent_config(self.cluster, self.etcd, self.agent.tmp, self.agent.port, [self.shared], self.gpus)
        return base + extra

    def gpuctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return gpuctl(self.etcd, self.cluster, *args)


@contextmanager
def one_node_fleet(
    tmp: Path, cluster: str, models: list[str], gpus: str | None = None, agent_extra: str = ""
) -> Iterator[OneNodeFleet]:
    etcd = EtcdCluster(1).start()
    shared = tmp / "shared"
    for name in models:
        (shared / name).mkdir(parents=True)
        (shared / name / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    agent_dir = tmp / NODE
    agent_dir.mkdir()
    agent = coordinator = None
    try:
        port = free_port()
        text = agent_config(cluster, etcd, agent_dir, port, [shared], gpus) + agent_extra
        agent = start_agent_sync(agent_dir, text, port, 0)
        coordinator = CoordinatorProcess(tmp, "c1", etcd.endpoints, cluster).start()
        coordinator.wait_ready_sync()
        yield OneNodeFleet(cluster, etcd, agent, coordinator, shared, gpus)
    finally:
        if coordinator is not None:
            coordinator.stop()
        if agent is not None:
            agent.stop()
        etcd.destroy()


@dataclass
class ModelFleet:
    cluster: str
    etcd: EtcdCluster
    tmp: Path
    shared: Path
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    coord: CoordinatorProcess | None = None

    def gpuctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return gpuctl(self.etcd, self.cluster, *args)

    def leader_log(self) -> list[dict[str, Any]]:
        """The coordinator's JSON log lines."""
        lines = (self.tmp / "c1.log").read_text().splitlines()
        return [json.loads(x) for x in lines if x.startswith("{")]


@contextmanager
def model_fleet(
    tmp: Path,
    cluster: str,
    gpus: dict[str, str],
    roots: list[Path],
    *,
    agent_extra: str = "",
    coord_extra: str = "",
    wrapper: Callable[[str], list[str] | None] = lambda node: None,
) -> Iterator[ModelFleet]:
    """Agents named by ``gpus`` (node -> simulated GPU name, 80 GiB, 50 °C), allowed to run
    models under ``roots`` (the first is ``shared``), each started under ``wrapper(node)`` if
    that gives a command; then the coordinator."""
    f = ModelFleet(cluster, EtcdCluster(1).start(), tmp, roots[0])
    try:
        for node, name in gpus.items():
            port = free_port()
            agent_dir = tmp / node
            agent_dir.mkdir(exist_ok=True)
            gpu = f'\n[[gpu.simulated]]\nname = "{name}"\nmemory_total_gib = 80\ntemperature_c = 50\n'
            text = agent_config(cluster, f.etcd, agent_dir, port, roots, gpu, node) + agent_extra
            f.agents[node] = start_agent_sync(agent_dir, text, port, 0, wrapper=wrapper(node))
        f.coord = CoordinatorProcess(tmp, "c1", f.etcd.endpoints, cluster, coord_extra).start()
        f.coord.wait_ready_sync()
        yield f
    finally:
        if f.coord is not None:
            f.coord.stop()
        for a in f.agents.values():
            a.stop()
        f.etcd.destroy()
