"""Requests for on-demand models, as this node reports them to the leader.

The leader keeps an on-demand model's replicas while a request for it arrived somewhere within
``idle_unload_after_s`` (coordinator/policy/ondemand.py). Each agent says so in its node record,
``model_demand``: model -> the wall time of a request. One etcd write per request would be far
too many, so an entry is refreshed at most every ``idle_unload_after_s / 4`` per model; the
first request after an idle period (no entry) is a new entry, which the publish policy sends
at once (a state change: a client waits on a cold start). A refresh that is due goes out with
the next publish check (at the latest the next keep-alive), carrying the latest request's time,
so the leader sees a change no earlier than the last request: a replica is never unloaded
sooner than ``idle_unload_after_s`` after it.

An entry older than the idle time is dropped from the record (with the next write; dropping
alone is not worth one). The leader only asks whether an entry *changed*, on its own clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from gpufleet.keyspace.records import ModelRecord
from gpufleet.registry import on_demand


class DemandTracker:
    def __init__(self, registry: Callable[[], Mapping[str, ModelRecord]], poke: Callable[[], None]) -> None:
        self._registry = registry  # the registry as the agent mirrors it (ModelFollower.registry)
        self._poke = poke  # publish check now
        self._last: dict[str, tuple[float, float]] = {}  # model -> (wall, monotonic) of the last request
        self._shown: dict[str, tuple[float, float]] = {}  # model -> (wall, monotonic) in the record
        self._active: dict[str, int] = {}  # model -> requests for it in this proxy (held or running)

    def on_demand(self, model: str) -> ModelRecord | None:
        """The model's registration if it is scaled by demand."""
        rec = self._registry().get(model)
        return rec if rec is not None and on_demand(rec) else None

    def models(self) -> list[str]:
        """Every on-demand model registered (listed by /v1/models even with no replica)."""
        return sorted(n for n, rec in self._registry().items() if on_demand(rec))

    def begin(self, model: str) -> bool:
        """A request for ``model`` entered this proxy. While it is in it (held by a cold start,
        or streaming for longer than the idle time) the model stays wanted. True: it is on
        demand, and :meth:`end` must follow."""
        if self.on_demand(model) is None:
            return False
        self._active[model] = self._active.get(model, 0) + 1
        self.note(model)
        return True

    def end(self, model: str) -> None:
        left = self._active.get(model, 0) - 1
        if left > 0:
            self._active[model] = left
        else:
            self._active.pop(model, None)
        self.note(model)

    def note(self, model: str) -> None:
        """A request for ``model`` arrived here, or ended."""
        rec = self.on_demand(model)
        if rec is None:
            return
        now = (time.time(), time.monotonic())
        self._last[model] = now
        shown = self._shown.get(model)
        if shown is None or now[1] - shown[1] >= rec.idle_unload_after_s:
            self._shown[model] = now  # first after idle: the leader must hear it now
            self._poke()
        elif now[1] - shown[1] >= rec.idle_unload_after_s / 4:
            self._poke()

    def published(self) -> dict[str, float]:
        """``NodeRecord.model_demand`` now: refreshed entries, expired ones dropped."""
        mono = time.monotonic()
        registry = self._registry()
        for model in self._active:  # requests in the proxy: wanted now
            self._last[model] = (time.time(), mono)
        for model in list(self._last):
            rec = registry.get(model)
            last = self._last[model]
            if rec is None or not on_demand(rec) or mono - last[1] > rec.idle_unload_after_s:
                del self._last[model]
                self._shown.pop(model, None)
                continue
            shown = self._shown.get(model)
            if shown is None or (last[1] > shown[1] and mono - shown[1] >= rec.idle_unload_after_s / 4):
                self._shown[model] = last
        return {m: w for m, (w, _) in sorted(self._shown.items())}
