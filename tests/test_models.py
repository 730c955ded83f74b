"""Models on shared storage, end to end: registry (gpuctl), placement by the leader, agents
starting assigned replicas, rescheduling after a node dies, and the 3 degradation levels.

Real etcd, one coordinator, three agents (A100, A100, H100) with simulated GPUs; the simulated
model server stands in for vLLM. "Shared storage" is a directory of this machine; to make a
path missing on one host, agent a100-2 runs in its own mount namespace with an empty tmpfs
over one directory (a host whose mount is gone), so that test needs root and unshare(1).
The tests run in order on one fleet; the destructive one (a node killed) is last.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    wait_until,
)
from modelfleet import ModelFleet, model_fleet

from gpufleet.etcd import EtcdClient
from gpufleet.keyspace import Keyspace, assigned_instance_name, decode
from gpufleet.keyspace.records import AssignmentRecord, NodeRecord, PlacementRecord, RouteRecord
from gpufleet.registry import model_digest
from gpufleet.routeslices import read_routes

CLUSTER = "models"
KEYS = Keyspace(CLUSTER)
CHAT = "/v1/chat/completions"
GPUS = {
    "a100-1": "NVIDIA A100-SXM4-80GB",
    "a100-2": "NVIDIA A100-SXM4-80GB",
    "h100-1": "NVIDIA H100 80GB HBM3",
}
COORD_EXTRA = """
[placement]
reschedule_after_s = 2.0
[degradation]
thresholds = [0.1, 0.4, 0.7]
window_s = 4.0
min_samples = 20
hysteresis = 0.02
min_hold_s = 1.0
refresh_s = 5.0
"""
CAN_HIDE = os.geteuid() == 0 and shutil.which("unshare") is not None
STATIC = {"status": "degraded", "message": "High load, using fallback response"}


AGENT_EXTRA = """recheck_interval_s = 1.0

[degradation]
probe_share = 0.2
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelFleet]:
    tmp = tmp_path_factory.mktemp("models")
    shared, hidden = tmp / "shared", hidden_of(tmp)
    (shared / "qwen").mkdir(parents=True)
    (shared / "qwen" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (shared / "qwen" / "model.safetensors").write_bytes(os.urandom(4096))
    (shared / "small.gguf").write_bytes(b"GGUF" + os.urandom(1024))
    (shared / "corrupt.gguf").write_bytes(b"GGUF" + os.urandom(1024))
    hidden.mkdir()
    (hidden / "wide.gguf").write_bytes(b"GGUF" + os.urandom(512))

    def wrapper(node: str) -> list[str] | None:
        if node != "a100-2" or not CAN_HIDE:
            return None
        # This host's view of the shared store lacks the "hidden" directory.
        script = f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]

    with model_fleet(
        tmp, CLUSTER, GPUS, [shared, hidden], agent_extra=AGENT_EXTRA, coord_extra=COORD_EXTRA, wrapper=wrapper
    ) as f:
        yield f


def hidden_of(tmp: Path) -> Path:
    """The directory under the shared storage that host a100-2 cannot see."""
    return tmp / "hidden"


# --- reading the cluster ----------------------------------------------------------------------


async def node_record(etcd: EtcdClient, node: str) -> NodeRecord | None:
    kv = await etcd.get(KEYS.node(node))
    return decode(kv.value, NodeRecord) if kv else None


async def placement(etcd: EtcdClient, model: str) -> Any:
    kv = await etcd.get(KEYS.placement)
    if kv is None:
        return None
    return next((m for m in decode(kv.value, PlacementRecord).models if m.model == model), None)


async def ready_on(etcd: EtcdClient, model: str) -> list[str]:
    """Nodes where an assigned instance of ``model`` is READY."""
    out = []
    for node in GPUS:
        rec = await node_record(etcd, node)
        if rec and any(i.assigned and i.model == model and i.state == "READY" for i in rec.instances):
            out.append(node)
    return out


async def wait_placed(etcd: EtcdClient, model: str, n: int, timeout: float = 45) -> list[str]:
    async def check() -> tuple[list[str]] | None:
        nodes = await ready_on(etcd, model)
        return (nodes,) if len(nodes) == n else None  # a tuple: truthy even when nodes == []

    return (await wait_until(check, timeout=timeout, what=f"{n} READY replicas of {model}"))[0]


async def _is(value: Any, expected: Any) -> bool:
    return await value == expected


def chat(model: str, content: str = "hi", stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": stream}


async def post(base: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.post(base + CHAT, json=body) as r:
        return r.status, dict(r.headers), await r.read()


# --- registry ---------------------------------------------------------------------------------


def test_registry_refuses_bad_entries_and_duplicates(fleet: ModelFleet) -> None:
    bad = fleet.gpuctl("models", "add", "x", "--path", "models/x")
    assert bad.returncode == 64 and "path:" in bad.stderr and "not absolute" in bad.stderr
    bad = fleet.gpuctl("models", "add", "x", "--path", "/mnt/models/../etc")
    assert bad.returncode == 64 and "not normalised" in bad.stderr
    bad = fleet.gpuctl("models", "add", "x", "--path", "/mnt/x", "--sha256", "abc")
    assert bad.returncode == 64 and "sha256:" in bad.stderr
    bad = fleet.gpuctl("models", "add", "x", "--path", "/mnt/x", "--fallback", "x")
    assert bad.returncode == 64 and "own fallback" in bad.stderr
    bad = fleet.gpuctl("models", "add", "../x", "--path", "/mnt/x")
    assert bad.returncode == 64 and "name:" in bad.stderr
    ok = fleet.gpuctl("models", "add", "dup", "--path", "/mnt/dup", "--replicas", "0")
    assert ok.returncode == 0, ok.stderr
    again = fleet.gpuctl("models", "add", "dup", "--path", "/mnt/dup2", "--replicas", "0")
    assert again.returncode == 1 and "already registered" in again.stderr
    upd = fleet.gpuctl("models", "add", "dup", "--path", "/mnt/dup2", "--replicas", "0", "--update")
    assert upd.returncode == 0, upd.stderr
    listed = json.loads(fleet.gpuctl("-o", "json", "models", "list").stdout)
    assert [r["model"]["path"] for r in listed if r["model"]["name"] == "dup"] == ["/mnt/dup2"]
    assert fleet.gpuctl("models", "rm", "dup").returncode == 0
    assert fleet.gpuctl("models", "rm", "dup").returncode == 1


def test_digest_matches_coreutils(fleet: ModelFleet) -> None:
    out = fleet.gpuctl("-o", "json", "models", "digest", str(fleet.shared / "qwen"))
    doc = json.loads(out.stdout)
    script = "find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum"
    ref = subprocess.run(["sh", "-c", script], cwd=fleet.shared / "qwen", capture_output=True, text=True, check=True)
    assert doc["sha256"] == ref.stdout.split()[0] == model_digest(str(fleet.shared / "qwen"))
    assert doc["size_bytes"] == sum(p.stat().st_size for p in (fleet.shared / "qwen").iterdir())


# --- placement --------------------------------------------------------------------------------


def register_qwen_and_small(fleet: ModelFleet) -> None:
    """qwen (A100, falling back to small) and small (H100); those already registered are left
    alone, so a test that needs them runs alone too, not only after the placement test."""
    listed = json.loads(fleet.gpuctl("-o", "json", "models", "list").stdout)
    have = {r["model"]["name"] for r in listed}
    qwen = fleet.shared / "qwen"
    size = str(sum(p.stat().st_size for p in qwen.iterdir()))
    if "qwen" not in have:
        r = fleet.gpuctl(
            "models", "add", "qwen", "--path", str(qwen), "--classes", "A100", "--min-vram-gib", "30",
            "--size-bytes", size, "--sha256", model_digest(str(qwen)), "--fallback", "small",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    if "small" not in have:
        r = fleet.gpuctl(
            "models", "add", "small", "--path", str(fleet.shared / "small.gguf"), "--classes", "H100",
            "--min-vram-gib", "20",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr


async def test_model_placed_on_a_fitting_node_served_and_routed(fleet: ModelFleet) -> None:
    qwen = fleet.shared / "qwen"
    register_qwen_and_small(fleet)
    async with fleet.etcd.client() as etcd:
        [node] = await wait_placed(etcd, "qwen", 1)
        assert node.startswith("a100-")
        assert await wait_placed(etcd, "small", 1) == ["h100-1"]
        rec = await node_record(etcd, node)
        assert rec is not None
        avail = next(m for m in rec.models if m.model == "qwen")
        assert avail.available and avail.verified  # size and sha256 checked on this host
        inst = next(i for i in rec.instances if i.model == "qwen")
        assert inst.name == assigned_instance_name("qwen") and inst.gpu_memory_fraction == 0.38  # 30/80 rounded up
        kv = await etcd.get(KEYS.assignment(node))
        assert kv is not None and decode(kv.value, AssignmentRecord).instances[0].path == str(qwen)

        async def routed() -> RouteRecord | None:
            rr = (await read_routes(etcd, KEYS)).get("qwen")
            return rr if rr and [(e.node, e.state) for e in rr.endpoints] == [(node, "READY")] else None

        await wait_until(routed, timeout=20, what="qwen routed to its node")
    # Through the other A100 node's proxy: it has no qwen of its own and forwards by route.
    other = next(n for n in ("a100-1", "a100-2") if n != node)
    status, _, body = await post(fleet.agents[other].base, chat("qwen"))
    assert status == 200 and json.loads(body)["model"] == "qwen"
    listed = json.loads(fleet.gpuctl("-o", "json", "models", "list").stdout)
    row = next(r for r in listed if r["model"]["name"] == "qwen")
    assert row["nodes"] == [node] and row["unplaced"] == 0


@pytest.mark.skipif(not CAN_HIDE, reason="hiding a path from one agent needs root and unshare(1)")
async def test_path_missing_on_one_host_is_not_placed_there_and_reported(fleet: ModelFleet) -> None:
    r = fleet.gpuctl(
        "models",
        "add",
        "wide",
        "--path",
        str(hidden_of(fleet.tmp) / "wide.gguf"),
        "--replicas",
        "3",
        "--min-vram-gib",
        "10",
    )
    assert r.returncode == 0, r.stderr
    async with fleet.etcd.client() as etcd:
        nodes = await wait_placed(etcd, "wide", 2)
        assert "a100-2" not in nodes
        rec = await node_record(etcd, "a100-2")
        assert rec is not None
        avail = next(m for m in rec.models if m.model == "wide")
        assert avail.available is False and "No such file" in (avail.error or "")

        async def reported() -> Any:
            p = await placement(etcd, "wide")
            return p if p and p.unplaced == 1 else None

        p = await wait_until(reported, timeout=10, what="wide reported unplaced")
        assert any("a100-2" in reason and "unavailable" in reason for reason in p.reasons), p.reasons
    out = fleet.gpuctl("models", "list")
    assert "wide: path unavailable on a100-2" in out.stdout
    # Unregistering stops its replicas everywhere.
    assert fleet.gpuctl("models", "rm", "wide").returncode == 0
    async with fleet.etcd.client() as etcd:
        await wait_placed(etcd, "wide", 0)


async def test_unplaceable_models_say_why(fleet: ModelFleet) -> None:
    r = fleet.gpuctl("models", "add", "big", "--path", str(fleet.shared / "small.gguf"), "--min-vram-gib", "100")
    assert r.returncode == 0, r.stderr
    wrong = "0" * 64
    r = fleet.gpuctl("models", "add", "corrupt", "--path", str(fleet.shared / "corrupt.gguf"), "--sha256", wrong)
    assert r.returncode == 0
    async with fleet.etcd.client() as etcd:

        async def both() -> tuple[Any, Any] | None:
            big, bad = await placement(etcd, "big"), await placement(etcd, "corrupt")
            ok = big and big.unplaced == 1 and bad and bad.unplaced == 1 and len(bad.reasons) >= 1
            return (big, bad) if ok else None

        big, bad = await wait_until(both, timeout=20, what="both reported unplaced")
        assert any("insufficient GPU memory" in x and "100.0 GiB" in x for x in big.reasons), big.reasons
        assert any("sha256" in x for x in bad.reasons), bad.reasons
        assert await ready_on(etcd, "big") == [] and await ready_on(etcd, "corrupt") == []
    for name in ("big", "corrupt"):
        assert fleet.gpuctl("models", "rm", name).returncode == 0


# --- degradation ------------------------------------------------------------------------------


async def sim_control(fleet: ModelFleet, node: str, model: str, **settings: Any) -> None:
    async with fleet.etcd.client() as etcd:
        rec = await node_record(etcd, node)
    assert rec is not None
    port = next(i.port for i in rec.instances if i.model == model)
    async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{port}/sim/control", json=settings) as r:
        assert r.status == 200


def leader_level(fleet: ModelFleet) -> int:
    assert fleet.coord is not None
    return fleet.coord.status()["degradation"]["level"]


async def test_degradation_levels_rise_and_fall_with_the_error_rate(fleet: ModelFleet) -> None:
    register_qwen_and_small(fleet)
    async with fleet.etcd.client() as etcd:
        [node] = await wait_placed(etcd, "qwen", 1)
        await wait_placed(etcd, "small", 1)
    base = fleet.agents[node].base
    stop = asyncio.Event()

    async def traffic() -> None:  # distinct requests: the cache cannot answer them
        n = 0
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                n += 1
                async with http.post(base + CHAT, json=chat("qwen", f"load {n}")) as r:
                    await r.read()

    async def answer_where(pred: Any, body: dict[str, Any], what: str) -> tuple[int, dict[str, str], bytes]:
        async def check() -> tuple[int, dict[str, str], bytes] | None:
            got = await post(base, body)
            return got if pred(*got) else None

        return await wait_until(check, timeout=30, what=what)

    async def level(n: int) -> None:
        await wait_until(lambda: leader_level(fleet) == n, timeout=30, what=f"leader at level {n}")

    workers = [asyncio.create_task(traffic()) for _ in range(4)]
    try:
        # Level 1 (10-40 %): an identical request is answered from the cache, stream by replay.
        await sim_control(fleet, node, "qwen", error_rate=0.25)
        await level(1)
        for stream in (False, True):
            req = chat("qwen", f"same question, stream={stream}", stream)
            answers: set[bytes] = set()  # upstream answers (some bypass the cache: the probe share)

            def cache_hit(status: int, headers: dict[str, str], body: bytes, seen: set[bytes] = answers) -> bool:
                if headers.get("X-Gpufleet-Degraded") == "cache":
                    return True
                if status == 200:
                    seen.add(body)
                return False

            hit = await answer_where(cache_hit, req, "a cache hit")
            assert hit[0] == 200 and hit[2] in answers  # a replay, byte-identical, for a stream too
            assert hit[1]["Content-Type"].startswith("text/event-stream" if stream else "application/json")
        # Level 2 (40-70 %): the fallback serves, and says so.
        await sim_control(fleet, node, "qwen", error_rate=0.55)
        await level(2)
        status, _, body = await answer_where(
            lambda s, h, b: h.get("X-Model-Downgraded") == "small", chat("qwen", "level 2"), "a downgraded answer"
        )
        assert status == 200 and json.loads(body)["model"] == "small"
        # Level 3 (>= 70 %): the static answer; still an answer.
        await sim_control(fleet, node, "qwen", error_rate=0.95)
        await level(3)
        status, _, body = await answer_where(
            lambda s, h, b: h.get("X-Gpufleet-Degraded") == "static", chat("qwen", "level 3"), "the static answer"
        )
        assert status == 200 and json.loads(body) == STATIC
        # Healthy again: the probe share measures it, and the level steps down to 0.
        await sim_control(fleet, node, "qwen", error_rate=0.0)
        await level(0)
        status, _headers, body = await answer_where(
            lambda s, h, b: "X-Gpufleet-Degraded" not in h, chat("qwen", "normal"), "a normal answer"
        )
        assert status == 200 and json.loads(body)["model"] == "qwen"
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    assert fleet.coord is not None
    changes = [json.loads(ln) for ln in fleet.coord.log_lines() if "degradation level changed" in ln]
    ups = [(c["level_from"], c["level_to"]) for c in changes if c["level_to"] > c["level_from"]]
    assert (0, 1) in ups and any(t == 3 for _, t in ups), changes
    agent_changes = [ln for ln in fleet.agents[node].log_lines() if "degradation level changed" in ln]
    assert len(agent_changes) >= 4
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as r:
        text = await r.text()
    assert 'gpu_agent_proxy_degraded_total{kind="static"}' in text and "gpu_agent_degradation_level 0.0" in text


# --- rescheduling -----------------------------------------------------------------------------


async def test_replicas_of_a_killed_node_move_after_the_grace_period(fleet: ModelFleet) -> None:
    async with fleet.etcd.client() as etcd:
        [node] = await wait_placed(etcd, "qwen", 1)
        other = next(n for n in ("a100-1", "a100-2") if n != node)
        agent = fleet.agents[node]
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        killed = time.monotonic()
        # (The dead node's record stays until its lease runs out: wait for the other node.)
        await wait_until(lambda: _is(ready_on(etcd, "qwen"), [other]), timeout=60, what=f"qwen READY on {other}")
        # Not before the lease (3 s) ran out and the grace period (2 s) passed.
        assert time.monotonic() - killed >= 4.0
        assert await etcd.get(KEYS.assignment(node)) is None
        p = await placement(etcd, "qwen")
        assert p.nodes == [other] and p.unplaced == 0
    assert fleet.coord is not None
    moved = [ln for ln in fleet.coord.log_lines() if '"placement"' in ln and node in ln and "qwen" in ln]
    assert moved, "the move was logged"
    status, _, _body = await post(fleet.agents[other].base, chat("qwen"))
    assert status == 200
