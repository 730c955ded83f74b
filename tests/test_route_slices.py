"""Routes in slices: the layout rules (pure), the readers' assembly rule, and the two sides
against a real etcd: the leader's RouteWriter (one transaction when it fits, ordered
transactions when not, the schema-1 migration) and the agent's RouteTable (which models it
follows, and never a route without endpoints or with two epochs mixed during a rewrite)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest
from etcd_fixtures import EtcdCluster, etcd  # noqa: F401  (fixture)
from helpers import wait_until

from agent.cluster.routes import RouteTable, WatchSettings
from agent.cluster.subset import subset_window, usable, window_runs
from coordinator.election import Election, txn_batches
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy.routes import RoutePlan
from coordinator.policy.slicing import SliceLimits, WritePolicy, endpoint_size, layout, plan_write, split_route
from coordinator.route_writer import RouteWriter
from gpufleet.etcd import Op
from gpufleet.keyspace import Keyspace, encode
from gpufleet.keyspace.records import RouteEndpoint, RouteRecord, RouteSlice
from gpufleet.routeslices import RouteAssembly, assemble, read_routes

pytestmark = pytest.mark.timeout(120)
POLICY = WritePolicy(min_weight_change=0.05, urgent_weight_change=0.25)  # the defaults


def ep(node: str, i: int = 0, weight: int = 100, state: str = "READY", cls: str = "A100") -> RouteEndpoint:
    return RouteEndpoint(
        node=node, address=f"http://{node}:8080", instance=f"i{i}", gpu_class=cls, weight=weight, state=state
    )


def fleet(nodes: int, per_node: int = 4, epoch: int = 1, model: str = "m", weight: int = 100) -> RouteRecord:
    eps = [ep(f"n{n:05d}", i, weight) for n in range(nodes) for i in range(per_node)]
    return RouteRecord(model=model, epoch=epoch, updated_at=0.0, endpoints=eps)


def with_endpoint(rec: RouteRecord, node: str, **change: object) -> RouteRecord:
    eps = [msgspec.structs.replace(e, **change) if e.node == node else e for e in rec.endpoints]  # type: ignore[arg-type]
    return msgspec.structs.replace(rec, endpoints=eps)


def written(rec: RouteRecord, header: RouteRecord | None, slices: dict[int, RouteSlice]):  # type: ignore[no-untyped-def]
    w, new_header, new_slices = plan_write(rec, header, slices, POLICY)
    return w, new_header, new_slices


# --- layout (pure) -------------------------------------------------------------------------------


def test_a_thousand_node_route_is_forty_slices_within_both_bounds() -> None:
    header, slices = split_route(fleet(1000), {})
    assert len(slices) == 40 and header.slices == list(range(40))
    assert header.endpoints == [] and header.ready_endpoints == 4000 and header.nodes == 1000
    for s in slices.values():
        assert len(s.endpoints) <= 100
        assert len(encode(s)) <= 32 * 1024
        assert len({e.node for e in s.endpoints}) * 4 == len(s.endpoints), "a node's endpoints stay together"
    # The size estimate bounds the real JSON from above, so the byte limit holds for any names.
    e = ep("n" * 128, 0, 65535, "DEGRADED", "c" * 64)
    assert endpoint_size(e) >= len(encode(e))


def test_long_names_fill_slices_by_bytes_not_count() -> None:
    eps = [RouteEndpoint(node=f"{n:03d}" + "n" * 120, address="https://" + "a" * 100, instance="i" * 120,
                         gpu_class="A100", weight=1, state="READY") for n in range(200)]  # fmt: skip
    parts = layout(eps, {})
    assert all(len(encode(RouteSlice(model="m", epoch=1, slice=n, endpoints=p))) <= 32 * 1024 for n, p in parts.items())
    assert max(len(p) for p in parts.values()) < 100


def test_one_nodes_weight_rewrites_one_slice_and_not_the_header() -> None:
    base = fleet(1000)
    header, slices = split_route(base, {})
    hot = with_endpoint(base, "n00537", weight=30)  # its GPU crossed 85 °C: capped
    w, _, _ = written(hot, header, slices)
    assert [s.slice for s in w.slices] == [21] and w.header is None  # 25 nodes per slice and not w.deletes
    assert all(e.weight == 30 for e in w.slices[0].endpoints if e.node == "n00537")
    # Under min_weight_change: nothing at all.
    w, _, _ = written(with_endpoint(base, "n00537", weight=97), header, slices)
    assert not w


def test_drifting_weights_wait_for_their_slices_interval_and_big_moves_do_not() -> None:
    base = fleet(300)
    header, slices = split_route(base, {})
    drift = with_endpoint(base, "n00042", weight=90)  # -10 %: between min (5 %) and urgent (25 %)
    w, _, _ = plan_write(drift, header, slices, POLICY, drift_due=lambda n: False)
    assert not w  # held: the slice was written less than weight_drift_interval_s ago
    w, _, _ = plan_write(drift, header, slices, POLICY, drift_due=lambda n: True)
    assert [s.slice for s in w.slices] == [1]
    hot = with_endpoint(base, "n00042", weight=30)  # capped: -70 %
    w, _, _ = plan_write(hot, header, slices, POLICY, drift_due=lambda n: False)
    assert [s.slice for s in w.slices] == [1]  # at once
    down = with_endpoint(base, "n00042", weight=100, state="DEGRADED")
    assert [s.slice for s in plan_write(down, header, slices, POLICY, drift_due=lambda n: False)[0].slices] == [1]


def test_a_state_change_rewrites_its_slice_and_the_header_count() -> None:
    base = fleet(300)
    header, slices = split_route(base, {})
    w, _, _ = written(with_endpoint(base, "n00042", state="DOWN", weight=0), header, slices)
    assert [s.slice for s in w.slices] == [1]
    assert w.header is not None and w.header.ready_endpoints == 1196 and w.header.slices == header.slices


def test_membership_is_stable_as_nodes_come_and_go() -> None:
    base = fleet(60)  # slices 0, 1 full; 2 with 40 endpoints
    header, slices = split_route(base, {})
    assert [len(s.endpoints) for s in slices.values()] == [100, 100, 40]
    # A node leaves slice 0: only slice 0 and the header (node count) change.
    gone = msgspec.structs.replace(base, endpoints=[e for e in base.endpoints if e.node != "n00003"])
    w, header2, slices2 = written(gone, header, slices)
    assert [s.slice for s in w.slices] == [0] and w.header is not None and not w.deletes
    # A new node takes the room it left, rather than moving anyone.
    joined = msgspec.structs.replace(gone, endpoints=[*gone.endpoints, ep("new", 0), ep("new", 1)])
    w, _, slices3 = written(joined, header2, slices2)
    assert [s.slice for s in w.slices] == [0] and {e.node for e in slices3[0].endpoints} >= {"new"}
    for n in (1, 2):
        assert slices3[n] == slices2[n]  # untouched


def test_an_emptied_slice_is_deleted_and_fragmentation_lays_out_afresh() -> None:
    base = fleet(60)
    header, slices = split_route(base, {})
    first_only = msgspec.structs.replace(base, endpoints=[e for e in base.endpoints if e.node < "n00025"])
    w, new_header, _ = written(first_only, header, slices)
    assert w.deletes == [1, 2] and new_header.slices == [0] and w.header is not None
    # Keep one node in each of many slices: more than twice the slices needed → fresh layout.
    wide, wide_slices = split_route(fleet(1000), {})
    sparse = msgspec.structs.replace(
        fleet(1000), endpoints=[e for e in fleet(1000).endpoints if int(e.node[1:]) % 25 == 0]
    )  # 40 nodes, one per slice: 160 endpoints fit in 2 slices
    w, new_header, _ = written(sparse, wide, wide_slices)
    assert new_header.slices == [0, 1] and len(w.deletes) == 38


def test_a_new_epoch_or_a_schema_1_record_rewrites_everything() -> None:
    base = fleet(250)
    header, slices = split_route(base, {})
    w, _, _ = written(msgspec.structs.replace(base, epoch=2), header, slices)
    assert len(w.slices) == 10 and w.header is not None and w.header.epoch == 2
    old = msgspec.structs.replace(base, schema=1)  # one value held every endpoint
    w, _, _ = written(base, old, {})
    assert len(w.slices) == 10 and w.header is not None and w.header.endpoints == []


def test_slices_that_gain_endpoints_are_written_first() -> None:
    """A node moved between slices is seen twice (then listed once), never not at all, by a
    reader applying one transaction at a time."""
    base = fleet(150)  # six full slices of 25 nodes
    header, slices = split_route(base, {})
    grown = msgspec.structs.replace(base, endpoints=[*base.endpoints, *(ep("n00000", i) for i in range(4, 8))])
    w, _, new = plan_write(grown, header, slices)
    # n00000 grew to 8 endpoints: slice 0 has no room for its last node, which moves to a new slice.
    assert [s.slice for s in w.slices] == [6, 0]
    assert {e.node for e in new[6].endpoints} == {"n00024"}


# --- assembly (the readers' rule) ----------------------------------------------------------------


def test_assembly_waits_for_every_slice_of_the_headers_epoch() -> None:
    header, slices = split_route(fleet(250), {})
    assert assemble(header, slices) is not None and len(assemble(header, slices).endpoints) == 1000  # type: ignore[union-attr]
    assert assemble(header, {n: s for n, s in slices.items() if n != 9}) is None  # slice 9 not here yet
    newer = {**slices, 1: msgspec.structs.replace(slices[1], epoch=2)}
    assert assemble(header, newer) is None  # never two leaders' tables mixed
    moved = {**slices, 2: msgspec.structs.replace(slices[2], endpoints=[*slices[2].endpoints, slices[0].endpoints[0]])}
    assert len(assemble(header, moved).endpoints) == 1000  # type: ignore[union-attr]  # listed once
    old = fleet(3)
    assert assemble(old, {}) is old  # schema 1: complete in itself


def test_route_assembly_keeps_the_last_complete_route_through_a_rewrite() -> None:
    keys = Keyspace("t")
    header, slices = split_route(fleet(250), {})
    ra = RouteAssembly(keys)
    for n, s in slices.items():
        ra.put(keys.route_slice("m", n), encode(s))
    assert ra.assemble("m") is None  # no header yet: not a route
    ra.put(keys.route("m"), encode(header))
    assert len(ra.assemble("m").endpoints) == 1000  # type: ignore[union-attr]
    h2, s2 = split_route(fleet(250, epoch=2), {})
    ra.put(keys.route_slice("m", 0), encode(s2[0]))  # a new leader's first transaction
    assert ra.assemble("m").epoch == 1 and len(ra.assemble("m").endpoints) == 1000  # type: ignore[union-attr]
    ra.put(keys.route("m"), encode(h2))  # header before the other slices (another watch's order)
    assert ra.assemble("m").epoch == 1  # type: ignore[union-attr]
    for n in range(1, 10):
        ra.put(keys.route_slice("m", n), encode(s2[n]))
    assert ra.assemble("m").epoch == 2  # type: ignore[union-attr]
    ra.delete(keys.route("m"))
    assert ra.assemble("m") is None
    assert ra.put(keys.route_slice("m", 3), b"{not json") is None  # bad record: skipped
    # A slice whose content names another slice (a hand-edited value): skipped, as the leader does.
    assert ra.put(keys.route_slice("m", 3), encode(s2[4])) is None


def test_slice_keys_of_one_model_never_match_another() -> None:
    keys = Keyspace("t")
    for model in ("qwen", "qwen/x", "qwen-2", "Qwen/Qwen3-32B", "qwen3:32b"):
        key = keys.route_slice(model, 7)
        assert keys.slice_of(key) == (model, 7)
        others = [m for m in ("qwen", "qwen/x", "qwen-2", "Qwen/Qwen3-32B", "qwen3:32b") if m != model]
        assert not any(key.startswith(keys.model_slices(o)) for o in others)
    assert keys.slice_of(keys.routes + "qwen") is None and keys.slice_of(keys.route_slices + "qwen/@x") is None


def test_transactions_are_cut_by_ops_and_by_bytes() -> None:
    small = [Op.put(f"/k{i}", b"v") for i in range(250)]
    assert [len(b) for b in txn_batches(small)] == [100, 100, 50]
    big = [Op.put(f"/k{i}", b"x" * 300_000) for i in range(5)]  # 400 KB each as sent
    assert [len(b) for b in txn_batches(big)] == [2, 2, 1]
    assert [op for b in txn_batches(big) for op in b] == big  # order kept


# --- against a real etcd -------------------------------------------------------------------------


async def leader(client, keys: Keyspace, tmp: Path) -> Election:  # type: ignore[no-untyped-def]
    e = Election(client, keys, "c1", "http://c1", ttl=10, renew_deadline=8, retry_period=1, epoch_file=tmp / "epoch")
    assert await e._campaign()
    return e


async def test_writer_migrates_a_schema_1_route_and_splits_a_big_rewrite(etcd: EtcdCluster, tmp_path: Path) -> None:  # noqa: F811
    keys = Keyspace("writer")
    async with etcd.client() as client:
        old = msgspec.structs.replace(fleet(30), schema=1)
        await client.put(keys.route("m"), encode(old))
        election = await leader(client, keys, tmp_path)
        epoch = election.epoch
        assert epoch is not None
        writer = RouteWriter(client, keys, election, CoordinatorMetrics(), SliceLimits(endpoints=4))
        async with writer.headers, writer.slices:
            await asyncio.gather(*(m.wait_ready(10) for m in writer.mirrors()))
            route = fleet(30, epoch=epoch)
            count = await writer.write(RoutePlan(routes={"m": route}), POLICY, 5.0, time.monotonic())
            assert count.writes == 31 and count.txns == 1  # 30 slices + the header, one transaction
            routes = await read_routes(client, keys)
            assert routes["m"].epoch == epoch and len(routes["m"].endpoints) == 120
            raw = await client.get(keys.route("m"))
            assert raw is not None and b'"endpoints":[]' in raw.value  # the header holds none now
            # Nothing changed: nothing written (compared with what this term wrote).
            assert (await writer.write(RoutePlan(routes={"m": route}), POLICY, 5.0, time.monotonic())).writes == 0
            # A weight drifting by 10 %: held for weight_drift_interval_s after the slice's write.
            drifted = with_endpoint(route, "n00003", weight=90)
            t = time.monotonic()
            assert (await writer.write(RoutePlan(routes={"m": drifted}), POLICY, 5.0, t)).writes == 0
            assert (await writer.write(RoutePlan(routes={"m": drifted}), POLICY, 5.0, t + 6)).writes == 1
            # 150 nodes at 4 per slice: 150 ops, more than one transaction; slices before header.
            big = fleet(150, epoch=epoch)
            count = await writer.write(RoutePlan(routes={"m": big}), POLICY, 5.0, time.monotonic())
            assert count.txns == 2 and count.writes == 121  # 120 new slices + the header
            assert len((await read_routes(client, keys))["m"].endpoints) == 600
            # The model goes: its header first, then its slices.
            count = await writer.write(RoutePlan(routes={}), POLICY, 5.0, time.monotonic())
            assert count.deletes == 151
            assert await read_routes(client, keys) == {}
            assert (await client.get_prefix(keys.route_slices)).kvs == []
        await election.resign()


def table(client, keys: Keyspace, pinned: set[str] | None = None, **settings: float) -> RouteTable:  # type: ignore[no-untyped-def]
    s = WatchSettings(**settings)  # type: ignore[arg-type]
    return RouteTable(client, keys, "here", pinned=lambda: pinned or set(), settings=lambda: s)


async def put_route(client, keys: Keyspace, rec: RouteRecord, model: str = "m", txns: int = 1) -> None:  # type: ignore[no-untyped-def]
    """Header and slices as the leader writes them: slices first, header last, in ``txns``."""
    header, slices = split_route(msgspec.structs.replace(rec, model=model), {}, SliceLimits(endpoints=8))
    ops = [Op.put(keys.route_slice(model, n), encode(s)) for n, s in slices.items()]
    ops.append(Op.put(keys.route(model), encode(header)))
    step = -(-len(ops) // txns)
    for i in range(0, len(ops), step):
        await client.txn([], ops[i : i + step])


async def test_agent_follows_only_the_models_it_needs(etcd: EtcdCluster) -> None:  # noqa: F811
    keys = Keyspace("follow")
    async with etcd.client() as client:
        for model in ("a", "b", "c", "served"):
            await put_route(client, keys, fleet(10), model)
        await client.put(keys.route("old"), encode(msgspec.structs.replace(fleet(2, model="old"), schema=1)))
        rt = table(
            client, keys, pinned={"served"}, route_watch_max_models=2, route_watch_idle_s=60, route_subset_slices=0
        )
        rt.start()
        try:
            await wait_until(lambda: "served" in rt.routes, timeout=10, what="the model served here followed")
            assert set(rt.headers) == {"a", "b", "c", "served", "old"}
            assert rt.followed() == {"served"} and set(rt.routes) == {"served", "old"}  # old: complete header
            assert rt.node_count() == 40  # served and old: 10 distinct; a, b, c (not followed): 10 each
            await rt.want("a")
            assert len(rt.route("a").endpoints) == 40  # type: ignore[union-attr]
            await rt.want("b")
            await rt.want("c")  # a third on-demand model: the least recently used one goes
            assert rt.followed() == {"served", "b", "c"} and rt.route("a") is None
            rt._watches["b"].used -= 120  # not asked for in longer than route_watch_idle_s
            rt.sweep(time.monotonic())
            assert rt.followed() == {"served", "c"}
            await rt.want("unknown")  # no header: nothing to follow
            assert rt.route("unknown") is None and "unknown" not in rt.followed()
            await client.delete(keys.route("c"))  # the leader removed the model
            await wait_until(lambda: "c" not in rt.followed(), timeout=10, what="removed model unfollowed")
        finally:
            await rt.stop()


@pytest.mark.parametrize("subset", [0, 4], ids=["all-slices", "subset-of-4"])
async def test_agent_never_sees_an_empty_or_mixed_route_during_a_rewrite(etcd: EtcdCluster, subset: int) -> None:  # noqa: F811
    """Each leader's table has its own weight (100 × epoch): every route the agent shows must
    have endpoints, and all of one epoch's weight; also while its subset of the slices moves
    because the new leader's layout has fewer slices."""
    keys = Keyspace(f"rewrite{subset}")
    async with etcd.client() as client:
        await put_route(client, keys, fleet(40, epoch=1, weight=100))
        rt = table(client, keys, route_subset_slices=subset)
        rt.start()
        try:
            await rt.want("m")
            seen: list[tuple[int, int, set[int]]] = []  # (epoch, endpoints, weights) after each change
            original = rt._assemble

            def record(model: str) -> None:
                original(model)
                r = rt.routes.get(model)
                seen.append((r.epoch, len(r.endpoints), {e.weight for e in r.endpoints}) if r else (0, 0, set()))

            rt._assemble = record  # type: ignore[method-assign]
            rt._watches["m"]._on_batch = record
            # New leaders rewrite the header and its slices in several transactions each.
            await put_route(client, keys, fleet(40, epoch=2, weight=200), txns=5)
            await put_route(client, keys, fleet(35, epoch=3, weight=300), txns=3)
            await wait_until(lambda: rt.route("m") and rt.route("m").epoch == 3, timeout=10, what="epoch 3")  # type: ignore[union-attr]
            assert seen and all(n > 0 for _, n, _ in seen), f"a route without endpoints was visible: {seen}"
            assert all(weights == {100 * epoch} for epoch, _, weights in seen), f"epochs mixed: {seen}"
            assert [e for e, _, _ in seen] == sorted(e for e, _, _ in seen)
            window = rt.window("m")
            assert (window is None) == (subset == 0)
            want = 140 if window is None else 8 * len(window)  # 8 endpoints per slice here
            assert len(rt.route("m").endpoints) == want  # type: ignore[union-attr]
        finally:
            await rt.stop()


# --- subsets: each agent follows a few of a model's slices ---------------------------------------


def test_subset_windows_cover_every_slice_evenly_and_barely_move_as_slices_grow() -> None:
    slices = list(range(40))
    windows = {f"node-{i:04d}": subset_window(f"node-{i:04d}", "m", slices, 4) for i in range(1000)}
    followers = {n: 0 for n in slices}
    for w in windows.values():
        assert w is not None and len(w) == 4
        for n in w:
            followers[n] += 1
    # 1,000 × 4 / 40 = 100 agents per slice on average; a hash spreads them within a few tens.
    assert min(followers.values()) >= 60 and max(followers.values()) <= 140, followers
    assert subset_window("node-0001", "m", slices, 4) == windows["node-0001"]  # deterministic
    per_model = sum(subset_window(n, "other", slices, 4) != w for n, w in windows.items())
    assert per_model > 900  # another model's windows are drawn independently
    # A 41st slice: the windows it starts (~1/41) and those that wrapped past it (~3/41) move.
    moved = sum(subset_window(node, "m", [*slices, 40], 4) != w for node, w in windows.items())
    assert moved < 1000 * 0.2, moved
    assert subset_window("n", "m", slices[:4], 4) is None and subset_window("n", "m", slices, 0) is None


def test_a_wrapping_window_is_two_range_watches() -> None:
    assert window_runs((0, 1, 38, 39), list(range(40))) == [(0, 1), (38, 39)]
    assert window_runs((5, 6, 7, 8), list(range(40))) == [(5, 8)]
    assert window_runs((3, 7, 9), [1, 3, 7, 9, 12]) == [(3, 9)]  # consecutive in the header's list


def test_a_subset_is_usable_only_with_a_ready_endpoint_elsewhere_of_the_wanted_class() -> None:
    header = RouteRecord(model="m", epoch=1, updated_at=0, ready_endpoints=3, ready_classes={"H100": 1, "A100": 2})
    sub = RouteRecord(model="m", epoch=1, updated_at=0, endpoints=[ep("a", cls="A100"), ep("here", cls="H100")])
    assert usable(sub, header, {"A100"}, "here")
    assert not usable(sub, header, {"H100"}, "here")  # the H100 READY elsewhere is not in the subset
    assert usable(sub, header, {"L4"}, "here")  # no L4 anywhere: any class will do
    down = RouteRecord(model="m", epoch=1, updated_at=0, endpoints=[ep("a", state="DOWN")])
    assert not usable(down, header, {"A100"}, "here")
    nothing = RouteRecord(model="m", epoch=1, updated_at=0)
    assert usable(down, nothing, {"A100"}, "here")  # nothing READY anywhere: widening cannot help


async def test_agent_follows_its_subset_widens_when_it_cannot_serve_and_narrows_back(etcd: EtcdCluster) -> None:  # noqa: F811
    keys = Keyspace("subset")
    async with etcd.client() as client:
        await put_route(client, keys, fleet(20))  # 80 endpoints, 8 per slice: 10 slices
        rt = table(client, keys, pinned={"m"}, route_subset_slices=2)
        rt.start()
        try:
            await wait_until(lambda: rt.route("m") is not None, timeout=10, what="the subset's route")
            window = rt.window("m")
            assert window is not None and len(window) == 2
            assert len(rt.route("m").endpoints) == 16  # type: ignore[union-attr]
            assert set(rt._watches["m"].slices) == set(window)  # etcd sent no other slice
            assert rt.node_count() == 20  # from the header: the subset lists only 4 nodes
            # Every endpoint in the subset goes DOWN, the rest stay READY: follow every slice.
            in_subset = {e.node for e in rt.route("m").endpoints}  # type: ignore[union-attr]
            degraded = fleet(20)
            for node in in_subset:
                degraded = with_endpoint(degraded, node, state="DOWN")
            await put_route(client, keys, degraded)
            await wait_until(
                lambda: rt.window("m") is None and len(rt.route("m").endpoints) == 80,  # type: ignore[union-attr]
                timeout=10,
                what="widened to every slice",
            )
            rt.sweep(time.monotonic())  # still nothing READY in the subset: stays wide
            assert rt.window("m") is None
            await put_route(client, keys, fleet(20))  # they are back
            await wait_until(
                lambda: all(e.state == "READY" for e in rt.route("m").endpoints),  # type: ignore[union-attr]
                timeout=10,
                what="the whole route READY again",
            )
            rt.sweep(time.monotonic())
            assert rt.window("m") == window
            await wait_until(lambda: len(rt.route("m").endpoints) == 16, timeout=10, what="narrowed")  # type: ignore[union-attr]
        finally:
            await rt.stop()
