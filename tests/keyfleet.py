"""What the API-key cluster tests share: agents in keys mode with the cluster's hop secret, and
``gpuctl`` on the test's cluster (keys made with it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from etcd_fixtures import EtcdCluster
from helpers import AgentProcess, agent_toml, as_node, cluster_toml, free_port, instance_toml, start_agent_sync

from gpufleet.tomlwrite import dumps as toml_dumps


class KeyFleet:
    def __init__(self, etcd: EtcdCluster, tmp: Path, cluster: str) -> None:
        self.etcd, self.tmp, self.cluster = etcd, tmp, cluster
        self.hop_secret = tmp / "hop-secret"
        self.hop_secret.write_text("0123456789abcdef" * 4 + "\n")
        self.hop_secret.chmod(0o600)

    @staticmethod
    def gpuctl_on(etcd: EtcdCluster, cluster: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gpuctl", "--etcd", ",".join(etcd.endpoints), "--cluster", cluster]
        return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)

    def gpuctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.gpuctl_on(self.etcd, self.cluster, *args)

    def create_key(self, name: str, *options: str) -> str:
        """A new key's secret."""
        created = self.gpuctl("keys", "create", name, *options, "-o", "json")
        assert created.returncode == 0, created.stderr
        return json.loads(created.stdout)["secret"]

    def agent(self, node: str, model: str, telemetry_min_gap_s: float | None = None) -> AgentProcess:
        """A cluster agent in keys mode serving ``model`` (instance ``<model>-0``)."""
        tmp = self.tmp / node
        tmp.mkdir(parents=True, exist_ok=True)
        port = free_port()
        text = agent_toml(tmp, port, instance_toml(f"{model}-0", model=model, gpus="[0]", fraction=0.5))
        text = as_node(text, node, f"http://127.0.0.1:{port}")
        text += cluster_toml(self.etcd.endpoints, self.cluster, telemetry_min_gap_s=telemetry_min_gap_s)
        text += "\n" + toml_dumps({"auth": {"mode": "keys", "hop_secret_file": self.hop_secret}})
        return start_agent_sync(tmp, text, port, ready_instances=1)
