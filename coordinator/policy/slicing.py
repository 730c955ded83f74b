"""Cutting a route into slices, and what a pass must write (the leader's side of
gpufleet/routeslices.py, which has the why and the readers' rule).

Stable membership, as Kubernetes' EndpointSlice controller keeps it: a node's endpoints of a
model stay together in the slice they were first put in while it has room, so a change on one
node (its GPU crossing 85 °C, an instance going DOWN) rewrites that one slice. New nodes go to
the lowest-numbered slice with room, else to a new slice. When departures have left the slices
more than half empty, the model is laid out afresh (every slice rewritten once) rather than
carrying on fragmented.

What to write: a slice whose endpoints changed *urgently* (an endpoint's state, address or
membership, a weight to or from 0 or by more than ``urgent_weight_change`` of itself) at once; a
slice whose weights only *drifted* (by more than ``min_weight_change``, at most the urgent share)
only when the caller says its drift is due (``weight_drift_interval_s`` after its last write),
since across a fleet every slice drifts all the time; the header when anything readers check
in it changed (epoch, slice list, classes, counts); deletes for slices no longer listed.
Order: slices that gain endpoints, then the other slices, then the header, then deletes; a
reader applying the writes of a split rewrite one transaction at a time then sees an endpoint
that moved twice (listed once) rather than not at all, and the header only once the slices it
lists exist.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from gpufleet.keyspace.records import RouteEndpoint, RouteRecord, RouteSlice
from gpufleet.routeslices import ready_classes, ready_endpoints

from .routes import endpoints_differ


class SliceLimits(NamedTuple):
    endpoints: int = 100  # as Kubernetes' EndpointSlices
    bytes: int = 32 * 1024  # a slice's JSON, estimated (endpoint_size) from above


DEFAULT_SLICE_LIMITS = SliceLimits()

# The JSON of an endpoint besides its four strings: field names, quotes, weight, state.
_ENDPOINT_OVERHEAD = 100


def endpoint_size(e: RouteEndpoint) -> int:
    """An upper bound of the endpoint's bytes in a slice's JSON (names are ASCII)."""
    return _ENDPOINT_OVERHEAD + len(e.node) + len(e.address) + len(e.instance) + len(e.gpu_class)


@dataclass
class _Fill:
    endpoints: list[RouteEndpoint] = field(default_factory=list)
    size: int = 0

    def fits(self, eps: list[RouteEndpoint], size: int, limits: SliceLimits) -> bool:
        return not self.endpoints or (
            len(self.endpoints) + len(eps) <= limits.endpoints and self.size + size <= limits.bytes
        )

    def add(self, eps: list[RouteEndpoint], size: int) -> None:
        self.endpoints.extend(eps)
        self.size += size


def layout(
    endpoints: list[RouteEndpoint], previous: Mapping[str, int], limits: SliceLimits = DEFAULT_SLICE_LIMITS
) -> dict[int, list[RouteEndpoint]]:
    """Slice number -> its endpoints. ``previous``: node -> the slice it is in now."""
    groups: dict[str, list[RouteEndpoint]] = {}
    for e in endpoints:
        groups.setdefault(e.node, []).append(e)
    sizes = {node: sum(endpoint_size(e) for e in eps) for node, eps in groups.items()}
    fills: dict[int, _Fill] = {}
    homeless = []
    for node, eps in groups.items():
        n = previous.get(node)
        fill = fills.setdefault(n, _Fill()) if n is not None else None
        if fill is not None and fill.fits(eps, sizes[node], limits):
            fill.add(eps, sizes[node])
        else:
            homeless.append(node)
    fills = {n: f for n, f in fills.items() if f.endpoints}
    if _fragmented(len(fills), len(endpoints), limits):
        fills, homeless = {}, list(groups)
    _place(homeless, groups, sizes, fills, limits)
    return {n: fills[n].endpoints for n in sorted(fills)}


def _fragmented(slices: int, endpoints: int, limits: SliceLimits) -> bool:
    """More than twice the slices the endpoints need (and more than one): lay out afresh."""
    needed = -(-endpoints // limits.endpoints)
    return slices > 1 and slices > 2 * needed


def _place(
    nodes: list[str],
    groups: dict[str, list[RouteEndpoint]],
    sizes: dict[str, int],
    fills: dict[int, _Fill],
    limits: SliceLimits,
) -> None:
    """First fit, lowest slice number first; a new slice (lowest free number) when none has room.
    Full slices leave the candidates, so a fresh layout of 40,000 endpoints stays linear."""
    open_ = sorted(n for n, f in fills.items() if len(f.endpoints) < limits.endpoints)
    for node in nodes:
        eps, size = groups[node], sizes[node]
        home = next((n for n in open_ if fills[n].fits(eps, size, limits)), None)
        if home is None:
            home = _lowest_free(fills)
            fills[home] = _Fill()
            open_.append(home)
            open_.sort()
        fills[home].add(eps, size)
        if len(fills[home].endpoints) >= limits.endpoints:
            open_.remove(home)


def _lowest_free(fills: Mapping[int, object]) -> int:
    n = len(fills)
    if n not in fills and all(i in fills for i in range(n)):
        return n
    return next(i for i in range(n + 1) if i not in fills)


def split_route(
    rec: RouteRecord, previous: Mapping[str, int], limits: SliceLimits = DEFAULT_SLICE_LIMITS
) -> tuple[RouteRecord, dict[int, RouteSlice]]:
    """A whole route (``endpoints`` filled, as compute_routes makes it) as header and slices."""
    parts = layout(rec.endpoints, previous, limits)
    slices = {n: RouteSlice(model=rec.model, epoch=rec.epoch, slice=n, endpoints=eps) for n, eps in parts.items()}
    header = msgspec.structs.replace(
        rec,
        endpoints=[],
        slices=sorted(slices),
        ready_endpoints=ready_endpoints(rec.endpoints),
        nodes=len({e.node for e in rec.endpoints}),
        ready_classes=ready_classes(rec.endpoints),
    )
    return header, slices


def membership(slices: Mapping[int, RouteSlice]) -> dict[str, int]:
    """node -> the slice its endpoints are in (the ``previous`` of the next layout)."""
    return {e.node: n for n, s in slices.items() for e in s.endpoints}


def header_differs(old: RouteRecord | None, new: RouteRecord) -> bool:
    """Whether a header is worth writing over ``old`` (``updated_at`` ignored)."""
    if old is None:
        return True
    return (
        old.schema != new.schema
        or old.epoch != new.epoch
        or old.slices != new.slices
        or old.cross_class != new.cross_class
        or old.panic_classes != new.panic_classes
        or old.ready_endpoints != new.ready_endpoints
        or old.nodes != new.nodes
        or old.ready_classes != new.ready_classes
        or bool(old.endpoints)  # a schema-1 record: its endpoints must go
    )


@dataclass(frozen=True)
class WritePolicy:
    """How big a change must be to write (gpufleet/policyconfig.py WeightsSection)."""

    min_weight_change: float = 0.0  # smaller weight moves are not written (they add up)
    urgent_weight_change: float = 0.0  # bigger ones are written at once; between: drift


NONE, DRIFT, URGENT = 0, 1, 2


def slice_change(old: RouteSlice | None, new: RouteSlice, policy: WritePolicy) -> int:
    """NONE, DRIFT (only weights moved, each by at most the urgent share) or URGENT."""
    if old is None or old.epoch != new.epoch or old.schema != new.schema or old.model != new.model:
        return URGENT
    if len(old.endpoints) != len(new.endpoints):
        return URGENT
    if old.endpoints == new.endpoints:
        return NONE
    if not endpoints_differ(old.endpoints, new.endpoints, policy.min_weight_change):
        return NONE
    if endpoints_differ(old.endpoints, new.endpoints, policy.urgent_weight_change):
        return URGENT  # a state, an address, a weight to or from 0, or a big move
    return DRIFT


@dataclass
class RouteWrite:
    """What one pass writes for one model: slices to put (in order), the header (None: as is),
    slices to delete."""

    model: str
    header: RouteRecord | None = None
    slices: list[RouteSlice] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.header is not None or bool(self.slices) or bool(self.deletes)


def plan_write(
    rec: RouteRecord,
    header: RouteRecord | None,
    slices: Mapping[int, RouteSlice],
    policy: WritePolicy = WritePolicy(),
    limits: SliceLimits = DEFAULT_SLICE_LIMITS,
    drift_due: Callable[[int], bool] = lambda n: True,
) -> tuple[RouteWrite, RouteRecord, dict[int, RouteSlice]]:
    """The writes that bring a model from ``header`` and ``slices`` (in etcd) to ``rec`` (the
    pass's whole route); also the new header and slices. ``drift_due(n)``: whether slice n's
    drifted weights may be written now."""
    new_header, new_slices = split_route(rec, membership(slices), limits)
    write = RouteWrite(rec.model)
    old_members = {n: {e.node for e in s.endpoints} for n, s in slices.items()}
    gaining, others = [], []
    for n, s in new_slices.items():
        change = slice_change(slices.get(n), s, policy)
        if change == URGENT or (change == DRIFT and drift_due(n)):
            gains = any(e.node not in old_members.get(n, ()) for e in s.endpoints)
            (gaining if gains else others).append(s)
    write.slices = gaining + others
    write.header = new_header if header_differs(header, new_header) else None
    write.deletes = sorted(set(slices) - set(new_slices))
    return write, new_header, new_slices
