"""Which instance serves a request: pure functions over the instances' current state.

Least in-flight first among READY instances; ties rotate so equal instances share the load
(a plain "min" would pile every idle-time request onto the first one). Optional task routes send
requests with images or documents to their own instance groups, so a long document parse does
not block image requests (the OpenClaw multi-instance setup, docs/sources.md).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
import random
from bisect import bisect_right
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Literal, Protocol, TypeVar

import msgspec

from agent.config import TaskRoute

Task = Literal["image", "document", "text"]


class Candidate(Protocol):
    @property
    def name(self) -> str: ...


C = TypeVar("C", bound=Candidate)


def name_of(candidate: Candidate) -> str:
    """A candidate's name (what rendezvous hashing hashes, ``affine``)."""
    return candidate.name


K = TypeVar("K", bound=Hashable)


class _Part(msgspec.Struct):
    type: str = ""


class _Message(msgspec.Struct):
    content: str | list[_Part] | None = None


class _Messages(msgspec.Struct):
    messages: list[_Message] = []


_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_DOCUMENT_PARTS = frozenset({"file", "input_file", "document"})


def classify_task(body: bytes) -> Task:
    """'image' if any message has an image part, 'document' for a file part, else 'text'.

    Only the message part types are decoded; a body this cannot read is 'text' (the upstream
    will judge it)."""
    try:
        msgs = msgspec.json.decode(body, type=_Messages).messages
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return "text"
    kinds = {p.type for m in msgs if isinstance(m.content, list) for p in m.content}
    if kinds & _IMAGE_PARTS:
        return "image"
    if kinds & _DOCUMENT_PARTS:
        return "document"
    return "text"


def task_route_group(task_routes: Iterable[TaskRoute], model: str, task: Task) -> list[str] | None:
    """The instances the first task route for (model, task) names; None: no route applies."""
    for r in task_routes:
        if r.model == model and r.task == task:
            return r.instances
    return None


class Picker:
    """Least in-flight with rotating tie-break; one cursor per model."""

    def __init__(self) -> None:
        self._cursor: dict[str, int] = {}

    def pick(self, model: str, ready: Sequence[C], in_flight: Callable[[str], int]) -> C | None:
        """``in_flight``: requests now on the candidate of that name (the proxy's count)."""
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0]
        loads = [in_flight(c.name) for c in ready]
        least = min(loads)
        tied = [c for c, n in zip(ready, loads, strict=True) if n == least]
        n = self._cursor.get(model, 0)
        self._cursor[model] = n + 1
        return tied[n % len(tied)]


class SmoothWeighted:
    """nginx's smooth weighted round-robin: over any window, each key is picked in proportion
    to its weight, and picks of one key are spread out rather than bunched (5,1,1 gives
    a a b a c a a, not a a a a a b c).

    A route lists up to every node of the fleet, and most calls pass the same list again (a
    route's eligible targets, remote.py): for that list the keys' currents are kept in its order
    and a pick is two loops in C (add the weights, find the first largest), not a Python loop of
    dict updates per key. Another list takes the currents of its keys over (``_adopt``). A list
    passed again is taken to be unchanged: callers pass a new list, or one nobody changes."""

    def __init__(self) -> None:
        self._current: dict[object, float] = {}  # every key's current, as of the last _adopt
        self._list: Sequence[tuple[object, int]] | None = None  # the list picked from last
        self._weights: list[int] = []
        self._cur: list[float] = []  # its keys' currents, in its order
        self._total = 0

    def pick(self, weighted: Sequence[tuple[object, int]]) -> object | None:
        i = self.pick_index(weighted)
        return None if i is None else weighted[i][0]

    def pick_index(self, weighted: Sequence[tuple[object, int]]) -> int | None:
        """The position in ``weighted`` of the key picked (None: the list is empty)."""
        if not weighted:
            return None
        if weighted is not self._list:
            self._adopt(weighted)
        cur = self._cur = list(map(operator.add, self._cur, self._weights))
        best = cur.index(max(cur))  # the first of the largest
        cur[best] -= self._total
        return best

    def _adopt(self, weighted: Sequence[tuple[object, int]]) -> None:
        current = self._current
        if self._list is not None:
            current.update(zip([key for key, _ in self._list], self._cur, strict=True))
        live = {key for key, _ in weighted}
        for key in live:
            current.setdefault(key, 0.0)  # a new key counts toward the rule below, as a pick adds it
        if len(current) > 2 * len(live):  # forget endpoints that left the route
            self._current = current = {k: v for k, v in current.items() if k in live}
        self._list = weighted
        self._weights = [weight for _, weight in weighted]
        self._total = sum(self._weights)
        self._cur = [current.get(key, 0.0) for key, _ in weighted]


class LeastLoaded:
    """Smooth weighted round-robin, corrected by load (power of two choices).

    The round-robin names a first choice, so that at rest the weights set each key's share
    exactly; a second key, drawn at random in proportion to weight, takes the request instead
    when it carries less load per unit of weight (requests in flight from this proxy / weight).
    A slow or overloaded key therefore sheds its share as soon as requests pile up on it,
    without waiting for its telemetry to lower its weight (seconds later), and a key with
    nothing in flight is never passed over for a busier one. As Envoy's least-request balancer,
    with a round-robin rather than a random first draw.
    """

    # Second draws that may land on the first choice before the others are drawn from directly
    # (one in most picks; more only when the first choice holds most of the weight).
    _REDRAWS = 8

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rr = SmoothWeighted()
        self._rng = rng or random.Random()
        self._cum_of: Sequence[tuple[object, int]] | None = None  # the list _cum was made for
        self._cum: list[int] = []

    def pick(self, weighted: Sequence[tuple[K, int]], load: Callable[[K], int]) -> K | None:
        i = self._rr.pick_index(weighted)
        if i is None:
            return None
        first, w_first = weighted[i]
        if len(weighted) == 1:
            return first
        second, w_second = self._second(weighted, i)
        # load/weight compared without a division: a lighter second choice takes the request.
        if load(second) * w_first < load(first) * w_second:
            return second
        return first

    def _second(self, weighted: Sequence[tuple[K, int]], first: int) -> tuple[K, int]:
        """A key other than the one at ``first``, drawn in proportion to weight: a draw over the
        whole list (bisect over its cumulative weights, kept while the list is the same), again
        if it names the first choice. The same distribution as drawing from the others alone,
        without a pass over them per pick."""
        if weighted is not self._cum_of:
            self._cum_of, self._cum = weighted, list(itertools.accumulate(w for _, w in weighted))
        cum, draw = self._cum, self._rng.random
        total = cum[-1]
        for _ in range(self._REDRAWS):
            j = bisect_right(cum, draw() * total, 0, len(cum) - 1)
            if j != first:
                return weighted[j]
        others = [kw for j, kw in enumerate(weighted) if j != first]
        return self._rng.choices(others, [w for _, w in others])[0]


def affine(session: str, keys: Sequence[tuple[K, int]], name: Callable[[K], str]) -> K | None:
    """The key a session sticks to: weighted rendezvous hashing, so a key leaving moves only
    its own sessions, and a new key takes its share from every other one alike."""
    best, best_score = None, -math.inf
    for key, weight in keys:
        if weight <= 0:
            continue
        digest = hashlib.blake2b(f"{session}\0{name(key)}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest) + 0.5) / 2.0**64  # uniform in (0, 1)
        score = -weight / math.log(u)
        if score > best_score:
            best, best_score = key, score
    return best
