"""The one local-fleet harness: real ``gpu-agent`` and ``gpu-coordinator`` processes (and, from
:mod:`gpufleet_dev.localetcd`, etcd members and clusters) on this machine's loopback.

Used by the tests (tests/helpers.py and tests/etcd_fixtures.py re-export it and add pytest
fixtures), by ``gpuctl demo`` and by the benchmarks; it does not depend on pytest. Each process
writes its output to a log file; a failure raises :class:`FleetError` with the log tail.

    fleetbase.py    free ports, waits with deadlines, Daemon (one process, stop/kill/signals)
    localtls.py     TLS material for etcd
    localetcd.py    EtcdMember, EtcdCluster (TLS, auth, snapshot save/restore, wipe)
    fleetconfig.py  agent / instance / cluster / coordinator configs (the one TOML writer)
    localfleet.py   AgentProcess, CoordinatorProcess, start_agent_sync
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from gpufleet.tomlwrite import dumps as toml_dumps

from .fleetbase import Daemon, FleetError, free_port, free_port_block, pid_alive, stop_all, wait_for, wait_until
from .fleetconfig import (
    SIM_LAUNCHER,
    SIM_LAUNCHER_ARGV,
    TOKEN,
    agent_toml,
    as_node,
    cluster_toml,
    coordinator_doc,
    instance_toml,
)
from .localetcd import NO_ETCD, EtcdCluster, EtcdMember, NoEtcd

__all__ = [
    "NO_ETCD",
    "SIM_LAUNCHER",
    "SIM_LAUNCHER_ARGV",
    "TOKEN",
    "AgentProcess",
    "CoordinatorProcess",
    "Daemon",
    "EtcdCluster",
    "EtcdMember",
    "FleetError",
    "NoEtcd",
    "agent_toml",
    "as_node",
    "cluster_toml",
    "coordinator_doc",
    "free_port",
    "free_port_block",
    "get_json",
    "instance_toml",
    "pid_alive",
    "start_agent_sync",
    "stop_all",
    "wait_for",
    "wait_until",
]


def get_json(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET ``url`` and decode its JSON body; an HTTP error status raises (urllib's HTTPError)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


class AgentProcess(Daemon):
    """A real ``gpu-agent`` process: its config in ``tmp/agent.toml``, output in ``tmp/agent.log``,
    an HTTP client while used as ``async with``."""

    name = "agent"

    def __init__(
        self,
        tmp: Path,
        config_text: str,
        port: int,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
        host: str = "127.0.0.1",
        *,
        name: str = "agent",
        new_session: bool = False,
    ) -> None:
        super().__init__(tmp / "agent.log", wrapper=wrapper, env=env, new_session=new_session)
        self.name = name
        self.tmp = tmp
        self.port = port
        self.config = tmp / "agent.toml"
        self.config.write_text(config_text)
        self.base = f"http://{host}:{port}"  # another host: an agent in its own network namespace
        self.http: aiohttp.ClientSession | None = None

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "agent", "--config", str(self.config)]

    async def __aenter__(self) -> AgentProcess:
        self.start()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            await wait_until(self._healthy, timeout=30, what=f"{self.name} /healthz")
        except BaseException:  # __aexit__ will not run: stop what was started
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.http is not None:
            await self.http.close()
        self.stop()

    async def _healthy(self) -> bool:
        self.check()
        assert self.http is not None
        async with self.http.get(self.base + "/healthz") as r:
            return r.status == 200

    async def status(self) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(self.base + "/v1/status") as r:
            assert r.status == 200
            return await r.json()

    async def instance(self, name: str) -> dict[str, Any]:
        """The instance's record; {} while it does not exist (e.g. before a reload lands)."""
        st = await self.status()
        return next((i for i in st["instances"] if i["name"] == name), {})

    async def wait_state(self, name: str, state: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            i = await self.instance(name)
            if i.get("state") == state and all(i.get(k) == v for k, v in match.items()):
                return i
            return None

        return await wait_until(check, timeout=timeout, what=f"{name} {state} {match or ''}")

    async def admin(self, path: str, token: str | None = TOKEN, body: Any = None) -> tuple[int, dict[str, Any]]:
        assert self.http is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.post(self.base + path, headers=headers, json=body) as r:
            return r.status, await r.json()

    def status_sync(self) -> dict[str, Any]:
        return get_json(self.base + "/v1/status")

    def ready_instances(self) -> int:
        return sum(i["state"] == "READY" for i in self.status_sync()["instances"])

    def wait_ready_sync(self, instances: int | None = None, timeout: float = 60) -> AgentProcess:
        """Until ``instances`` instances are READY (default: ``/readyz`` says 200)."""
        if instances is None:
            wait_for(lambda: get_json(self.base + "/readyz") is not None, timeout, f"{self.name} ready", [self])
        else:
            wait_for(lambda: self.ready_instances() >= instances, timeout, f"{self.name}: {instances} READY", [self])
        return self


def start_agent_sync(
    tmp: Path,
    config_text: str,
    port: int,
    ready_instances: int,
    timeout: float = 60,
    wrapper: list[str] | None = None,
    host: str = "127.0.0.1",
) -> AgentProcess:
    """Start an agent from synchronous code (module-scoped fixtures) and wait until
    ``ready_instances`` instances are READY."""
    agent = AgentProcess(tmp, config_text, port, wrapper=wrapper, host=host)
    agent.start()
    return agent.wait_ready_sync(ready_instances, timeout)


class CoordinatorProcess(Daemon):
    """A real ``gpu-coordinator`` process (sync start/stop, for module-scoped fixtures and the demo).

    Its config is :func:`coordinator_doc` plus ``extra`` (TOML text), or ``config_text`` as given
    (which must listen on ``port``)."""

    stop_timeout = 20.0

    def __init__(
        self,
        tmp: Path,
        ident: str,
        endpoints: list[str],
        cluster: str,
        extra: str = "",
        wrapper: list[str] | None = None,
        *,
        port: int | None = None,
        config_text: str | None = None,
        new_session: bool = False,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        super().__init__(tmp / f"{ident}.log", wrapper=wrapper, new_session=new_session)
        self.tmp = tmp
        self.name = self.ident = ident
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp / f"{ident}.toml"
        if config_text is None:
            doc = coordinator_doc(ident, self.port, endpoints, cluster)
            config_text = "\n" + toml_dumps(doc) + extra + "\n"
        self.config.write_text(config_text)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "coordinator", "--config", str(self.config)]

    def wait_ready_sync(self, timeout: float = 30) -> CoordinatorProcess:
        """Until /readyz says 200: state synced from etcd and a leader known (itself or another)."""
        wait_for(
            lambda: get_json(self.base + "/readyz") is not None, timeout, f"coordinator {self.ident} ready", [self]
        )
        return self

    def status(self) -> dict[str, Any]:
        return get_json(self.base + "/v1/status", timeout=5)

    def is_leader(self) -> bool:
        try:
            return bool(self.status().get("is_leader"))
        except (OSError, ValueError):
            return False
