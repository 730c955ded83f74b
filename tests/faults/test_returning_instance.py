"""An instance removed by a reload and added back: routed through other nodes as soon as it is READY.

Before: the leader kept the health history of an instance that had left its node's record and
took the returning instance's STARTING for a failure (an ejection of 30 s), so requests entering
through another node got 503 for ~30 s while the instance was READY on its own node.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp
from etcd_fixtures import EtcdCluster
from helpers import TOKEN, CoordinatorProcess, agent_toml, as_node, cluster_toml, free_port, instance_toml, wait_until
from helpers import start_agent_sync as start_agent

from faults.fleet import CLUSTER, agent_status, cluster_agent, endpoint_state, eq, post_json

BOUND_S = 3.0  # local READY -> routed through another node: a publish, a leader pass, a route watch


async def chat_status(http: aiohttp.ClientSession, base: str) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with http.post(base + "/v1/chat/completions", json=body) as r:
        await r.read()
        return r.status


def reload_with(agent_config: Path, base: str, text: str) -> None:
    agent_config.write_text(text)
    assert post_json(base + "/admin/reload", token=TOKEN) == 200


async def test_instance_removed_and_readded_is_routed_at_once(etcd: EtcdCluster, tmp_path: Path) -> None:
    coord = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    owner = cluster_agent(tmp_path / "owner", "owner", etcd.endpoints[0])
    entry = None
    try:
        # The entry node has no instance of m: its requests for m go to the owner. Its instance
        # of another model makes it a healthy node of the class, so that the owner's instance
        # held out is not released by panic mode (one unhealthy node of one would be).
        port = free_port()
        (tmp_path / "entry").mkdir()
        other = instance_toml("o", model="o", gpus="[0]", fraction=0.3)
        text = as_node(agent_toml(tmp_path / "entry", port, other), "entry", f"http://127.0.0.1:{port}")
        entry = await asyncio.to_thread(
            start_agent, tmp_path / "entry", text + cluster_toml(etcd.endpoints, CLUSTER), port, 1
        )
        coord.wait_ready_sync()
        await wait_until(lambda: eq(endpoint_state(etcd, "owner"), "READY"), timeout=20, what="m routed")
        with_m = owner.config.read_text()
        block = instance_toml("m", model="m", gpus="[0]", fraction=0.5)
        assert block in with_m
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await wait_until(lambda: _is_200(chat_status(http, entry.base)), timeout=10, what="m through entry")

            # Removed by a reload (no instances left: said so explicitly, or the reload refuses it).
            await asyncio.to_thread(
                reload_with, owner.config, owner.base, "instances = []\n" + with_m.replace(block, "")
            )
            await wait_until(lambda: eq(endpoint_state(etcd, "owner"), None), timeout=10, what="m unrouted")

            # Added back: from READY on its own node to answered through the entry node.
            # Loading takes a while (as a real model's does), so the leader sees it STARTING.
            slow = instance_toml("m", model="m", gpus="[0]", fraction=0.5, args='["--startup-delay", "1.5"]')
            await asyncio.to_thread(reload_with, owner.config, owner.base, with_m.replace(block, slow))
            await wait_until(
                lambda: any(i["name"] == "m" and i["state"] == "READY" for i in agent_status(owner.base)["instances"]),
                timeout=20,
                what="m READY on its node",
            )
            ready_at = time.monotonic()
            statuses: list[int] = []

            async def answered() -> bool:
                statuses.append(await chat_status(http, entry.base))
                return statuses[-1] == 200

            await wait_until(answered, timeout=40, interval=0.1, what="m answered through the entry node")
            took = time.monotonic() - ready_at
            failed = Counter(s for s in statuses if s != 200)
            print(f"returning instance: routed {took:.2f} s after READY on its node; failed meanwhile: {failed}")
            assert took < BOUND_S, f"{took:.1f} s of failures ({failed}) after the instance was READY"
            # And it stays routed: no late ejection.
            for _ in range(10):
                assert await chat_status(http, entry.base) == 200
        ejections = [
            ln for ln in coord.log_lines() if "owner/m" in ln and "ejection" in json.loads(ln).get("change", "")
        ]
        assert ejections == [], ejections
    finally:
        for p in (entry, owner, coord):
            if p is not None:
                p.stop()


async def _is_200(status: object) -> bool:
    return await status == 200  # type: ignore[misc]
