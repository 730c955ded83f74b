"""A route table that does not change: the proxy's RouteView (agent/proxy/upstreams.py) over
fixed records, for in-process proxy tests and benchmarks that need "other nodes" without etcd."""

from __future__ import annotations

from collections.abc import Mapping

from gpufleet.keyspace.records import DegradationRecord, RouteRecord
from gpufleet.tasks import Flag


class StaticRoutes:
    def __init__(self, routes: Mapping[str, RouteRecord]) -> None:
        self.routes = dict(routes)
        self.drained = False
        self.degradation: DegradationRecord | None = None
        self.degradation_seen_at = 0.0
        self._gone: dict[str, Flag] = {}

    @property
    def headers(self) -> Mapping[str, RouteRecord]:
        return self.routes  # whole records, as a schema-1 header holds them

    def route(self, model: str) -> RouteRecord | None:
        return self.routes.get(model)

    async def want(self, model: str) -> None:
        return None  # nothing to follow: every route is here

    def want_now(self, model: str) -> bool:
        return True

    def node_gone(self, node: str) -> Flag:
        """Set by a test to say that ``node`` went DOWN."""
        return self._gone.setdefault(node, Flag())
