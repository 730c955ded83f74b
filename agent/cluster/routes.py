"""The agent's copy of the cluster's route table (and of its drain flag and the degradation level).

Mirrored from etcd with list-then-watch, decoded once per change. When etcd or the
coordinator goes away the mirror keeps the last table: the data plane outlives the control
plane. A record that fails to decode is skipped (and logged once) and the previous good one
for that model is kept.

What is watched (docs/architecture.md, "Routes in slices"): every model's *header* (a few
hundred bytes; it changes when an endpoint's state or the slice list changes, not on weights),
and the *slices* (the endpoints and their weights) only of the models this node may forward:
those it serves itself (it fails over to other nodes) and those requested through it in the
last ``route_watch_idle_s``, at most ``route_watch_max_models`` of the latter (least recently
used dropped first). A node that never forwards a model never receives that model's weight
changes. The first request for a model not followed yet waits for one etcd list of its slices.
Of a model with more than ``route_subset_slices`` slices, only a deterministic subset of that
many is followed, and all of them while the subset has nothing to forward to (subset.py).

A model's route is assembled from its header and slices only when they agree
(gpufleet/routeslices.py), after a whole etcd transaction has been applied (``Put.last``):
until then the previous route stays, so a proxy never sees a model without endpoints during a
rewrite, nor two leaders' tables mixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import structlog

from gpufleet.etcd import Change, Delete, EtcdClient, KeyMirror, Put, Snapshot
from gpufleet.keyspace import Keyspace, decode_or_skip
from gpufleet.keyspace.records import DegradationRecord, DrainRecord, RouteRecord, RouteSlice
from gpufleet.routeslices import assemble, decode_slice
from gpufleet.tasks import Flag, cancel_and_wait

from .subset import subset_window, usable, window_runs

log = structlog.get_logger("agent.routes")

SWEEP_INTERVAL_S = 30.0  # how often idle slice watches are dropped and pinned ones started


class WatchSettings(NamedTuple):
    """What ``[cluster]`` says about following route slices (agent/config.py's ClusterSection
    has the same fields)."""

    route_watch_idle_s: float = 600.0
    route_watch_max_models: int = 256
    route_fetch_timeout_s: float = 5.0
    route_subset_slices: int = 4


class _Span(NamedTuple):
    """What of a model's slices is followed: the numbers (None: all of them) and the etcd key
    ranges that hold them, one per run of consecutive slices (a prefix and no end: all)."""

    window: tuple[int, ...] | None
    ranges: tuple[tuple[str, str | None], ...]


class _SliceWatch:
    """One model's slices (all, or those of its span's window), decoded, with the route last
    assembled from them."""

    def __init__(
        self, etcd: EtcdClient, keys: Keyspace, model: str, span: _Span, on_batch: Callable[[str], None]
    ) -> None:
        self.model = model
        self.keys = keys
        self.span = span
        self.used = time.monotonic()
        self.assembled = asyncio.Event()  # set once a complete route was assembled
        self._on_batch = on_batch
        self.mirrors = [
            KeyMirror(etcd, start, range_end=end, on_change=self._change_handler(i))
            for i, (start, end) in enumerate(span.ranges)
        ]
        self._parts: list[dict[int, RouteSlice]] = [{} for _ in self.mirrors]  # one per mirror

    @property
    def window(self) -> tuple[int, ...] | None:
        return self.span.window

    @property
    def slices(self) -> dict[int, RouteSlice]:
        if len(self._parts) == 1:
            return self._parts[0]
        return {n: s for part in self._parts for n, s in part.items()}

    def start(self) -> None:
        for m in self.mirrors:
            m.start()

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.mirrors))

    def _change_handler(self, i: int) -> Callable[[Change], None]:
        return lambda change: self._on_change(i, change)

    def _on_change(self, i: int, change: Change) -> None:
        part = self._parts[i]
        if isinstance(change, Snapshot):
            fresh = {}
            for kv in change.kvs:
                rec = decode_slice(self.keys, kv.key_str, kv.value, kv.mod_revision)
                if rec is not None:
                    fresh[rec.slice] = rec
                elif (where := self.keys.slice_of(kv.key_str)) is not None and where[1] in part:
                    fresh[where[1]] = part[where[1]]  # keep the last good one
            self._parts[i] = fresh
        elif isinstance(change, Put):
            rec = decode_slice(self.keys, change.kv.key_str, change.kv.value, change.kv.mod_revision)
            if rec is not None:
                part[rec.slice] = rec
        elif isinstance(change, Delete):
            where = self.keys.slice_of(change.key_str)
            if where is not None:
                part.pop(where[1], None)
        if isinstance(change, Snapshot) or change.last:
            self._on_batch(self.model)


class RouteTable:
    def __init__(
        self,
        etcd: EtcdClient,
        keys: Keyspace,
        node_id: str,
        on_rewound: Callable[[], None] | None = None,
        *,
        pinned: Callable[[], Iterable[str]] = frozenset,
        settings: Callable[[], WatchSettings] = WatchSettings,
        classes: Callable[[], Iterable[str]] = frozenset,
    ) -> None:
        self.keys = keys
        self._etcd = etcd
        # Called when etcd's history went backwards (restored or wiped): the node's own record
        # there may be an old one (see ClusterPublisher.republish).
        self._on_rewound = on_rewound
        self.node_id = node_id
        self.headers: dict[str, RouteRecord] = {}  # every model's header
        self.routes: dict[str, RouteRecord] = {}  # assembled, for the models followed
        self.drained = False
        self._pinned = pinned  # models served here: always followed
        self._settings = settings  # read live: a reload applies at once
        self._classes = classes  # this node's GPU classes (whom its proxy forwards to first)
        self._watches: dict[str, _SliceWatch] = {}
        # model -> when (monotonic) its subset was widened to every slice (subset.py)
        self._widened: dict[str, float] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._headers = KeyMirror(etcd, keys.routes, on_change=self._on_header)
        self._drain_key = keys.drain(node_id)
        self._drains = KeyMirror(etcd, keys.drains, on_change=self._on_drain)
        # node -> set when the node is DOWN in the routes or has left them (see node_gone)
        self._gone: dict[str, Flag] = {}
        # Called with a model's name when its header or route changed (a cold start waits on it).
        self.on_route: Callable[[str], None] | None = None
        self.degradation: DegradationRecord | None = None
        # When this agent last saw the degradation record change (monotonic): its freshness,
        # measured without comparing the leader's clock with ours.
        self.degradation_seen_at = 0.0
        self._degradation_revision = 0
        self._degradation = KeyMirror(etcd, keys.degradation, on_change=self._on_degradation)

    def start(self) -> None:
        self._headers.start()
        self._drains.start()
        self._degradation.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="route-watch-sweeper")

    async def stop(self) -> None:
        await cancel_and_wait(self._sweeper)
        await self._headers.stop()
        await self._drains.stop()
        await self._degradation.stop()
        watches, self._watches = self._watches, {}
        await asyncio.gather(*(w.stop() for w in watches.values()), *self._stopping)

    def route(self, model: str) -> RouteRecord | None:
        return self.routes.get(model)

    async def want(self, model: str) -> None:
        """Follow ``model``'s slices if it has a sliced route and they are not followed yet,
        and wait (at most ``fetch_timeout_s``) for its first complete route. Marks it used."""
        if not self._headers.ready.is_set():  # just started: the headers are being listed
            with contextlib.suppress(TimeoutError):
                await self._headers.wait_ready(self._settings().route_fetch_timeout_s)
        header = self.headers.get(model)
        if header is None or not header.slices:
            return
        w = self._watches.get(model) or self._follow(model)
        w.used = time.monotonic()
        if model not in self.routes:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings().route_fetch_timeout_s):
                    await w.assembled.wait()

    def want_now(self, model: str) -> bool:
        """``want`` when it would not wait: True (marked used); False, nothing done."""
        if not self._headers.ready.is_set():
            return False
        header = self.headers.get(model)
        if header is None or not header.slices:
            return True
        w = self._watches.get(model)
        if w is None or model not in self.routes:
            return False
        w.used = time.monotonic()
        return True

    def followed(self) -> set[str]:
        """Models whose slices are followed now."""
        return set(self._watches)

    def window(self, model: str) -> tuple[int, ...] | None:
        """The slice numbers of ``model`` followed (None: all of them, or not followed)."""
        w = self._watches.get(model)
        return w.window if w is not None else None

    def node_count(self, also: str = "") -> int:
        """Nodes listed in the routes (and ``also``), from above: the distinct nodes of the
        routes assembled here, plus each other route's node count from its header (a node that
        serves two of those is counted twice). Key limits divide by it until the leader's
        division arrives, so too many only makes this node's share smaller: fail closed."""
        whole = {m: rec for m, rec in self.routes.items() if self.window(m) is None}  # not a subset
        listed = {e.node for rec in whole.values() for e in rec.endpoints}
        if also:
            listed.add(also)
        return len(listed) + sum(h.nodes for m, h in self.headers.items() if m not in whole)

    def _span(self, model: str) -> _Span:
        """What of ``model``'s slices to follow now: its subset, or all of them (widened, or no
        more slices than the subset's size)."""
        slices = self.headers[model].slices
        window = None
        if model not in self._widened:
            window = subset_window(self.node_id, model, slices, self._settings().route_subset_slices)
        if window is None:
            return _Span(None, ((self.keys.model_slices(model), None),))
        runs = window_runs(window, slices)
        return _Span(window, tuple(self.keys.slice_range(model, first, last) for first, last in runs))

    def _watch(self, model: str) -> _SliceWatch:
        """A watch of ``model``'s slices, or of its subset of them (not started)."""
        return _SliceWatch(self._etcd, self.keys, model, self._span(model), self._assemble)

    def _follow(self, model: str) -> _SliceWatch:
        w = self._watches[model] = self._watch(model)
        w.start()
        log.debug("following a model's route slices", model=model, window=w.window, followed=len(self._watches))
        pinned = set(self._pinned())
        on_demand = [m for m in self._watches if m not in pinned]
        if len(on_demand) > self._settings().route_watch_max_models:
            lru = min(on_demand, key=lambda m: self._watches[m].used)
            self._unfollow(lru, "more models than route_watch_max_models")
        return w

    def _unfollow(self, model: str, why: str) -> None:
        w = self._watches.pop(model, None)
        if w is None:
            return
        if self.headers.get(model) is None or self.headers[model].slices:
            self.routes.pop(model, None)
        self._widened.pop(model, None)
        self._stop_later(w)
        log.debug("no longer following a model's route slices", model=model, reason=why)

    def _stop_later(self, w: _SliceWatch) -> None:
        task = asyncio.create_task(w.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _rewindow(self, model: str, why: str) -> None:
        """Follow the slices ``model`` should be followed by now (its header's slice list
        changed, or the subset was widened or narrowed), if they differ from those followed. The
        route assembled so far stays until the new watch assembles one."""
        old = self._watches.get(model)
        if old is None or model not in self.headers:
            return
        span = self._span(model)
        if span == old.span:
            return
        new = _SliceWatch(self._etcd, self.keys, model, span, self._assemble)
        new.used = old.used
        self._watches[model] = new
        new.start()
        self._stop_later(old)
        log.info("route slices followed changed", model=model, window=new.window, reason=why)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL_S, self._settings().route_watch_idle_s / 4))
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Drop the watches of models not served here and unused for ``watch_idle_s``; follow
        the models served here."""
        pinned = set(self._pinned())
        idle_s = self._settings().route_watch_idle_s
        for model, w in list(self._watches.items()):
            if model not in pinned and now - w.used > idle_s:
                self._unfollow(model, "idle")
        self._follow_pinned(pinned)
        for model in list(self._widened):
            self._maybe_narrow(model)

    def _maybe_narrow(self, model: str) -> None:
        """Back to the subset once the subset's part of the whole route can serve again."""
        header, w = self.headers.get(model), self._watches.get(model)
        if header is None or w is None or w.window is not None:
            return
        window = subset_window(self.node_id, model, header.slices, self._settings().route_subset_slices)
        part = assemble(header, w.slices, only=window) if window is not None else None
        if window is None or (part is not None and usable(part, header, set(self._classes()), self.node_id)):
            del self._widened[model]
            self._rewindow(model, "the subset has endpoints to forward to again")

    def _follow_pinned(self, pinned: set[str]) -> None:
        for model in pinned:
            h = self.headers.get(model)
            if h is not None and h.slices and model not in self._watches:
                self._follow(model)

    def _assemble(self, model: str) -> None:
        """Put ``model``'s route together from its header and slices, if they agree; else keep
        the route it had."""
        header = self.headers.get(model)
        w = self._watches.get(model)
        if header is None or (header.slices and w is None):
            self.routes.pop(model, None)
        else:
            rec = assemble(header, w.slices if w is not None else {}, only=w.window if w is not None else None)
            if rec is not None:
                self.routes[model] = rec
                if w is not None:
                    w.assembled.set()
                    if w.window is not None and not usable(rec, header, set(self._classes()), self.node_id):
                        self._widened[model] = time.monotonic()
                        self._rewindow(model, "the subset has no endpoint to forward to")
        self._update_gone()
        if self.on_route is not None:
            self.on_route(model)

    def node_gone(self, node: str) -> Flag:
        """An event set once ``node`` is DOWN in the routes (its lease ran out) or has left them.

        The proxy abandons an attempt on that node that has not answered yet and retries it
        elsewhere: behind a silent partition nothing else would end it before the total deadline.
        """
        flag = self._gone.get(node)
        if flag is None:
            flag = self._gone[node] = Flag()
        return flag

    def _update_gone(self) -> None:
        if not self._gone:
            return
        listed: set[str] = set()
        down: set[str] = set()
        for rec in self.routes.values():
            for e in rec.endpoints:
                listed.add(e.node)
                if e.state == "DOWN":
                    down.add(e.node)
        for node, ev in list(self._gone.items()):
            if node in down or node not in listed:
                ev.set()
                if node not in listed:
                    del self._gone[node]  # watchers keep their reference; a later ask starts afresh
            elif ev.is_set():
                self._gone[node] = Flag()  # back: new attempts watch a fresh one

    def _on_header(self, change: Change) -> None:
        if isinstance(change, Snapshot):
            if change.rewound and self._on_rewound is not None:
                self._on_rewound()
            fresh = {}
            for kv in change.kvs:
                rec = decode_or_skip(kv.key_str, kv.value, RouteRecord, kv.mod_revision)
                model = Keyspace.name_in(self.keys.routes, kv.key_str)
                if rec is not None:
                    fresh[model] = rec
                elif model in self.headers:
                    fresh[model] = self.headers[model]  # keep the last good one
            changed = self.headers.keys() | fresh.keys()
            self.headers = fresh
        elif isinstance(change, Put):
            rec = decode_or_skip(change.kv.key_str, change.kv.value, RouteRecord, change.kv.mod_revision)
            if rec is None:
                return
            model = Keyspace.name_in(self.keys.routes, change.kv.key_str)
            self.headers[model] = rec
            changed = {model}
        else:
            model = Keyspace.name_in(self.keys.routes, change.key_str)
            self.headers.pop(model, None)
            changed = {model}
        for model in changed:
            if model not in self.headers:
                self._unfollow(model, "route removed")
            else:
                self._rewindow(model, "the model's slices changed")
            self._assemble(model)
        self._follow_pinned(set(self._pinned()))

    def _on_drain(self, change: Change) -> None:
        kvs = self._drains.data
        kv = kvs.get(self._drain_key)
        drained = kv is not None and decode_or_skip(kv.key_str, kv.value, DrainRecord, kv.mod_revision) is not None
        if drained != self.drained:
            log.warning("node drained by an operator" if drained else "node undrained", node=self.node_id)
            self.drained = drained

    def _on_degradation(self, change: Change) -> None:
        key = self.keys.degradation
        kv = self._degradation.data.get(key)
        if kv is None:
            rec = None
        else:
            rec = decode_or_skip(key, kv.value, DegradationRecord, kv.mod_revision)
            if rec is None:
                return  # keep the last good level
        before = self.degradation.level if self.degradation else 0
        after = rec.level if rec else 0
        self.degradation = rec
        if kv is not None and kv.mod_revision != self._degradation_revision:  # not a relist of the same
            self._degradation_revision = kv.mod_revision
            self.degradation_seen_at = time.monotonic()
        if before != after:
            log.warning(
                "degradation level changed",
                level_from=before,
                level_to=after,
                error_rate=rec.error_rate if rec else None,
                samples=rec.samples if rec else None,
            )
