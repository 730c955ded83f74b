"""A state change that falls within ``publish_min_gap_s`` of the previous write must go out when
the gap is over, not at the next keep-alive.

Found by bench/ondemand.py: a replica placed for a cold start goes STARTING -> WARMING -> READY,
WARMING and READY some 50 ms apart. WARMING is written; READY falls inside the 1 s gap, so
``publish_reason`` says "wait", and the publisher's loop then slept until the next keep-alive
(``lease_ttl_s / 3``, 3.3 s by default) or the 30 s refresh: nothing woke it when the gap ended
(now ``held_for`` says when). A request held on another node for that replica waited ~4 s
longer than the replica took to become READY. Keep-alives and probes are production-like here
(TTL 30 s, keep-alive every 10 s, probes every 5 s) so the delay shows; the test fleets' 1 s
keep-alives and 0.5 s probes hide it.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path

from etcd_fixtures import EtcdCluster
from helpers import AgentProcess, agent_toml, as_node, free_port, instance_toml, wait_until

from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import NodeRecord
from gpufleet.tomlwrite import dumps as toml_dumps

CLUSTER = "pubgap"
KEYS = Keyspace(CLUSTER)
MIN_GAP_S = 1.0


async def test_a_change_deferred_by_the_min_gap_is_published_when_the_gap_ends(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    port = free_port()
    # 1.5 s of model load: the agent registers (STARTING) before the server is up, so WARMING
    # and READY are changes after the first write, close together.
    inst = instance_toml("a", args='["--startup-delay", "1.5"]')
    cluster = {
        "endpoints": etcd.endpoints, "cluster": CLUSTER, "lease_ttl_s": 30, "keepalive_interval_s": 10.0,
        "timeout_s": 1.0, "publish_min_gap_s": MIN_GAP_S,
    }  # fmt: skip
    text = as_node(agent_toml(tmp_path, port, inst), "n1") + "\n" + toml_dumps({"cluster": cluster})
    # Probes at the production interval: the test fleet's 0.5 s probes wake the publisher often
    # enough to hide the delay (each probe is a publish check).
    assert "probe_interval_s = 0.5" in text
    text = text.replace("probe_interval_s = 0.5", "probe_interval_s = 5.0")
    ready_in_etcd: list[float] = []
    async with etcd.client() as c:
        watch = c.watch(KEYS.node("n1"), prefix=False)
        await watch.open()

        async def follow() -> None:
            async for resp in watch:
                for e in resp.events:
                    rec = decode(e.kv.value, NodeRecord) if e.type == "PUT" else None
                    if rec is not None and any(i.name == "a" and i.state == "READY" for i in rec.instances):
                        ready_in_etcd.append(time.time())

        task = asyncio.create_task(follow())
        try:
            async with AgentProcess(tmp_path, text, port) as agent:
                await agent.wait_state("a", "READY", timeout=30)
                await wait_until(lambda: bool(ready_in_etcd), timeout=15, what="READY in the node record")
                lines = [json.loads(x) for x in agent.log_lines() if x.startswith("{")]
        finally:
            task.cancel()
            await watch.aclose()
    ready_here = next(
        datetime.fromisoformat(x["timestamp"].replace("Z", "+00:00")).timestamp()
        for x in lines
        if x.get("event") == "state change" and x.get("instance") == "a" and x.get("state") == "READY"
    )
    late = ready_in_etcd[0] - ready_here
    # At most the gap (plus scheduling slack), not a keep-alive interval (10 s here).
    assert late <= MIN_GAP_S + 1.0, f"READY reached etcd {late:.2f} s after the instance was READY"
