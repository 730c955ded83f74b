"""API keys end to end: real etcd, a real coordinator, two real agents in keys mode with a hop
secret, keys made with ``gpuctl keys``, clients on the official ``openai`` SDK.

Agent ``a`` serves model ``m``; agent ``b`` does not, so ``b`` forwards to ``a`` (signed with
the hop secret). A request without a key gets 401 from either; a forged hop to ``a`` gets 401;
a revoked key is refused on every agent within 2 s; usage reaches the entry node's counters."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from etcd_fixtures import EtcdCluster
from helpers import (
    CoordinatorProcess,
    wait_until,
)
from keyfleet import KeyFleet

from gpufleet.facts import HOPS_HEADER
from gpufleet.keyspace import Keyspace, decode
from gpufleet.keyspace.records import KeySharesRecord

CLUSTER = "keys-e2e"


def status_of(base: str, headers: dict[str, str], body: dict[str, object] | None = None) -> int:
    data = json.dumps(body or {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    req = urllib.request.Request(
        base + "/v1/chat/completions", data.encode(), {"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def metric(base: str, prefix: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines() if line.startswith(prefix))


async def test_keys_across_a_cluster(etcd: EtcdCluster, tmp_path: Path) -> None:
    fleet = KeyFleet(etcd, tmp_path, CLUSTER)
    secret = fleet.create_key("team", "--models", "m")
    a = fleet.agent("a", "m", telemetry_min_gap_s=1)
    b = fleet.agent("b", "other", telemetry_min_gap_s=1)
    coordinator = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    try:
        coordinator.wait_ready_sync()
        # b knows the key and the route to a: the SDK through b is served by a, signed.
        await wait_until(lambda: status_of(b.base, {"Authorization": f"Bearer {secret}"}) == 200, 30, what="b forwards")
        client = openai.OpenAI(base_url=b.base + "/v1", api_key=secret, max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content
        chunks = list(
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
            )
        )
        assert chunks and all(c.usage is None for c in chunks)  # usage asked for by b, hidden from us
        assert metric(b.base, 'gpu_agent_key_tokens_total{key="team"') > 0  # counted at the entry node
        assert metric(a.base, 'gpu_agent_key_tokens_total{key="team"') == 0  # not twice

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=a.base + "/v1", api_key="gpf_wrong", max_retries=0).models.list()
        assert status_of(a.base, {}) == 401
        assert status_of(a.base, {HOPS_HEADER: "1"}) == 401  # a forged hop: no signature
        assert status_of(a.base, {"Authorization": f"Bearer {secret}"}, {"model": "other", "messages": []}) == 403

        revoke = fleet.gpuctl("keys", "revoke", "team")
        assert revoke.returncode == 0, revoke.stderr
        revoked_at = time.monotonic()
        for agent in (a, b):
            await wait_until(
                lambda agent=agent: status_of(agent.base, {"Authorization": f"Bearer {secret}"}) == 401,
                2,
                what=f"revocation seen by {agent.base}",
            )
        assert time.monotonic() - revoked_at < 2
    finally:
        coordinator.stop()
        a.stop()
        b.stop()


async def share_of(etcd: EtcdCluster, key: str, node: str) -> float | None:
    async with etcd.client() as c:
        kv = await c.get(Keyspace(CLUSTER).keyshares)
    if kv is None:
        return None
    division = decode(kv.value, KeySharesRecord).keys.get(key)
    return None if division is None else division.nodes.get(node, division.idle)


async def test_the_leader_divides_a_keys_limit_by_demand(etcd: EtcdCluster, tmp_path: Path) -> None:
    """rpm 20 over two entry nodes: a client using only node a first gets a's even share (10),
    then, once a reports its demand and the leader divides by it, 95 % of the limit (19) — and
    never more than the limit in the minute."""
    fleet = KeyFleet(etcd, tmp_path, CLUSTER)
    auth = {"Authorization": f"Bearer {fleet.create_key('busy', '--rpm', '20')}"}
    # Key demand reported within a second (the default telemetry gap is 15 s).
    a = fleet.agent("a", "m", telemetry_min_gap_s=1)
    b = fleet.agent("b", "other", telemetry_min_gap_s=1)
    coordinator = CoordinatorProcess(tmp_path, "c1", etcd.endpoints, CLUSTER).start()
    try:
        coordinator.wait_ready_sync()

        def a_routes_both() -> bool:  # a counts the entry nodes in its route table
            req = urllib.request.Request(a.base + "/v1/models", headers=auth)
            with urllib.request.urlopen(req, timeout=5) as r:
                return {m["id"] for m in json.loads(r.read())["data"]} == {"m", "other"}

        await wait_until(a_routes_both, 30, what="a routes both nodes")
        codes = [status_of(a.base, auth) for _ in range(14)]
        assert codes.count(200) == 10 and codes[10:] == [429] * 4  # the even share: 20 / 2

        async def divided() -> bool:
            return (await share_of(etcd, "busy", "a") or 0) > 0.9

        await wait_until(divided, 30, what="the leader gives a most of the key")
        assert await share_of(etcd, "busy", "b") == pytest.approx(0.05)

        async def admitted_again() -> bool:
            return status_of(a.base, auth) == 200

        await wait_until(admitted_again, 10, what="a admits past its even share")
        codes = [status_of(a.base, auth) for _ in range(10)]
        total = 10 + 1 + codes.count(200)
        assert total == 19, codes  # 0.95 x 20 in the minute: more than the even share, never over the limit
    finally:
        coordinator.stop()
        a.stop()
        b.stop()
