"""The proxy's own counters: what the node record, ``/v1/status`` and ``/metrics`` read.

Plain integers bumped on the hot path (no locks, no label look-ups: the event loop is the only
writer); readers copy them when they build a record or a scrape. The Prometheus series of the
proxy (metrics.py) are separate: they are per model and status, these are what the cluster
needs (the leader's error rate) and what the supervisor reports per instance.
"""

from __future__ import annotations

import msgspec

from gpufleet.keyspace.records import InstanceRecord, ProxyCounters


class UpstreamStats:
    """One upstream (a local instance by name, another node's as ``node/instance``)."""

    __slots__ = ("errors", "in_flight", "requests")

    def __init__(self) -> None:
        self.in_flight = 0  # attempts on it now: least-in-flight picking and half-open trials
        self.requests = 0  # attempts sent to it
        self.errors = 0  # of those, failed (counted kinds only: not "the request did not fit")


class ProxyStats:
    def __init__(self) -> None:
        self.counters = ProxyCounters()  # node-wide, for the node record (cluster error rate)
        self.upstreams: dict[str, UpstreamStats] = {}
        # Counted here rather than read from the cache, which is rebuilt (and its counts lost)
        # when a reload changes its bounds: a Prometheus counter must not go backwards.
        self.cache_hits = 0
        self.cache_misses = 0

    def upstream(self, name: str) -> UpstreamStats:
        u = self.upstreams.get(name)
        if u is None:
            u = self.upstreams[name] = UpstreamStats()
        return u

    def in_flight(self, name: str) -> int:
        u = self.upstreams.get(name)
        return 0 if u is None else u.in_flight

    def snapshot(self) -> ProxyCounters:
        return msgspec.structs.replace(self.counters)

    def annotate(self, records: list[InstanceRecord]) -> list[InstanceRecord]:
        """Fill in the per-instance request and error counts of the supervisor's records."""
        for rec in records:
            if (u := self.upstreams.get(rec.name)) is not None:
                rec.requests_total, rec.errors_total = u.requests, u.errors
        return records
