"""Which instance serves a request: pure functions over the instances' current state.

Least in-flight first among READY instances; ties rotate so equal instances share the load
(a plain "min" would pile every idle-time request onto the first one). Optional task routes send
requests with images or documents to their own instance groups, so a long document parse does
not block image requests (the OpenClaw multi-instance setup, docs/sources.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol, TypeVar

import msgspec

from agent.config import TaskRoute

Task = Literal["image", "document", "text"]


class Candidate(Protocol):
    @property
    def name(self) -> str: ...


C = TypeVar("C", bound=Candidate)


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
