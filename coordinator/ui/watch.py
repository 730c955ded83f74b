"""Keeps the dashboard's inputs current on this replica: I/O around view.py and events.py.

Reads the mirrors the leader loop already keeps on every replica (nodes, drains, route headers
and slices) and two of its own (``/state/degradation``, ``/state/placement``): one watch each,
of one key. Once a second it looks whether any of them moved; if so it takes an event snapshot
and diffs it with the last one, so events are recorded whether or not a page is open. The view
itself is built only when a page asks, at most once per change and second, whatever the number
of pages.

etcd's reachability is probed (a read of ``/leader``) only while a page has asked in the last
:data:`LOOKING_S`: the mirrors keep their last data when etcd goes away, so the page needs to be
told that what it shows is stale.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from gpufleet.etcd import EtcdError, KeyMirror, KeyValue
from gpufleet.keyspace import Keyspace, decode_or_skip
from gpufleet.keyspace.records import (
    DegradationRecord,
    DrainRecord,
    NodeRecord,
    PlacementRecord,
    RouteRecord,
    RouteSlice,
)
from gpufleet.routeslices import assemble

from ..leader import FORGET_DOWN_AFTER_S
from .events import Event, EventLog, Snapshot, diff, snapshot
from .view import FleetInputs, build_view

if TYPE_CHECKING:
    from ..daemon import CoordinatorRuntime

log = structlog.get_logger("coordinator.ui")

T = TypeVar("T")
LOOKING_S = 10.0  # a page polls every 1.5 s: one that has not asked for this long is gone
PROBE_TIMEOUT_S = 2.0


class FleetWatch:
    def __init__(self, rt: CoordinatorRuntime) -> None:
        self.rt = rt
        self.keys: Keyspace = rt.keys
        self.degradation = KeyMirror(rt.etcd, rt.keys.degradation)
        self.placement = KeyMirror(rt.etcd, rt.keys.placement)
        self.events = EventLog()
        self._decoded: dict[str, tuple[int, Any]] = {}  # key -> (mod revision, record or None)
        self._routes: dict[str, RouteRecord] = {}  # the last complete route of each model
        self._nodes_seen: dict[str, KeyValue] = {}  # the node keys at the last look
        self._gone: dict[str, tuple[NodeRecord, float]] = {}  # node -> (last record, when it went)
        self._looked_at: tuple[object, ...] | None = None
        self._snap: Snapshot | None = None
        self._view: tuple[tuple[object, ...], float, dict[str, Any]] | None = None
        self.asked_at = 0.0  # monotonic time a page last asked
        self.etcd_ok_at: float | None = None  # wall time of the last successful probe
        self.etcd_error: str | None = None

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with self.degradation, self.placement:
            while True:
                try:
                    self.look(time.time())
                    if time.monotonic() - self.asked_at < LOOKING_S:
                        await self.probe()
                except Exception as e:  # a bug here must not take the dashboard's events down for good
                    log.exception("dashboard pass failed", error=str(e))
                await asyncio.sleep(1.0)

    def _mirrors(self) -> tuple[KeyMirror, ...]:
        leader = self.rt.leader
        return (leader.nodes, leader.drains, *leader.routes.mirrors(), self.degradation, self.placement)

    def _state_key(self) -> tuple[object, ...]:
        """Changes whenever anything shown may have changed (the leader and policy included)."""
        el = self.rt.election
        return (
            *(m.revision for m in self._mirrors()),
            el.is_leader,
            el.leader,
            el.leader_epoch,
            el.epoch,
            self.rt.leader.policy_state.revision,
        )

    def look(self, now: float) -> None:
        """Take note of nodes that went and of events, if anything changed since the last look."""
        if not all(m.ready.is_set() for m in self._mirrors()):
            return  # a half-listed keyspace would show every node as new
        key = self._state_key()
        if key == self._looked_at:
            return
        self._looked_at = key
        self._track_gone(now)
        snap = snapshot(self.inputs())
        if self._snap is None:
            first = Event("replica", "info", f"{self.rt.cfg.id} started watching the fleet; events from here on")
            self.events.add([first], now)
        else:
            self.events.add(diff(self._snap, snap), now)
        self._snap = snap

    async def probe(self) -> None:
        try:
            await self.rt.etcd.get(self.keys.leader, timeout=PROBE_TIMEOUT_S)
        except (EtcdError, OSError, TimeoutError) as e:
            self.etcd_error = str(e) or type(e).__name__
            return
        self.etcd_ok_at, self.etcd_error = time.time(), None

    # --- what a page asks for ----------------------------------------------------------------

    def page(self, now: float) -> dict[str, Any]:
        """The view (rebuilt when something changed, at most once a second), the events, etcd."""
        self.asked_at = time.monotonic()
        self.look(now)  # the events as current as the view (the loop may look up to a second later)
        key = self._state_key()
        if self._view is None or self._view[0] != key or now - self._view[1] >= 1.0:
            self._view = (key, now, build_view(self.inputs(), now))
        synced = all(m.ready.is_set() for m in self._mirrors())
        return self._view[2] | {
            "events": self.events.recent(),
            "etcd": {"reachable": self.etcd_error is None, "error": self.etcd_error, "ok_at": self.etcd_ok_at},
            "synced": synced,
        }

    # --- inputs from the mirrors -------------------------------------------------------------

    def inputs(self) -> FleetInputs:
        el, leader = self.rt.election, self.rt.leader
        return FleetInputs(
            cluster=self.keys.cluster,
            replica=self.rt.cfg.id,
            is_leader=el.is_leader,
            leader=self.rt.cfg.id if el.is_leader else el.leader,
            epoch=el.epoch if el.is_leader else el.leader_epoch,
            nodes=self._node_records(),
            gone={n: rec for n, (rec, _) in self._gone.items()},
            routes=self._assembled_routes(),
            drains=self._drains(),
            degradation=self._single(self.degradation, self.keys.degradation, DegradationRecord),
            placement=self._single(self.placement, self.keys.placement, PlacementRecord),
            temp_limit_c=leader.policy_state.policy.health.temp_limit_c,
        )

    def _decode(self, kv: KeyValue, typ: type[T]) -> T | None:
        """Decoded once per key revision (a fleet's records change far less often than pages ask)."""
        hit = self._decoded.get(kv.key_str)
        if hit is not None and hit[0] == kv.mod_revision:
            return hit[1]  # type: ignore[no-any-return]
        rec = decode_or_skip(kv.key_str, kv.value, typ, kv.mod_revision)
        self._decoded[kv.key_str] = (kv.mod_revision, rec)
        return rec

    def _node_records(self) -> dict[str, NodeRecord]:
        out = {}
        for key, kv in self.rt.leader.nodes.data.items():
            rec = self._decode(kv, NodeRecord)
            if rec is not None and Keyspace.name_in(self.keys.nodes, key) == rec.node:
                out[rec.node] = rec
        return out

    def _drains(self) -> dict[str, DrainRecord]:
        out = {}
        for key, kv in self.rt.leader.drains.data.items():
            rec = self._decode(kv, DrainRecord)
            if rec is not None:
                out[Keyspace.name_in(self.keys.drains, key)] = rec
        return out

    def _single(self, mirror: KeyMirror, key: str, typ: type[T]) -> T | None:
        kv = mirror.data.get(key)
        return self._decode(kv, typ) if kv is not None else None

    def _assembled_routes(self) -> dict[str, RouteRecord]:
        """Headers and slices put together (gpufleet/routeslices.py); a route that is incomplete
        right now (a rewrite in flight) stays as last seen complete."""
        headers_m, slices_m = self.rt.leader.routes.mirrors()
        slices: dict[str, dict[int, RouteSlice]] = {}
        for key, kv in slices_m.data.items():
            where = self.keys.slice_of(key)
            s = self._decode(kv, RouteSlice) if where else None
            if where is not None and s is not None:
                slices.setdefault(where[0], {})[where[1]] = s
        routes: dict[str, RouteRecord] = {}
        for key, kv in headers_m.data.items():
            header = self._decode(kv, RouteRecord)
            if header is None:
                continue
            model = Keyspace.name_in(self.keys.routes, key)
            rec = assemble(header, slices.get(model, {})) or self._routes.get(model) or header
            routes[model] = rec
        self._routes = routes
        self._trim_decoded()
        return routes

    def _trim_decoded(self) -> None:
        live = sum(len(m.data) for m in self._mirrors())
        if len(self._decoded) > 2 * live + 100:
            keys = {k for m in self._mirrors() for k in m.data}
            self._decoded = {k: v for k, v in self._decoded.items() if k in keys}

    def _track_gone(self, now: float) -> None:
        """Keep the last record of a node whose key went (its lease expired), to show it DOWN
        with what it had, until the leader forgets such a node."""
        data = self.rt.leader.nodes.data
        for key in self._nodes_seen.keys() - data.keys():
            rec = self._decode(self._nodes_seen[key], NodeRecord)
            if rec is not None:
                self._gone[rec.node] = (rec, now)
        for key in data:
            self._gone.pop(Keyspace.name_in(self.keys.nodes, key), None)
        for node in [n for n, (_, at) in self._gone.items() if now - at > FORGET_DOWN_AFTER_S]:
            del self._gone[node]
        self._nodes_seen = dict(data)
