"""Pure routing pieces of the proxy: smooth weighted round-robin and remote candidates."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.proxy.remote import MAX_HOPS, RemotePicker, hops_of
from agent.proxy.routing import LeastLoaded, Picker, SmoothWeighted, affine
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


def test_least_loaded_follows_the_weights_at_rest_and_sheds_load() -> None:
    ll, rr = LeastLoaded(random.Random(1)), SmoothWeighted()
    keys = [("a", 5), ("b", 1), ("c", 1)]
    idle = {"a": 0, "b": 0, "c": 0}
    assert [ll.pick(keys, idle.__getitem__) for _ in range(14)] == [rr.pick(keys) for _ in range(14)]
    # "a" is slow: requests pile up there; the second choice takes the request when it carries
    # less load per weight (b: 1 in flight at weight 1 beats a: 6 at weight 5).
    busy = {"a": 6, "b": 1, "c": 3}
    picks = Counter(ll.pick(keys, busy.__getitem__) for _ in range(700))
    # a (1.2 per weight) sheds part of its 5/7 to b (1.0); c (3.0) is the busiest and gets none.
    assert picks["a"] < 500 and picks["b"] > 100 and picks["c"] == 0
    fair = {"a": 5, "b": 1, "c": 1}  # load in proportion to weight: the weights decide alone
    assert Counter(ll.pick(keys, fair.__getitem__) for _ in range(700)) == {"a": 500, "b": 100, "c": 100}
    assert ll.pick([], idle.__getitem__) is None and ll.pick([("a", 1)], busy.__getitem__) == "a"


def test_a_session_sticks_to_one_key_and_moves_only_when_its_key_leaves() -> None:
    keys = [("a", 1), ("b", 1), ("c", 1)]
    home = {s: affine(s, keys, str) for s in (f"session-{i}" for i in range(600))}
    assert all(affine(s, keys, str) == k for s, k in home.items())  # stable
    spread = Counter(home.values())
    assert min(spread.values()) > 150  # about a third each
    without_c = [("a", 1), ("b", 1)]
    moved = [s for s, k in home.items() if k != "c" and affine(s, without_c, str) != k]
    assert moved == []  # only c's sessions move
    heavy = Counter(affine(s, [("a", 3), ("b", 1)], str) for s in home)
    assert 400 < heavy["a"] < 500  # weighted: about 3/4
    assert affine("s", [], str) is None and affine("s", [("a", 0)], str) is None


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
    from agent.proxy.dispatch import AbandonIfGone
    from gpufleet.tasks import Flag

    finish = asyncio.Event()
    cancelled = []

    async def attempt() -> str:
        try:
            await finish.wait()  # a request stuck behind a silent partition
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "answer"

    async def run(gone: Flag, answered: bool) -> str:
        with AbandonIfGone(gone, "n1/m", "node_down", lambda: answered):
            return await attempt()

    gone = Flag()
    task = asyncio.ensure_future(run(gone, False))
    await asyncio.sleep(0)
    gone.set()
    with pytest.raises(Failure) as e:
        await task
    assert e.value.kind == "node_down" and "n1/m: its node went DOWN" in e.value.detail and cancelled == [True]

    # A node already DOWN when the attempt begins: abandoned at its first wait.
    cancelled.clear()
    with pytest.raises(Failure):
        await run(gone, False)
    assert cancelled == [True]

    # Once something has reached the client (a stream under way), it runs to its end.
    gone = Flag()
    task = asyncio.ensure_future(run(gone, True))
    await asyncio.sleep(0)
    gone.set()
    await asyncio.sleep(0)
    assert not task.done()
    finish.set()
    assert await task == "answer"


def test_eligible_targets_are_worked_out_once_per_route_record() -> None:
    """Every request asks (a route may list the whole fleet): the answer is kept per route
    record and this node's classes, and a new record or other classes are looked at afresh,
    keeping each target's own state (a suspect one stays suspect)."""
    picker = RemotePicker("x")
    r = route(ep("a", "A100", 100), ep("b", "A100", 100), ep("h", "H100", 300))
    first = picker.eligible(r, {"A100"})
    assert [t.node for t, _ in first] == ["a", "b"]
    assert picker.eligible(r, {"A100"}) is first
    a = first[0][0]
    a.request_probe()
    changed = route(ep("a", "A100", 100), ep("b", "A100", 0, "DOWN"), ep("h", "H100", 300))
    after = picker.eligible(changed, {"A100"})
    assert [(t.node, w) for t, w in after] == [("a", 100)]
    assert after[0][0] is a and a.suspect_until > 0  # the same target, still suspect
    assert [t.node for t, _ in picker.eligible(changed, {"H100"})] == ["h"]
    assert [t.node for t, _ in picker.candidates(changed, {"A100"}, set())] == ["a"]  # suspect, but the only one


class _ReferenceSmoothWeighted:
    """nginx's algorithm as first written here: a pass of dict updates per pick (the oracle)."""

    def __init__(self) -> None:
        self.current: dict[object, float] = {}

    def pick(self, weighted: list[tuple[object, int]]) -> object | None:
        if not weighted:
            return None
        total, best, best_cur, live = 0, None, float("-inf"), set()
        for key, weight in weighted:
            live.add(key)
            cur = self.current.get(key, 0.0) + weight
            self.current[key] = cur
            total += weight
            if cur > best_cur:
                best, best_cur = key, cur
        self.current[best] -= total
        if len(self.current) > 2 * len(live):
            self.current = {k: v for k, v in self.current.items() if k in live}
        return best


def test_smooth_weighted_picks_as_nginx_does_on_lists_kept_and_changed() -> None:
    """The pick keeps each list's currents in its order (a route's eligible list, passed again
    and again); it must pick exactly what the algorithm picks, also as lists change: keys
    leaving and coming back, weights moving, a list filtered for one pick (a retry)."""
    rng = random.Random(7)
    fast, oracle = SmoothWeighted(), _ReferenceSmoothWeighted()
    keys = [f"n{i}" for i in range(40)]
    for _ in range(60):
        chosen = rng.sample(keys, rng.randint(1, len(keys)))
        weighted = [(k, rng.choice([1, 3, 100, 190, 330])) for k in chosen]
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.1:  # a filtered copy for one pick, then the list again
                copy = [kw for kw in weighted if rng.random() < 0.7] or weighted[:1]
                assert fast.pick(copy) == oracle.pick(copy)
            assert fast.pick(weighted) == oracle.pick(weighted)


def test_least_loaded_second_choice_is_drawn_in_proportion_to_the_other_weights() -> None:
    """The second choice never is the first, and falls to each other key by its weight, also
    when the first holds nearly all of it (its redraws run out and the others are drawn from)."""
    ll = LeastLoaded(random.Random(3))
    keys = [("a", 6), ("b", 3), ("c", 1)]
    seconds = Counter(ll._second(keys, 0)[0] for _ in range(6000))
    assert set(seconds) == {"b", "c"} and 0.70 < seconds["b"] / 6000 < 0.80  # 3/4
    heavy = [("a", 10_000), ("b", 1), ("c", 1)]
    assert Counter(ll._second(heavy, 0)[0] for _ in range(200)).keys() == {"b", "c"}


def test_a_sessions_home_is_hashed_once_per_candidate_list_and_few_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendezvous hashing hashes every candidate: a session's home among one list (the route's
    eligible list, the same object until the route changes) is remembered, for a bounded
    number of sessions; another list is hashed afresh."""
    import agent.proxy.remote as remote

    monkeypatch.setattr(remote, "HOMES_KEPT", 3)
    picker = RemotePicker("x")
    r = route(ep("a", "A100", 1), ep("b", "A100", 1), ep("c", "A100", 1))
    eligible = picker.candidates(r, {"A100"}, set())
    homes = {s: picker.home(s, eligible) for s in ("s1", "s2", "s3")}
    assert all(h is affine(s, eligible, lambda t: t.name) for s, h in homes.items())
    hashed: list[str] = []
    monkeypatch.setattr(remote, "affine", lambda s, keys, name: hashed.append(s) or affine(s, keys, name))
    assert picker.home("s1", eligible) is homes["s1"] and hashed == []  # remembered
    without_c = picker.candidates(r, {"A100"}, {eligible[2][0].name})  # a retry's list
    picker.home("s1", without_c)
    picker.home("s4", eligible)  # a fourth session: the oldest remembered one goes
    assert hashed == ["s1", "s4"]
    picker.home("s2", eligible)
    assert hashed == ["s1", "s4", "s2"]


def test_the_list_without_suspects_is_made_again_only_when_suspicion_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a large fleet some node has nearly always failed lately: the candidates without it are
    one list, kept until another target fails or a suspect's time is up."""
    import agent.proxy.remote as remote

    clock = [1000.0]
    monkeypatch.setattr(remote.time, "monotonic", lambda: clock[0])
    picker = RemotePicker("x")
    r = route(ep("a", "A100", 1), ep("b", "A100", 1), ep("c", "A100", 1))
    eligible = picker.candidates(r, {"A100"}, set())
    a, b, _ = (t for t, _ in eligible)
    a.request_probe()  # suspect until 1010
    first = picker.candidates(r, {"A100"}, set())
    assert [t.node for t, _ in first] == ["b", "c"]
    clock[0] += 5
    assert picker.candidates(r, {"A100"}, set()) is first  # nothing changed: the same list
    b.request_probe()  # suspect until 1015
    assert [t.node for t, _ in picker.candidates(r, {"A100"}, set())] == ["c"]
    clock[0] = 1010.0  # a's time is up
    assert [t.node for t, _ in picker.candidates(r, {"A100"}, set())] == ["a", "c"]
    clock[0] = 1015.0  # and b's: nothing is suspect, the eligible list itself
    assert picker.candidates(r, {"A100"}, set()) is eligible
