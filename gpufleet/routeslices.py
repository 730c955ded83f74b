"""Routes in slices: how a model's header and its slices become one route, for every reader.

A model's route in etcd is a small header (``/routes/<model>``, :class:`RouteRecord` with
``slices``) and its endpoints in slices of at most 100 (``/routeslices/<model>/@<n>``,
:class:`RouteSlice`): Kubernetes' EndpointSlices, for the same reason. One value holding every
endpoint (473 KB for 4,000 endpoints) is rewritten and sent to every watcher whenever one
weight moves, which is O(nodes²) watch traffic for the fleet; a slice is rewritten only when
one of *its* endpoints changes. The leader cuts routes into slices
(coordinator/policy/slicing.py); this module puts them back together, the one rule every
reader (agents, gpuctl, tests, benchmarks) shares:

- A header and its slices are read together only when every slice it lists is there *and* was
  written in the header's epoch. Otherwise the route is incomplete (a new leader is rewriting
  it, or a slice has not arrived yet on its watch) and a reader keeps what it had: it never
  sees a model with no endpoints during a rewrite, nor one leader's weights mixed with
  another's.
- An endpoint present in two slices (moved between them by writes in two transactions) is
  listed once.
- A header without ``slices`` is a schema-1 record that holds its endpoints itself.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from itertools import chain

import msgspec
import structlog

from gpufleet.etcd import EtcdClient
from gpufleet.etcd.messages import prefix_range_end
from gpufleet.keyspace import Keyspace, decode_or_skip
from gpufleet.keyspace.records import RouteEndpoint, RouteRecord, RouteSlice

__all__ = [
    "RouteAssembly",
    "assemble",
    "decode_slice",
    "has_ready",
    "read_routes",
    "ready_classes",
    "ready_endpoints",
]

log = structlog.get_logger("gpufleet.routes")


def decode_slice(keys: Keyspace, key: str, value: bytes, mod_revision: int = 0) -> RouteSlice | None:
    """The slice stored at ``key``; None (logged) when the key is not a slice's, the value does
    not decode, or its model and number are not those of its key (a hand-edited value): the
    leader and every reader skip the same records."""
    where = keys.slice_of(key)
    rec = decode_or_skip(key, value, RouteSlice, mod_revision) if where is not None else None
    if rec is None or where == (rec.model, rec.slice):
        return rec
    log.warning("route slice's content does not match its key; skipped", key=key, mod_revision=mod_revision)
    return None


def assemble(
    header: RouteRecord, slices: Mapping[int, RouteSlice], only: Collection[int] | None = None
) -> RouteRecord | None:
    """The model's route with every endpoint, or None while incomplete (see the module doc).

    With ``only`` (an agent's subset of the slices, agent/cluster/subset.py): the endpoints of
    the header's slices among those numbers, under the same rule."""
    if not header.slices:
        return header
    parts = []
    for n in header.slices if only is None else [n for n in header.slices if n in only]:
        s = slices.get(n)
        if s is None or s.epoch != header.epoch:
            return None
        parts.append(s.endpoints)
    if not parts:  # a subset none of whose slices the header lists (a stale window)
        return None
    if len(parts) == 1:
        endpoints = parts[0]
    else:
        endpoints = list(chain.from_iterable(parts))
        if _in_two_slices(parts):  # rare: a node moved by writes in two transactions
            endpoints = _once(endpoints)
    return msgspec.structs.replace(header, endpoints=endpoints)


def _in_two_slices(parts: list[list[RouteEndpoint]]) -> bool:
    """Whether a node is listed by more than one slice (a node's endpoints share one slice):
    one set per slice, 6x cheaper than checking every endpoint, and agents assemble a route on
    every slice write."""
    seen: set[str] = set()
    total = 0
    for p in parts:
        nodes = {e.node for e in p}
        total += len(nodes)
        seen |= nodes
    return len(seen) != total


def _once(endpoints: list[RouteEndpoint]) -> list[RouteEndpoint]:
    seen: set[tuple[str, str]] = set()
    out = []
    for e in endpoints:
        k = (e.node, e.instance)
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out


def ready_endpoints(endpoints: list[RouteEndpoint]) -> int:
    """Endpoints that may receive traffic: READY with a weight."""
    return sum(1 for e in endpoints if e.state == "READY" and e.weight > 0)


def ready_classes(endpoints: list[RouteEndpoint]) -> dict[str, int]:
    """GPU class -> its endpoints that may receive traffic (classes with none left out)."""
    out: dict[str, int] = {}
    for e in endpoints:
        if e.state == "READY" and e.weight > 0:
            out[e.gpu_class] = out.get(e.gpu_class, 0) + 1
    return out


def has_ready(header: RouteRecord) -> bool:
    """Whether the model has an endpoint that may receive traffic, from its header alone."""
    return header.ready_endpoints > 0 if header.slices else ready_endpoints(header.endpoints) > 0


async def read_routes(etcd: EtcdClient, keys: Keyspace) -> dict[str, RouteRecord]:
    """Every model's assembled route, read at one revision (for gpuctl and tests; the agents
    and the leader keep mirrors instead). An incomplete route, which one consistent read only
    sees if a leader died between the transactions of a rewrite, is returned as its header,
    without endpoints; a bad record is skipped and logged."""
    routes = await read_route_records(etcd, keys)
    return {model: routes.assemble(model) or header for model, header in routes.headers.items()}


async def read_route_records(etcd: EtcdClient, keys: Keyspace) -> RouteAssembly:
    """Every header and slice, read at one revision."""
    first = await etcd.get_prefix(keys.routes)
    rest = await etcd.range(keys.route_slices, prefix_range_end(keys.route_slices), revision=first.revision)
    routes = RouteAssembly(keys)
    for kv in [*first.kvs, *rest.kvs]:
        routes.put(kv.key_str, kv.value, kv.mod_revision)
    return routes


class RouteAssembly:
    """Routes put together from the puts and deletes of headers and slices, as a watch of the
    cluster's keys delivers them (for tools and tests that follow the route table; the agent's
    RouteTable adds choosing which models to follow). Keeps the last complete route of each
    model while a rewrite is in flight; bad records are skipped and logged."""

    def __init__(self, keys: Keyspace) -> None:
        self.keys = keys
        self.headers: dict[str, RouteRecord] = {}
        self.slices: dict[str, dict[int, RouteSlice]] = {}
        self.routes: dict[str, RouteRecord] = {}

    def model_of(self, key: str) -> str | None:
        """The model a header or slice key belongs to; None for any other key."""
        if key.startswith(self.keys.routes):
            return Keyspace.name_in(self.keys.routes, key)
        where = self.keys.slice_of(key)
        return where[0] if where else None

    def put(self, key: str, value: bytes, mod_revision: int = 0) -> str | None:
        """Apply a put; the model it concerns (None: not a route key, or a bad record)."""
        if key.startswith(self.keys.routes):
            header = decode_or_skip(key, value, RouteRecord, mod_revision)
            if header is None:
                return None
            model = Keyspace.name_in(self.keys.routes, key)
            self.headers[model] = header
            return model
        s = decode_slice(self.keys, key, value, mod_revision)
        if s is None:
            return None
        self.slices.setdefault(s.model, {})[s.slice] = s
        return s.model

    def delete(self, key: str) -> str | None:
        if key.startswith(self.keys.routes):
            model = Keyspace.name_in(self.keys.routes, key)
            self.headers.pop(model, None)
            return model
        where = self.keys.slice_of(key)
        if where is None:
            return None
        self.slices.get(where[0], {}).pop(where[1], None)
        return where[0]

    def assemble(self, model: str) -> RouteRecord | None:
        """Bring ``model``'s route up to date (call once a transaction's changes are applied)."""
        header = self.headers.get(model)
        if header is None:
            self.routes.pop(model, None)
            return None
        rec = assemble(header, self.slices.get(model, {}))
        if rec is not None:
            self.routes[model] = rec
        return self.routes.get(model)

    def slice_numbers(self, model: str) -> dict[tuple[str, str], int]:
        """(node, instance) -> the slice that lists it, for ``model`` (what `gpuctl routes` shows)."""
        return {(e.node, e.instance): n for n, s in self.slices.get(model, {}).items() for e in s.endpoints}
