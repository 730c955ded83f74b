"""What the fault scenarios share: a cluster-mode agent serving model ``m``, route and chat probes."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

from etcd_fixtures import EtcdCluster
from helpers import (
    AgentProcess,
    agent_toml,
    as_node,
    cluster_toml,
    free_port,
    instance_toml,
    start_agent_sync,
    wait_until,
)

from faults.tcpproxy import FaultProxy
from gpufleet.etcd import Delete, KeyValue, Put, Snapshot, list_watch
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import LeaderRecord, RouteRecord
from gpufleet.routeslices import RouteAssembly, read_routes
from gpufleet.tomlwrite import dumps as toml_dumps

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
    host: str = "127.0.0.1",
) -> AgentProcess:
    """An agent serving model ``m``; ``host``: the address it listens and is reached at (an agent
    in its own network namespace listens on its link's address)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = agent_toml(tmp, port, instance_toml("m", model="m", gpus="[0]", fraction=0.5))
    text = as_node(text, node, f"http://{host}:{port}", host)
    endpoints = [endpoint] if isinstance(endpoint, str) else endpoint
    text += cluster_toml(endpoints, CLUSTER, lease_ttl_s=lease_ttl_s, timeout_s=timeout_s)
    if host != "127.0.0.1":
        # Reachable from other hosts (a network namespace's link): API keys would be the default,
        # and these scenarios are about faults, not keys; said plainly, as the config allows.
        text += "\n" + toml_dumps({"auth": {"mode": "open"}})
    return start_agent_sync(tmp, text, port, ready_instances=1, wrapper=wrapper, host=host)


async def endpoint_state(etcd: EtcdCluster, node: str, model: str = "m") -> str | None:
    """The node's state in ``model``'s route; None without a route or an endpoint there."""
    async with etcd.client() as c:
        r = (await read_routes(c, KEYS)).get(model)
    if r is None:
        return None
    return next((e.state for e in r.endpoints if e.node == node), None)


def chat(base: str, model: str = "m") -> tuple[int, dict[str, Any]]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def post_json(url: str, body: dict[str, Any] | None = None, token: str | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, json.dumps(body or {}).encode(), headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def agent_status(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/v1/status", timeout=5) as r:
        return json.loads(r.read())


def stop_all(*procs: Any) -> None:
    """Stop agents, coordinators and proxies in the order given; None (never started) is skipped."""
    for p in procs:
        if p is not None:
            p.stop()


def log_time(path: Path, event: str) -> datetime:
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        if doc.get("event") == event:
            return datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
    raise AssertionError(f"{event!r} not in {path}")


async def eq(value: Any, expected: Any) -> bool:
    return await value == expected


async def neq(value: Any, expected: Any) -> bool:
    return await value != expected


class Recorder:
    """Every route state and every leader key version, from a watch on the cluster's keys: what the
    agents and operators saw during a scenario. Use as ``async with Recorder(etcd) as seen``."""

    def __init__(self, etcd: EtcdCluster) -> None:
        self._etcd = etcd
        self.states: dict[str, list[str]] = {}  # node -> route states of model m, in order, repeats collapsed
        self.leaders: list[tuple[int, str] | None] = []  # (epoch, coordinator); None: no leader key
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        self._client = await self._etcd.client().__aenter__()
        self._task = asyncio.create_task(self._run())
        await wait_until(lambda: self.leaders or self.states, timeout=10, what="the recorder's first listing")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._client.__aexit__(None, None, None)

    def _route(self, route: RouteRecord | None) -> None:
        now = {e.node: e.state for e in route.endpoints} if route else {}
        for node in self.states.keys() - now.keys():
            now[node] = "ABSENT"  # left the route altogether (e.g. a new leader never saw it)
        for node, state in now.items():
            seen = self.states.setdefault(node, [])
            if not seen or seen[-1] != state:
                seen.append(state)

    def _leader(self, kv: KeyValue | None) -> None:
        now = (kv.create_revision, decode(kv.value, LeaderRecord).coordinator) if kv else None
        if not self.leaders or self.leaders[-1] != now:
            self.leaders.append(now)

    async def _run(self) -> None:
        leader_key = KEYS.leader.encode()
        routes = RouteAssembly(KEYS)
        async for change in list_watch(self._client, KEYS.prefix, idle_timeout=2.0):
            if isinstance(change, Snapshot):
                routes = RouteAssembly(KEYS)
                kvs = {kv.key: kv for kv in change.kvs}
                self._leader(kvs.get(leader_key))
                for kv in change.kvs:
                    routes.put(kv.key_str, kv.value, kv.mod_revision)
                self._route(routes.assemble("m"))
            elif isinstance(change, Put) and change.kv.key == leader_key:
                self._leader(change.kv)
            elif isinstance(change, Delete) and change.key == leader_key:
                self._leader(None)
            else:  # a route's header or slice: the route as readers see it once the txn is applied
                key = change.kv.key_str if isinstance(change, Put) else change.key_str
                if routes.model_of(key) != "m":
                    continue
                if isinstance(change, Put):
                    routes.put(key, change.kv.value, change.kv.mod_revision)
                else:
                    routes.delete(key)
                if change.last:
                    self._route(routes.assemble("m"))


def endpoint_in_use(log_path: Path) -> str | None:
    """The etcd endpoint a daemon's client last said it uses (its "etcd endpoint ..." log lines)."""
    current = None
    for line in log_path.read_text().splitlines():
        if '"etcd endpoint' in line:
            doc = json.loads(line)
            if doc.get("event") in ("etcd endpoint in use", "etcd endpoint switched"):
                current = doc["endpoint"]
    return current
