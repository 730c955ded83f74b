"""Which instance serves a request: pure functions over the instances' current state.

Least in-flight first among READY instances; ties rotate so equal instances share the load
(a plain "min" would pile every idle-time request onto the first one). Optional task routes send
requests with images or documents to their own instance groups, so a long document parse does
not block image requests (the OpenClaw multi-instance setup, docs/sources.md).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Literal, Protocol, TypeVar

import msgspec

from agent.config import TaskRoute

Task = Literal["image", "document", "text"]


class Candidate(Protocol):
    @property
    def name(self) -> str: ...


C = TypeVar("C", bound=Candidate)
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
    a a b a c a a, not a a a a a b c)."""

    def __init__(self) -> None:
        self._current: dict[object, float] = {}

    def pick(self, weighted: Sequence[tuple[object, int]]) -> object | None:
        if not weighted:
            return None
        total = 0
        best: object | None = None
        best_cur = float("-inf")
        live = set()
        for key, weight in weighted:
            live.add(key)
            cur = self._current.get(key, 0.0) + weight
            self._current[key] = cur
            total += weight
            if cur > best_cur:
                best, best_cur = key, cur
        self._current[best] -= total
        if len(self._current) > 2 * len(live):  # forget endpoints that left the route
            self._current = {k: v for k, v in self._current.items() if k in live}
        return best


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

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rr = SmoothWeighted()
        self._rng = rng or random.Random()

    def pick(self, weighted: Sequence[tuple[K, int]], load: Callable[[K], int]) -> K | None:
        first = self._rr.pick(weighted)
        if first is None or len(weighted) == 1:
            return first  # type: ignore[return-value]
        others = [(k, w) for k, w in weighted if k is not first]
        second = self._rng.choices([k for k, _ in others], [w for _, w in others])[0]
        w_first = next(w for k, w in weighted if k is first)
        w_second = next(w for k, w in others if k is second)
        # load/weight compared without a division: a lighter second choice takes the request.
        if load(second) * w_first < load(first) * w_second:  # type: ignore[arg-type]
            return second
        return first  # type: ignore[return-value]


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
