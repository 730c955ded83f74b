"""A one-node cluster for registry tests: etcd, one coordinator, and one agent with simulated
GPUs that runs the replicas the leader assigns with the simulated vLLM server; gpuctl against it.
A model directory ``shared/<name>`` is made for each model name given."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


def agent_config(cluster: str, etcd: EtcdCluster, agent_dir: Path, port: int, shared: Path, gpus: str | None) -> str:
    text = as_node(agent_toml(agent_dir, port, "", gpus=gpus), NODE, f"http://127.0.0.1:{port}")
    text += cluster_toml(etcd.endpoints, cluster, telemetry_min_gap_s=0.2)
    return text + f'\n[models]\nlaunchers = {{ vllm = {SIM_LAUNCHER} }}\nallowed_roots = ["{shared}"]\n'


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
        base = agent_config(self.cluster, self.etcd, self.agent.tmp, self.agent.port, self.shared, self.gpus)
        return base + extra

    def gpuctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        etcd = ",".join(self.etcd.endpoints)
        argv = [sys.executable, "-m", "gpuctl.main", "--etcd", etcd, "--cluster", self.cluster, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)


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
        text = agent_config(cluster, etcd, agent_dir, port, shared, gpus) + agent_extra
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
