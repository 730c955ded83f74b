"""What the fault scenarios share: a cluster-mode agent serving model ``m``, route and chat probes."""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from etcd_fixtures import EtcdCluster
from helpers import AgentProcess, agent_toml, free_port, instance_toml, start_agent_sync

from faults.tcpproxy import FaultProxy
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import RouteRecord

CLUSTER = "faults"
KEYS = Keyspace(CLUSTER)


def proxy_to(etcd: EtcdCluster) -> FaultProxy:
    """A fault-injecting proxy in front of the first member."""
    host, port = etcd.endpoints[0].removeprefix("http://").rsplit(":", 1)
    return FaultProxy(host, int(port)).start()


def cluster_agent(
    tmp: Path,
    node: str,
    endpoint: str | list[str],
    lease_ttl_s: int = 3,
    timeout_s: float = 1.0,
    wrapper: list[str] | None = None,
) -> AgentProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = agent_toml(tmp, port, instance_toml("m", model="m", gpus="[0]", fraction=0.5))
    text = text.replace('node_id = "test-node"', f'node_id = "{node}"\nadvertise_url = "http://127.0.0.1:{port}"')
    text += f"""
[cluster]
endpoints = {json.dumps([endpoint] if isinstance(endpoint, str) else endpoint)}
cluster = "{CLUSTER}"
lease_ttl_s = {lease_ttl_s}
keepalive_interval_s = 1.0
timeout_s = {timeout_s}
"""
    return start_agent_sync(tmp, text, port, ready_instances=1, wrapper=wrapper)


async def endpoint_state(etcd: EtcdCluster, node: str) -> str | None:
    async with etcd.client() as c:
        kv = await c.get(KEYS.route("m"))
    if kv is None:
        return None
    return next((e.state for e in decode(kv.value, RouteRecord).endpoints if e.node == node), None)


def chat(base: str) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def log_time(path: Path, event: str) -> datetime:
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        if doc.get("event") == event:
            return datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
    raise AssertionError(f"{event!r} not in {path}")


async def eq(value: Any, expected: Any) -> bool:
    return await value == expected
