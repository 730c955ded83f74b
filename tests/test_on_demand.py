"""On-demand models (min_replicas = 0): the leader's scaling decision as a pure function, the
agent's demand entries, and end to end with the simulated server: no replica at first, a
request held until one is placed and READY (time to first token printed), unloaded after the
idle time, and a 503 with Retry-After when the cold start takes longer than allowed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    wait_until,
)
from modelfleet import OneNodeFleet, one_node_fleet

from agent.cluster.demand import DemandTracker
from agent.cluster.publish_policy import PublishPolicy, change_reason
from agent.config import ProxySection
from agent.proxy.coldstart import ColdStart
from agent.proxy.context import Ctx
from agent.supervisor.supervision_policy import InstanceState
from coordinator.policy.ondemand import DemandSeen, Scale, busy_nodes, changed, scale
from gpufleet.keyspace import Keyspace, assigned_instance_name, decode
from gpufleet.keyspace.records import (
    AssignmentRecord,
    InstanceLoad,
    InstanceRecord,
    ModelRecord,
    NodeRecord,
    PlacementRecord,
)
from gpufleet.registry import validate_model
from gpufleet.routeslices import read_routes

# --- the leader's decision (pure) ----------------------------------------------------------------

M = ModelRecord(name="m", path="/models/m", replicas=2, min_replicas=0, idle_unload_after_s=60)


def test_an_always_on_model_keeps_its_replicas() -> None:
    m = ModelRecord(name="m", path="/models/m", replicas=3)
    assert scale(m, [], {}, 1000.0) == Scale(3, True, "always on")


@pytest.mark.parametrize(
    ("demand", "busy", "now", "want"),
    [
        ([], {}, 1000.0, Scale(0, False, "no request for 60 s")),
        ([DemandSeen("n1", 5.0, 990.0)], {}, 1000.0, Scale(2, True, "request through n1 seen 10 s ago")),
        # the newest sighting counts, whichever node it came through
        (
            [DemandSeen("n1", 5.0, 900.0), DemandSeen("n2", 7.0, 970.0)],
            {},
            1000.0,
            Scale(2, True, "request through n2 seen 30 s ago"),
        ),
        ([DemandSeen("n1", 5.0, 940.0)], {}, 1000.0, Scale(0, False, "no request for 60 s")),  # exactly idle
        # idle, but a replica is serving: never evicted
        ([DemandSeen("n1", 5.0, 100.0)], {"n2": 3.0}, 1000.0, Scale(2, True, "serving 3 requests on n2")),
    ],
)
def test_scale(demand: list[DemandSeen], busy: dict[str, float], now: float, want: Scale) -> None:
    assert scale(M, demand, busy, now) == want


def test_min_replicas_one_scales_down_to_one() -> None:
    m = ModelRecord(name="m", path="/models/m", replicas=3, min_replicas=1, idle_unload_after_s=10)
    assert scale(m, [DemandSeen("n1", 1.0, 0.0)], {}, 20.0).replicas == 1


def test_a_decision_is_a_change_of_count_or_of_wanted_not_of_wording() -> None:
    assert changed(None, Scale(0, False, "x"))
    assert not changed(Scale(2, True, "seen 1 s ago"), Scale(2, True, "seen 9 s ago"))
    assert changed(Scale(2, True, "a"), Scale(0, False, "b"))


def test_busy_nodes_sum_requests_running_per_model_and_node() -> None:
    def inst(name: str, model: str, running: float | None) -> InstanceRecord:
        load = InstanceLoad(requests_running=running)
        return InstanceRecord(
            name=name, model=model, backend="vllm", state="READY", state_since=0, port=1, gpus=[0],
            gpu_memory_fraction=None, load=load,
        )  # fmt: skip

    rec = NodeRecord(
        node="n1", address="http://x", agent_version="t", started_at=0, updated_at=0, gpu_source="sim",
        gpu_classes=[], gpus=[], instances=[inst("a", "m", 2), inst("b", "m", 1), inst("c", "o", 0)],
    )  # fmt: skip
    assert busy_nodes([rec]) == {"m": {"n1": 3.0}}


def test_validation() -> None:
    bad = ModelRecord(name="m", path="/models/m", replicas=1, min_replicas=2, idle_unload_after_s=0)
    assert validate_model(bad) == [
        "min_replicas: must be between 0 and replicas (1)",
        "idle_unload_after_s: must be between 1 and 604800 (7 days)",
    ]
    assert validate_model(M) == []


# --- the agent's demand entries -----------------------------------------------------------------


def test_demand_entries_are_new_at_once_then_refreshed_at_most_every_quarter_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "time", lambda: clock[0] + 5e8)
    pokes: list[int] = []
    always_on = ModelRecord(name="a", path="/models/a")
    tracker = DemandTracker(lambda: {"m": M, "a": always_on}, lambda: pokes.append(1))
    tracker.note("a")
    assert tracker.published() == {} and not pokes  # not on demand: nothing to report
    tracker.note("m")
    first = tracker.published()
    assert first == {"m": 1000.0 + 5e8} and len(pokes) == 1
    clock[0] += 5  # within idle/4 (15 s): the entry stays as it is
    tracker.note("m")
    assert tracker.published() == first and len(pokes) == 1
    clock[0] += 12  # 17 s after the shown request: refreshed with the latest request's time
    assert tracker.published() == {"m": 1005.0 + 5e8}
    clock[0] += 61  # idle: dropped
    assert tracker.published() == {}
    prev = NodeRecord(
        node="n1", address="http://x", agent_version="t", started_at=0, updated_at=0, gpu_source="sim",
        gpu_classes=[], gpus=[], instances=[],
    )  # fmt: skip
    import msgspec

    cur = msgspec.structs.replace(prev, model_demand={"m": 1.0})
    why = change_reason(prev, cur, PublishPolicy())
    assert why is not None and why.urgent  # a new or changed entry goes out at once
    assert change_reason(cur, prev, PublishPolicy()) is None  # a dropped one waits


# --- the proxy's hold ---------------------------------------------------------------------------


class _Instance:
    def __init__(self, model: str) -> None:
        self.model = model
        self.state = InstanceState.STARTING


class _Upstreams:
    def __init__(self, **proxy: Any) -> None:
        self.proxy_cfg = ProxySection(**proxy)
        self.instances: list[_Instance] = []
        self.routes = None
        self.node_id = "here"

    def local(self, model: str) -> list[_Instance]:
        return [i for i in self.instances if i.model == model]


async def test_held_requests_wake_when_an_instance_is_ready_and_the_queue_is_bounded() -> None:
    ups = _Upstreams(cold_start_queue=2, cold_start_timeout_s=30)
    tracker = DemandTracker(lambda: {"m": M}, lambda: None)
    refused: list[str] = []
    cold = ColdStart(ups, tracker, refused.append)  # type: ignore[arg-type]
    ctxs = [Ctx(f"r{i}", time.monotonic(), ProxySection()) for i in range(3)]
    for c in ctxs:
        c.model = "m"
    held = [asyncio.create_task(cold.hold("m", c)) for c in ctxs[:2]]
    await wait_until(lambda: cold.waiting() == {"m": 2}, timeout=5, what="two requests held")
    full = await cold.hold("m", ctxs[2])  # the third finds the queue full
    assert full is not None and full.status == 503 and full.headers["Retry-After"] == "2"
    assert refused == ["cold_start_queue_full"]
    assert tracker.published().keys() == {"m"}  # the demand is reported while they wait
    inst = _Instance("m")
    ups.instances.append(inst)
    cold.poke()  # an instance appeared, not READY yet: they keep waiting
    await asyncio.sleep(0)
    assert not any(t.done() for t in held)
    inst.state = InstanceState.READY
    cold.poke()
    assert await asyncio.gather(*held) == [None, None]
    assert all(c.held > 0 for c in ctxs[:2]) and cold.waiting() == {}
    for c in ctxs:
        cold.end(c)
    assert tracker._active == {}


async def test_a_hold_past_cold_start_timeout_is_a_503() -> None:
    cold = ColdStart(_Upstreams(cold_start_timeout_s=0.05), DemandTracker(lambda: {"m": M}, lambda: None))  # type: ignore[arg-type]
    ctx = Ctx("r", time.monotonic(), ProxySection())
    ctx.model = "m"
    resp = await cold.hold("m", ctx)
    assert resp is not None and resp.status == 503 and b"within 0.05 s" in resp.body  # type: ignore[operator]
    # a model that is not on demand is never held
    assert await cold.hold("other", Ctx("r2", time.monotonic(), ProxySection())) is None


# --- end to end ------------------------------------------------------------------------------------

CLUSTER = "ondemand"
KEYS = Keyspace(CLUSTER)
STARTUP_DELAY_S = 2.0
IDLE_S = 4.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[OneNodeFleet]:
    with one_node_fleet(tmp_path, CLUSTER, ["m"], agent_extra=PROXY % 30) as fleet:
        yield fleet


PROXY = "\n[proxy]\ncold_start_timeout_s = %s\n"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}


@pytest.mark.timeout(90)
async def test_cold_start_idle_unload_and_timeout(cluster: OneNodeFleet) -> None:
    etcd, agent, shared = cluster.etcd, cluster.agent, cluster.shared
    add = cluster.gpuctl(
        "models", "add", "m", "--path", str(shared / "m"), "--min-replicas", "0",
        "--idle-unload-after", str(IDLE_S), f"--arg=--startup-delay={STARTUP_DELAY_S}",
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    assert "on demand" in add.stdout
    async with etcd.client() as c:

        async def placement() -> PlacementRecord | None:
            kv = await c.get(KEYS.placement)
            rec = decode(kv.value, PlacementRecord) if kv else None
            return rec if rec is not None and any(m.model == "m" for m in rec.models) else None

        async def assigned() -> bool:
            kv = await c.get(KEYS.assignment("n1"))
            rec = decode(kv.value, AssignmentRecord) if kv else None
            return rec is not None and any(a.model == "m" for a in rec.instances)

        # Registered and idle: the leader decides 0 replicas and places none.
        status = next(m for m in (await wait_until(placement, timeout=20, what="placement status")).models)
        assert status.desired == 0 and status.nodes == [] and status.scaling.startswith("idle: 0 of 1")
        assert not await assigned()

        # Listed while unloaded; a request is held while the replica is placed and warms up.
        async with aiohttp.ClientSession() as http:

            async def listed_models() -> bool:
                async with http.get(agent.base + "/v1/models") as r:
                    return [m["id"] for m in (await r.json())["data"]] == ["m"]

            await wait_until(listed_models, timeout=10, what="m in /v1/models")
            t0 = time.monotonic()
            async with http.post(agent.base + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200, await r.text()
                first = await r.content.readline()
                ttft = time.monotonic() - t0
                body = first + await r.read()
        assert b"data:" in body
        print(f"\ncold start: time to first token {ttft:.2f} s (simulated load {STARTUP_DELAY_S:g} s)")
        assert ttft >= STARTUP_DELAY_S
        listed = cluster.gpuctl("models", "list")
        assert "m: on demand, wanted: 1 of 1 replicas" in listed.stdout, listed.stdout
        log = (agent.tmp / "logs" / f"{assigned_instance_name('m')}.log").read_text()
        assert "Starting to load model" in log

        # No request for IDLE_S: the assignment is removed (the replica stopped).
        t_idle = time.monotonic()
        await wait_until(lambda: _not(assigned), timeout=IDLE_S + 15, what="the idle replica unassigned")
        idle_after = time.monotonic() - t_idle
        print(f"idle unload: assignment removed {idle_after:.1f} s after the last request (idle time {IDLE_S:g} s)")
        assert idle_after >= IDLE_S - 1.0  # seen by the leader after the request ended, not earlier
        status = next(m for m in (await placement() or PlacementRecord(epoch=0, updated_at=0)).models)
        assert status.scaling.startswith("idle: 0 of 1"), status

        async def no_instance() -> bool:
            st = agent.status_sync()
            return not any(i["name"] == assigned_instance_name("m") for i in st["instances"])

        await wait_until(no_instance, timeout=15, what="the replica stopped on the node")

        async def unrouted() -> bool:
            r = (await read_routes(c, KEYS)).get("m")
            return r is None or not any(e.state == "READY" for e in r.endpoints)

        await wait_until(unrouted, timeout=15, what="the route without a READY endpoint")

    # A cold start longer than cold_start_timeout_s: 503 with Retry-After.
    agent.config.write_text(cluster.agent_config(PROXY % 0.5))
    async with aiohttp.ClientSession() as http:
        agent.http = http
        code, out = await agent.admin("/admin/reload")
        agent.http = None
        assert code == 200, out
        async with http.post(agent.base + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503, await r.text()
            assert r.headers["Retry-After"]
            err = json.loads(await r.read())["error"]
    assert err["code"] == "model_starting" and "0.5 s" in err["message"]
    # Each scaling decision logged once, with its reason: idle at first, wanted, idle again.
    lines = [json.loads(x) for x in (agent.tmp.parent / "c1.log").read_text().splitlines() if "on-demand model" in x]
    decisions = [
        (x["replicas"], x["reason"].split(" ")[0]) for x in lines if x.get("event") == "on-demand model scaled"
    ]
    assert decisions[:3] == [(0, "no"), (1, "request"), (0, "no")], decisions
    # The cold start of the class's only replica is expected, not an outage: no panic mode.
    assert not [x for x in lines_all(agent.tmp.parent / "c1.log") if "panic" in x.get("event", "")]


def lines_all(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


async def _not(check) -> bool:  # type: ignore[no-untyped-def]
    return not await check()
