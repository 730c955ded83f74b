"""What the proxy needs from the rest of the agent, and nothing more.

The proxy is a data path: it reads where a model is served (local instances, other nodes'
endpoints in the route table), a few settings, and the cluster's drain flag and degradation
level; it reports each attempt's outcome back so that passive health (the supervisor's outlier
ejection) can act on it. Everything else it keeps itself: request counters, cache lookups and
in-flight counts per upstream live in its own :class:`~agent.proxy.stats.ProxyStats`.

Written as Protocols so that the proxy never sees the supervisor, the runtime or etcd: the
agent implements them with :class:`agent.proxy.adapter.AgentUpstreams`, the in-process tests
with a small fake, and a second proxy implementation (the protocol-level relay planned on
asyncio Protocols) can sit on the same interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

from agent.backends import Judgement, Upstream
from agent.config import DegradationSection, ProxySection
from agent.supervisor.supervision_policy import InstanceState
from gpufleet.keyspace.records import DegradationRecord, RouteRecord
from gpufleet.tasks import Flag


class LocalUpstream(Protocol):
    """One model-server instance on this node, as the proxy sees it.

    Its in-flight count is the proxy's (``ProxyStats``) and is handed in where rotation needs
    it; outcomes go back through ``report_*``: the proxy never writes the instance's state."""

    @property
    def name(self) -> str: ...
    @property
    def upstream(self) -> Upstream:
        """Address and headers (the instance's API key) of the running server."""
        ...

    @property
    def base_url(self) -> str: ...
    @property
    def state(self) -> InstanceState: ...

    def routable(self, in_flight: int, *, suspect_ok: bool = False) -> bool:
        """In rotation (READY, last probe passed, not ejected; half-open: only with nothing in
        flight). ``suspect_ok``: even though its last probe failed."""
        ...

    def judge(self, status: int, body: bytes) -> Judgement:
        """Its backend's verdict on an error answer: the request's fault, busy, or failing."""
        ...

    def watch(self, on_leave: Callable[[], None]) -> None:
        """Call ``on_leave`` if it leaves rotation before ``unwatch``."""
        ...

    def unwatch(self, on_leave: Callable[[], None]) -> None: ...

    # --- outcomes, for passive health ------------------------------------------------------

    def request_probe(self) -> None:
        """It just failed a request: probe it now rather than at the next tick."""
        ...

    def report_success(self) -> None:
        """A request got its first byte from it."""
        ...

    def report_failure(self, detail: str, answered: bool = False) -> bool:
        """A gateway failure (timeout, refused or reset connection; ``answered``: a 5xx judged
        its fault). True when this failure has just ejected it."""
        ...


class RouteView(Protocol):
    """This node's copy of the cluster's route table (``agent.cluster.routes.RouteTable``)."""

    routes: Mapping[str, RouteRecord]  # assembled routes of the models followed
    headers: Mapping[str, RouteRecord]  # every model's header (endpoints only in schema-1 ones)
    drained: bool  # an operator drained this node: new work goes to other nodes
    degradation: DegradationRecord | None
    degradation_seen_at: float  # monotonic time the degradation record last changed

    def route(self, model: str) -> RouteRecord | None: ...

    async def want(self, model: str) -> None:
        """Follow ``model``'s route if not yet, waiting (bounded) for it; marks it used."""
        ...

    def want_now(self, model: str) -> bool:
        """``want`` when it would not wait (the route is followed and here, or has nothing to
        follow): True, and marked used. False: nothing done, ``want`` must wait."""
        ...

    def node_gone(self, node: str) -> Flag:
        """Set when ``node`` is DOWN in the routes or has left them."""
        ...


class ServedModel(NamedTuple):
    """A model with a READY instance on this node, for ``/v1/models``."""

    id: str  # the name clients ask for
    created: float  # since when it is READY (Unix time)
    root: str  # the model the server loaded


class Upstreams(Protocol):
    """Everything the proxy reads from the agent. Read live: a reload applies at once."""

    @property
    def node_id(self) -> str: ...
    @property
    def proxy_cfg(self) -> ProxySection: ...
    @property
    def degradation_cfg(self) -> DegradationSection: ...
    @property
    def routes(self) -> RouteView | None:
        """The route table; None in standalone mode (no other nodes, no degradation)."""
        ...

    def local(self, model: str) -> list[LocalUpstream]:
        """This node's instances of ``model`` (the name clients ask for), whatever their state."""
        ...

    def ready_models(self) -> list[ServedModel]:
        """Models with a READY instance on this node, one entry each, sorted by id."""
        ...

    def gpu_classes(self) -> set[str]:
        """GPU classes of this node (failover to other nodes prefers the same class)."""
        ...

    def fallback_of(self, model: str) -> str | None:
        """The fallback model registered for ``model`` (degradation level 2), if any."""
        ...
