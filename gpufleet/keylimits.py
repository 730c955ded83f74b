"""Per-key limits that hold across the fleet without a round trip on the request path. Pure.

A key's ``rpm``, ``tpm`` and ``max_concurrency`` are fleet-wide: a client may spread its
requests over every entry node. Each entry node enforces a *share* of each limit locally
(``quota = limit × share``) with a sliding one-minute window (60 one-second buckets); the shares
of all nodes sum to at most 1, so the fleet as a whole can never admit more than the limit in
any minute, whatever the number of entry nodes and however the client spreads its requests.
What shares buy is utilisation: a node that sees a key's traffic needs a large share of it.
Every node reports its per-key demand (admitted and refused requests, tokens) and the leader
re-divides each limit in proportion to demand (``divide``) — the same idea as a token bucket
per node whose rates are rebalanced, kept exact by never letting the shares sum past 1.

Tokens are known only after the answer (the backend's ``usage``), so ``tpm`` is charged after
each request and checked before the next: a node overshoots its token quota by at most the
requests it already had in flight, as OpenAI's own token limits do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.keyspace.records import ApiKeyRecord, KeyDemand

WINDOW_S = 60
_BUCKETS = WINDOW_S  # one-second buckets


class Window:
    """Counts over the last ``WINDOW_S`` seconds in one-second buckets (at most 1 s coarse)."""

    __slots__ = ("_counts", "_head", "_total")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self._head = 0  # the absolute second the newest bucket holds
        self._total = 0

    def _advance(self, now: float) -> None:
        second = int(now)
        if second <= self._head:
            return
        steps = second - self._head
        if steps >= _BUCKETS:
            self._counts = [0] * _BUCKETS
            self._total = 0
        else:
            for s in range(self._head + 1, second + 1):
                i = s % _BUCKETS
                self._total -= self._counts[i]
                self._counts[i] = 0
        self._head = second

    def add(self, now: float, n: int = 1) -> None:
        self._advance(now)
        self._counts[int(now) % _BUCKETS] += n
        self._total += n

    def total(self, now: float) -> int:
        self._advance(now)
        return self._total

    def free_at(self, now: float, needed: int, quota: float) -> float:
        """When enough of the window will have slid past for ``needed`` more to fit ``quota``."""
        self._advance(now)
        excess = self._total + needed - quota
        if excess <= 0:
            return now
        second = int(now)
        for age in range(_BUCKETS - 1, -1, -1):  # oldest bucket first
            excess -= self._counts[(second - age) % _BUCKETS]
            if excess <= 0:
                return float(second - age + WINDOW_S)
        return float(second + WINDOW_S)


@dataclass(slots=True)
class KeyUse:
    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)
    refused: Window = field(default_factory=Window)
    in_flight: int = 0


Demand = KeyDemand  # what a node reports: gpufleet/keyspace/records.py


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: bool
    limit: str = ""  # which limit refused: "requests", "tokens", "concurrency"
    retry_after_s: float = 0.0
    # x-ratelimit-* as OpenAI sends them: the key's fleet-wide limit, and what remains of this
    # node's share (what the client can count on here).
    headers: Mapping[str, str] = field(default_factory=dict)


def _reset(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "0.5s"."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


def _window_limit(
    kind: str, limit: int, window: Window, share: float, cost: int, now: float, headers: dict[str, str]
) -> tuple[str, float] | None:
    """Check one windowed limit (requests cost 1 now; tokens are charged after the answer, so
    they cost 0 now and a full window refuses), set its x-ratelimit-* headers, and say (limit,
    seconds until there is room) when it refuses."""
    quota = limit * share
    used = window.total(now)
    full = used + cost > quota if cost else used >= quota
    names = _HEADER_NAMES[kind]
    headers[names[0]] = str(limit)
    headers[names[1]] = str(max(0, math.floor(quota - used) - cost))
    if not full:  # room: when one more fits again is the window over the quota, no bucket walk
        headers[names[2]] = _reset(WINDOW_S / max(quota, 1)) if cost else "0s"
        return None
    wait = window.free_at(now, max(cost, 1), quota) - now
    headers[names[2]] = _reset(wait)
    return (kind, wait if quota >= 1 else WINDOW_S)


_HEADER_NAMES = {
    kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens")
}


class Limiter:
    """One entry node's view: its use of each key, checked against its share of each limit."""

    def __init__(self) -> None:
        self.use: dict[str, KeyUse] = {}

    def _of(self, name: str) -> KeyUse:
        u = self.use.get(name)
        if u is None:
            u = self.use[name] = KeyUse()
        return u

    def admit(self, key: ApiKeyRecord, share: float, now: float) -> Admission:
        """Admit one request of ``key`` here or say which limit refuses it and for how long."""
        if key.rpm is None and key.tpm is None and key.max_concurrency is None:
            return Admission(True)
        u = self._of(key.name)
        headers: dict[str, str] = {}
        refusal: tuple[str, float] | None = None
        if key.max_concurrency is not None:
            cap = math.floor(key.max_concurrency * share)
            if u.in_flight + 1 > cap:
                refusal = ("concurrency", 1.0)
        for kind, limit, window, cost in (("requests", key.rpm, u.requests, 1), ("tokens", key.tpm, u.tokens, 0)):
            if limit is not None:
                full = _window_limit(kind, limit, window, share, cost, now, headers)
                refusal = refusal or full
        if refusal is not None:
            u.refused.add(now)
            limit, wait = refusal
            return Admission(False, limit, max(1.0, math.ceil(wait)), headers)
        u.requests.add(now)
        u.in_flight += 1
        return Admission(True, headers=headers)

    def done(self, key: ApiKeyRecord, tokens: int, now: float) -> None:
        """An admitted request of ``key`` ended, having used ``tokens`` (0 when unknown)."""
        if key.rpm is None and key.tpm is None and key.max_concurrency is None:
            return
        u = self._of(key.name)
        u.in_flight = max(0, u.in_flight - 1)
        if tokens:
            u.tokens.add(now, tokens)

    def demand(self, now: float) -> dict[str, Demand]:
        """What this node reports: each key's use over the last window (idle keys left out)."""
        out = {}
        for name, u in list(self.use.items()):
            d = Demand(
                requests=u.requests.total(now),
                refused=u.refused.total(now),
                tokens=u.tokens.total(now),
                in_flight=u.in_flight,
            )
            if d == Demand():
                del self.use[name]  # forget keys idle for a whole window: memory stays bounded
            else:
                out[name] = d
        return out


def divide(demands: Mapping[str, Demand], entry_nodes: int, reserve: float = 0.05) -> tuple[dict[str, float], float]:
    """The leader's division of one key's limits among entry nodes, from their reported demand.

    Returns (share per node that reported demand, share of each node that did not). Nodes with
    demand split ``1 - reserve`` in proportion to it (admitted + refused requests, so a node
    refusing for lack of share grows); the others split ``reserve`` evenly, so a client moving
    to a new node is served at once, slowly, until the next division. The shares sum to 1.
    """
    weights = {n: d.requests + d.refused for n, d in demands.items() if d.requests + d.refused > 0}
    idle = max(0, entry_nodes - len(weights))
    if not weights:
        return {}, 1.0 / max(1, entry_nodes)
    if idle == 0:
        reserve = 0.0
    total = sum(weights.values())
    busy = {n: (1.0 - reserve) * w / total for n, w in weights.items()}
    return busy, (reserve / idle if idle else 0.0)
