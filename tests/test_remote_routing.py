"""Pure routing pieces of the proxy: smooth weighted round-robin and remote candidates."""

from __future__ import annotations

from collections import Counter

import pytest

from agent.proxy.remote import MAX_HOPS, RemotePicker, hops_of
from agent.proxy.routing import Picker, SmoothWeighted
from gpufleet.keyspace.records import RouteEndpoint, RouteRecord


def ep(node: str, cls: str, weight: int, state: str = "READY") -> RouteEndpoint:
    return RouteEndpoint(
        node=node, address=f"http://{node}:8080", instance="m", gpu_class=cls, weight=weight, state=state
    )  # type: ignore[arg-type]


def route(*eps: RouteEndpoint, cross_class: bool = False) -> RouteRecord:
    return RouteRecord(model="m", epoch=1, updated_at=0, endpoints=list(eps), cross_class=cross_class)


def test_smooth_weighted_is_proportional_and_spread() -> None:
    rr = SmoothWeighted()
    picks = [rr.pick([("a", 5), ("b", 1), ("c", 1)]) for _ in range(7)]
    assert picks == ["a", "a", "b", "a", "c", "a", "a"]
    many = Counter(rr.pick([("a", 3), ("b", 1)]) for _ in range(400))
    assert many == {"a": 300, "b": 100}
    assert rr.pick([]) is None


def test_least_in_flight_with_rotating_ties() -> None:
    class C:
        def __init__(self, name: str) -> None:
            self.name = name

    p = Picker()
    a, b, c = C("a"), C("b"), C("c")
    load = {"a": 0, "b": 0, "c": 2}  # the proxy's in-flight counts, by name
    assert [p.pick("m", [a, b, c], load.__getitem__).name for _ in range(4)] == ["a", "b", "a", "b"]  # type: ignore[union-attr]
    load["b"] = 1
    assert p.pick("m", [a, b, c], load.__getitem__) is a


def test_remote_candidates_same_class_only_unless_allowed() -> None:
    picker = RemotePicker("a100-2")
    r = route(ep("a100-1", "A100", 190), ep("a100-2", "A100", 190), ep("h100-1", "H100", 330))
    names = {t.node for t, _ in picker.candidates(r, {"A100"}, set())}
    assert names == {"a100-1"}  # never itself, never the H100
    r_down = route(ep("a100-1", "A100", 0, "DOWN"), ep("a100-2", "A100", 190), ep("h100-1", "H100", 330))
    assert picker.candidates(r_down, {"A100"}, set()) == []  # no same-class replica: no failover
    r_cross = route(*r_down.endpoints, cross_class=True)
    assert {t.node for t, _ in picker.candidates(r_cross, {"A100"}, set())} == {"h100-1"}
    # A node whose class does not serve the model routes to any class, by weight.
    gateway = RemotePicker("cpu-gw")
    assert {t.node for t, _ in gateway.candidates(r, set(), set())} == {"a100-1", "a100-2", "h100-1"}


def test_remote_candidates_skip_tried_drained_and_suspect() -> None:
    picker = RemotePicker("x")
    r = route(ep("a", "A100", 100), ep("b", "A100", 100), ep("c", "A100", 0, "DRAINED"))
    first = picker.candidates(r, {"A100"}, set())
    assert {t.node for t, _ in first} == {"a", "b"}
    a = next(t for t, _ in first if t.node == "a")
    assert {t.node for t, _ in picker.candidates(r, {"A100"}, {a.name})} == {"b"}
    a.request_probe()  # failed just now: tried last
    assert {t.node for t, _ in picker.candidates(r, {"A100"}, set())} == {"b"}
    b = next(t for t, _ in first if t.node == "b")
    b.request_probe()
    assert {t.node for t, _ in picker.candidates(r, {"A100"}, set())} == {"a", "b"}  # all suspect: still try


def test_hop_header_parsing() -> None:
    assert hops_of(None) == 0 and hops_of("1") == 1 and hops_of("-3") == 0
    assert hops_of("garbage") == MAX_HOPS  # unreadable: never forward again


async def test_an_attempt_is_abandoned_when_its_node_goes_down_unless_it_has_answered() -> None:
    import asyncio

    from agent.proxy.context import Failure
    from agent.proxy.remote import unless_node_leaves

    gone, finish = asyncio.Event(), asyncio.Event()
    cancelled = []

    async def attempt() -> str:
        try:
            await finish.wait()  # a request stuck behind a silent partition
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "answer"

    task = asyncio.ensure_future(unless_node_leaves(attempt(), gone, lambda: False, "n1/m"))
    await asyncio.sleep(0)
    gone.set()
    with pytest.raises(Failure) as e:
        await task
    assert e.value.kind == "node_down" and cancelled == [True]

    # Once something has reached the client (a stream under way), it runs to its end.
    gone = asyncio.Event()
    task = asyncio.ensure_future(unless_node_leaves(attempt(), gone, lambda: True, "n1/m"))
    await asyncio.sleep(0)
    gone.set()
    await asyncio.sleep(0)
    assert not task.done()
    finish.set()
    assert await task == "answer"
