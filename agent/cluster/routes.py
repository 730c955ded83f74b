"""The agent's copy of the cluster's route table (and of its drain flag and the degradation level).

Mirrored from etcd with list-then-watch, decoded once per change. When etcd or the
coordinator goes away the mirror keeps the last table: the data plane outlives the control
plane. A record that fails to decode is skipped (and logged once) and the previous good one
for that model is kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from gpufleet.etcd import Change, Delete, EtcdClient, KeyMirror, Put, Snapshot
from gpufleet.keyspace import Keyspace, decode_or_skip
from gpufleet.keyspace.records import DegradationRecord, DrainRecord, RouteRecord

log = structlog.get_logger("agent.routes")


class RouteTable:
    def __init__(
        self, etcd: EtcdClient, keys: Keyspace, node_id: str, on_rewound: Callable[[], None] | None = None
    ) -> None:
        self.keys = keys
        # Called when etcd's history went backwards (restored or wiped): the node's own record
        # there may be an old one (see ClusterPublisher.republish).
        self._on_rewound = on_rewound
        self.node_id = node_id
        self.routes: dict[str, RouteRecord] = {}
        self.drained = False
        self._routes = KeyMirror(etcd, keys.routes, on_change=self._on_route)
        self._drain_key = keys.drain(node_id)
        self._drains = KeyMirror(etcd, keys.drains, on_change=self._on_drain)
        # node -> set when the node is DOWN in the routes or has left them (see node_gone)
        self._gone: dict[str, asyncio.Event] = {}
        self.degradation: DegradationRecord | None = None
        # When this agent last saw the degradation record change (monotonic): its freshness,
        # measured without comparing the leader's clock with ours.
        self.degradation_seen_at = 0.0
        self._degradation_revision = 0
        self._degradation = KeyMirror(etcd, keys.degradation, on_change=self._on_degradation)

    def start(self) -> None:
        self._routes.start()
        self._drains.start()
        self._degradation.start()

    async def stop(self) -> None:
        await self._routes.stop()
        await self._drains.stop()
        await self._degradation.stop()

    def route(self, model: str) -> RouteRecord | None:
        return self.routes.get(model)

    def node_gone(self, node: str) -> asyncio.Event:
        """An event set once ``node`` is DOWN in the routes (its lease ran out) or has left them.

        The proxy abandons an attempt on that node that has not answered yet and retries it
        elsewhere: behind a silent partition nothing else would end it before the total deadline.
        """
        ev = self._gone.get(node)
        if ev is None:
            ev = self._gone[node] = asyncio.Event()
        return ev

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
                    del self._gone[node]  # waiters keep their reference; a later ask starts afresh
            elif ev.is_set():
                self._gone[node] = asyncio.Event()  # back: new attempts wait on a fresh one

    def _on_route(self, change: Change) -> None:
        if isinstance(change, Snapshot):
            if change.rewound and self._on_rewound is not None:
                self._on_rewound()
            fresh = {}
            for kv in change.kvs:
                rec = decode_or_skip(kv.key_str, kv.value, RouteRecord, kv.mod_revision)
                model = Keyspace.name_in(self.keys.routes, kv.key_str)
                if rec is not None:
                    fresh[model] = rec
                elif model in self.routes:
                    fresh[model] = self.routes[model]
            self.routes = fresh
        elif isinstance(change, Put):
            rec = decode_or_skip(change.kv.key_str, change.kv.value, RouteRecord, change.kv.mod_revision)
            if rec is not None:
                self.routes[Keyspace.name_in(self.keys.routes, change.kv.key_str)] = rec
        elif isinstance(change, Delete):
            self.routes.pop(Keyspace.name_in(self.keys.routes, change.key_str), None)
        self._update_gone()

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
