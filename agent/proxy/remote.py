"""Forwarding to other nodes by the coordinator's route table.

Used when a model has no READY local instance, when the local ones are saturated, or when
this node is drained. Candidates are the route's READY endpoints on *other* nodes; if this
node's GPU class serves the model anywhere in the cluster, only that class is eligible
(failover never crosses GPU generations unless the route says ``cross_class``). Among them,
smooth weighted round-robin by the coordinator's weights. A request that already hopped once
is never forwarded again (``X-GPUFleet-Hops``), so two nodes cannot bounce it between them.

An attempt on another node that has not answered when the route marks that node DOWN is
abandoned and retried elsewhere (dispatch.py, ``AbandonIfGone``): behind a silent partition (packets
dropped, no reset) the connection would otherwise wait for the total deadline, 15 minutes.
Local instances leaving rotation get the same treatment.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet

from agent.backends import Judgement, Upstream, judge_status
from gpufleet.facts import HOPS_HEADER as HOPS_HEADER  # re-exported for the proxy
from gpufleet.keyspace.records import RouteRecord

from .routing import LeastLoaded, SmoothWeighted, affine, name_of

MAX_HOPS = 1
HOMES_KEPT = 4096  # sessions whose home on another node is remembered (RemotePicker.home)
SUSPECT_S = 10.0  # an endpoint that just failed is tried last for this long


class Suspicion:
    """Until when any target of one picker stays suspect, and how many times one became so:
    while none is, no pick looks at each target to leave the suspect ones out, and while no
    new one is and none has recovered, the list without them is the one made last."""

    __slots__ = ("times", "until")

    def __init__(self) -> None:
        self.until = 0.0
        self.times = 0


class RemoteTarget:
    """A remote endpoint, with the attributes the proxy's attempt loop uses on a local instance
    (its counters are in the proxy's stats, under ``name``)."""

    __slots__ = ("instance", "name", "node", "suspect_until", "suspicion", "upstream")

    def __init__(self, node: str, instance: str, address: str, suspicion: Suspicion) -> None:
        self.node, self.instance = node, instance
        self.name = f"{node}/{instance}"
        self.upstream = Upstream(address.rstrip("/"))
        self.suspect_until = 0.0
        self.suspicion = suspicion  # its picker's, shared by all its targets

    @property
    def base_url(self) -> str:
        return self.upstream.base_url

    def judge(self, status: int, body: bytes) -> Judgement:
        # The other node's proxy already judged its own servers' answers: an error it passes
        # on is the request's, a 5xx means that node could not serve it.
        return Judgement(judge_status(status))

    def request_probe(self) -> None:
        # Passive health for a node we do not supervise: steer away until the coordinator's
        # route (or time) says otherwise.
        self.suspect_until = time.monotonic() + SUSPECT_S
        self.suspicion.until = max(self.suspicion.until, self.suspect_until)
        self.suspicion.times += 1


def _unsuspected(weighted: list[tuple[RemoteTarget, int]], now: float) -> list[tuple[RemoteTarget, int]]:
    """Those not suspect at ``now``; all of them when every one is (still better than none)."""
    return [(t, w) for t, w in weighted if t.suspect_until <= now] or weighted


def hops_of(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return MAX_HOPS  # unreadable: treat as exhausted rather than risk a loop


class RemotePicker:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._targets: dict[tuple[str, str], RemoteTarget] = {}
        self._rr: dict[str, SmoothWeighted] = {}
        self._ll: dict[str, LeastLoaded] = {}
        # model -> (its route, this node's GPU classes, the targets they make eligible): worked
        # out once per route record, not per request. A route lists up to every node of the
        # fleet, and records are replaced when they change, never altered (routes.py).
        self._eligible: dict[str, tuple[RouteRecord, frozenset[str], list[tuple[RemoteTarget, int]]]] = {}
        self._suspicion = Suspicion()  # of every target made here
        # model -> (its eligible list, Suspicion.times, when the next suspect recovers, the list
        # without the suspect): in a large fleet some node has nearly always failed lately.
        self._healthy: dict[str, tuple[list[tuple[RemoteTarget, int]], int, float, list[tuple[RemoteTarget, int]]]] = {}
        # session -> (the candidate list, its home there): rendezvous hashing hashes every
        # candidate, so a session's home is worked out once per list (the eligible list is the
        # same object until the route changes), for the most recent sessions.
        self._homes: dict[str, tuple[list[tuple[RemoteTarget, int]], RemoteTarget | None]] = {}

    def candidates(
        self, route: RouteRecord, own_classes: set[str], tried: AbstractSet[str]
    ) -> list[tuple[RemoteTarget, int]]:
        """The eligible targets not ``tried``, with their weights: those not suspect, or all of
        them when every one is. Most calls leave none out: they get the eligible list itself
        (shared, not to be changed), which the pickers know again (routing.SmoothWeighted)."""
        eligible = self.eligible(route, own_classes)
        now = time.monotonic()
        if not tried:
            return eligible if now >= self._suspicion.until else self._without_suspects(route.model, eligible, now)
        return _unsuspected([(t, w) for t, w in eligible if t.name not in tried], now)

    def _without_suspects(
        self, model: str, eligible: list[tuple[RemoteTarget, int]], now: float
    ) -> list[tuple[RemoteTarget, int]]:
        """``eligible`` less its suspect targets (all of it, when every one is), made again only
        when a target became suspect or the next one recovers: the same list object meanwhile."""
        known = self._healthy.get(model)
        if known is not None and known[0] is eligible and known[1] == self._suspicion.times and now < known[2]:
            return known[3]
        healthy = _unsuspected(eligible, now)
        recovers = min((t.suspect_until for t, _ in eligible if t.suspect_until > now), default=math.inf)
        self._healthy[model] = (eligible, self._suspicion.times, recovers, healthy)
        return healthy

    def eligible(self, route: RouteRecord, own_classes: set[str]) -> list[tuple[RemoteTarget, int]]:
        """The route's READY endpoints with a weight on other nodes, of this node's GPU classes
        where the route has any (or of every class, if none is READY and the route allows it),
        as targets with their weights. Shared: not to be changed."""
        known = self._eligible.get(route.model)
        if known is not None and known[0] is route and known[1] == own_classes:
            return known[2]
        eps = [e for e in route.endpoints if e.state == "READY" and e.weight > 0 and e.node != self.node_id]
        preferred = own_classes & {e.gpu_class for e in route.endpoints}
        if preferred:
            same = [e for e in eps if e.gpu_class in preferred]
            eps = same if same or not route.cross_class else eps
        out = []
        for e in eps:
            t = self._targets.get((e.node, e.instance))
            if t is None or t.base_url != e.address.rstrip("/"):
                t = self._targets[(e.node, e.instance)] = RemoteTarget(e.node, e.instance, e.address, self._suspicion)
            out.append((t, e.weight))
        self._eligible[route.model] = (route, frozenset(own_classes), out)
        return out

    def home(self, session: str, candidates: list[tuple[RemoteTarget, int]]) -> RemoteTarget | None:
        """The candidate ``session`` sticks to (routing.affine), remembered for this list."""
        known = self._homes.get(session)
        if known is not None and known[0] is candidates:
            return known[1]
        target = affine(session, candidates, name_of)
        homes = self._homes
        homes.pop(session, None)
        if len(homes) >= HOMES_KEPT:
            del homes[next(iter(homes))]  # the session that went longest without a new home
        homes[session] = (candidates, target)
        return target

    def pick(
        self,
        model: str,
        weighted: list[tuple[RemoteTarget, int]],
        load: Callable[[RemoteTarget], int],
        balance: str = "least_loaded",
    ) -> RemoteTarget | None:
        """By the route's weights (``round_robin``), corrected by ``load``: requests this proxy
        has in flight there (``least_loaded``, routing.LeastLoaded)."""
        # Made once per model (setdefault would make one per call: a Random seeded from
        # os.urandom per request).
        if balance == "round_robin":
            rr = self._rr.get(model)
            if rr is None:
                rr = self._rr[model] = SmoothWeighted()
            return rr.pick(weighted)  # type: ignore[return-value]
        ll = self._ll.get(model)
        if ll is None:
            ll = self._ll[model] = LeastLoaded()
        return ll.pick(weighted, load)
