"""The agent's implementation of the proxy's :class:`~agent.proxy.upstreams.Upstreams`.

An adapter over the supervisor (local instances: ``Instance`` satisfies ``LocalUpstream``
as it is, so the hot path wraps nothing), the route table and the model registry. The route
table and the registry exist only in cluster mode and only once the agent has joined, after
the proxy is built: they are read through getters, as is the config (a reload replaces it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.config import AgentConfig, DegradationSection, ProxySection
from agent.supervisor.supervision_policy import InstanceState

from .upstreams import LocalUpstream, RouteView, ServedModel

if TYPE_CHECKING:
    from agent.cluster.assignments import ModelFollower
    from agent.supervisor import Supervisor


class AgentUpstreams:
    def __init__(
        self,
        supervisor: Supervisor,
        cfg: Callable[[], AgentConfig],
        routes: Callable[[], RouteView | None],
        models: Callable[[], ModelFollower | None],
    ) -> None:
        self._supervisor = supervisor
        self._cfg = cfg
        self._routes = routes
        self._models = models
        self._node_id: str | None = None

    @property
    def node_id(self) -> str:
        # Read per answer; [agent] is restart-only, and the name may come from gethostname(),
        # a system call per request if it were not kept.
        node_id = self._node_id
        if node_id is None:
            node_id = self._node_id = self._cfg().node_id
        return node_id

    @property
    def proxy_cfg(self) -> ProxySection:
        return self._cfg().proxy

    @property
    def degradation_cfg(self) -> DegradationSection:
        return self._cfg().degradation

    @property
    def routes(self) -> RouteView | None:
        return self._routes()

    def local(self, model: str) -> list[LocalUpstream]:
        return self._supervisor.of_model(model)  # type: ignore[return-value]

    def ready_models(self) -> list[ServedModel]:
        seen: dict[str, ServedModel] = {}
        for inst in self._supervisor.instances.values():
            if inst.state is InstanceState.READY and inst.cfg.client_model not in seen:
                seen[inst.cfg.client_model] = ServedModel(inst.cfg.client_model, inst.state_since, inst.cfg.model)
        return [seen[m] for m in sorted(seen)]

    def gpu_classes(self) -> set[str]:
        return {g.gpu_class for g in self._supervisor.gpus}

    def fallback_of(self, model: str) -> str | None:
        follower = self._models()
        rec = follower.registry.get(model) if follower is not None else None
        return rec.fallback if rec is not None else None
