"""The agent's HTTP API: health, readiness, status, metrics and admin actions.

One aiohttp application on the agent's port, shared with the OpenAI-compatible proxy
(agent/proxy). Admin routes need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.cluster.publisher import MembershipCollector
from agent.keys.gate import KeyGate
from agent.proxy import Proxy, add_proxy
from agent.proxy.adapter import AgentUpstreams
from agent.proxy.coldstart import ColdStart
from agent.proxy.metrics import ProxyMetrics
from agent.supervisor import UnknownInstance
from gpufleet.httperrors import bad_input_middleware, bearer_refused, error_middleware, error_response, json_response
from gpufleet.httpserver import ConnectionMetrics
from gpufleet.logsetup import dropped_lines
from gpufleet.statusaccess import StatusAccess

from .metrics import LogDropCollector, make_registry

if TYPE_CHECKING:
    from agent.daemon import AgentRuntime

log = structlog.get_logger("agent.api")
ACTIONS = ("start", "stop", "restart")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GpuChange(msgspec.Struct, forbid_unknown_fields=True):
    temperature_c: float | None = None
    utilization_percent: float | None = None
    power_w: float | None = None
    memory_used_gib: float | None = None
    lost: bool | None = None


class AgentApi:
    """The agent's application over one runtime: the routes are methods, and the admin routes
    are behind one middleware (:meth:`admin_middleware`), not a check in each handler."""

    def __init__(self, rt: AgentRuntime) -> None:
        self.rt = rt
        self.admin_routes: set[web.AbstractRoute] = set()
        # /v1/status and /metrics as [api] status_access says; the admin token opens them too.
        access = StatusAccess(rt.cfg.api, "gpu-agent", other_token=rt.admin_token.check)
        access.check_files()  # OSError: the daemon's start fails with 78
        self.app = web.Application(
            middlewares=[error_middleware, bad_input_middleware, access.middleware, self.admin_middleware],
            client_max_size=rt.cfg.proxy.max_body_bytes,
        )
        self.registry = self._registry()
        if rt.cfg.proxy.enabled:
            self._add_proxy(self._proxy())
        router = self.app.router
        router.add_get("/healthz", self.healthz)
        router.add_get("/readyz", self.readyz)
        router.add_get("/v1/status", self.status)
        router.add_get("/metrics", self.metrics)
        self._add_admin("/admin/instances/{name}/{action}", self.instance_action)
        self._add_admin("/admin/gpus/{index}", self.set_gpu)
        self._add_admin("/admin/reload", self.reload)

    def _registry(self) -> CollectorRegistry:
        rt = self.rt
        registry = make_registry(rt.node_record)
        if (guard := getattr(rt, "http_guard", None)) is not None:
            registry.register(ConnectionMetrics(guard, "gpu_agent"))
        registry.register(
            LogDropCollector(
                dropped_lines,
                lambda: [
                    ([i.name, i.cfg.client_model, i.cfg.backend], i.output.dropped_lines)
                    for i in rt.supervisor.instances.values()
                ],
            )
        )
        registry.register(MembershipCollector(lambda: rt.publisher))
        return registry

    def _proxy(self) -> Proxy:
        """The proxy over the agent's upstreams, counting into the runtime's ``proxy_stats``
        (the node record reads them). Route table and model registry appear once the agent
        has joined its cluster, after this: read when asked."""
        rt = self.rt
        metrics = ProxyMetrics(self.registry)
        # Passive health's ejections are the supervisor's state, exported with the proxy's series.
        metrics.watch_ejected(
            lambda: [(i.cfg.client_model, i.name, i.ejected) for i in rt.supervisor.instances.values()]
        )
        upstreams = AgentUpstreams(
            rt.supervisor, cfg=lambda: rt.cfg, routes=lambda: rt.routes, models=lambda: rt.models
        )
        rt.key_gate = KeyGate(
            auth=lambda: rt.cfg.auth,
            listen_host=rt.cfg.agent.listen_host,
            node_id=rt.cfg.node_id,
            source=lambda: rt.key_source,
            entry_nodes=rt.entry_nodes,
            registry=self.registry,
        )
        tls = getattr(rt, "tls", None)  # other nodes are reached with the cluster's CA (never unverified)
        demand = getattr(rt, "demand", None)  # on-demand models (agent/cluster/demand.py)
        cold_start = None
        if demand is not None:
            cold_start = rt.cold_start = ColdStart(upstreams, demand, lambda kind: metrics.rejected.labels(kind).inc())
        return Proxy(
            upstreams,
            metrics,
            rt.proxy_stats,
            rt.key_gate,
            peer_ssl=tls.peer if tls is not None else True,
            cold_start=cold_start,
        )

    def _add_proxy(self, proxy: Proxy) -> None:
        add_proxy(self.app, proxy)

    def _add_admin(self, path: str, handler: Handler) -> None:
        self.admin_routes.add(self.app.router.add_post(path, handler))

    # --- admin check ----------------------------------------------------------------------------

    @web.middleware
    async def admin_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Runs inside the bad-input middleware, before any admin handler reads the request: 403
        while no token file is configured, 401 without the right bearer token. Other routes
        (and 404/405 for paths and methods no route has) pass through."""
        if request.match_info.route not in self.admin_routes:
            return await handler(request)
        rt = self.rt
        if not rt.admin_token.configured:
            return error_response(
                403, "admin API disabled: set agent.admin_token_file", "permission_error", "admin_disabled"
            )
        if not rt.admin_token.check(request.headers.get("Authorization")):
            log.warning("admin request refused", path=request.path, remote=request.remote)
            return bearer_refused("missing or wrong bearer token", "gpu-agent")
        return await handler(request)

    # --- health, status, metrics --------------------------------------------------------------

    async def healthz(self, _: web.Request) -> web.Response:
        rt = self.rt
        # Answering proves the loop runs; a stale tick means supervision itself is stuck.
        age = rt.tick_age()
        limit = 3 * rt.cfg.supervisor.probe_interval_s + rt.cfg.gpu.nvml_timeout_s
        if age is not None and age > limit:
            return json_response({"status": "stalled", "last_tick_age_s": round(age, 1)}, 503)
        if dead := rt.supervision_failures():
            return json_response({"status": "supervision failed", "instances": dead}, 503)
        if rt.publisher is not None and rt.publisher.refused_by is not None:
            # Still 200: this agent serves locally, and a restart would not fix a duplicate node_id.
            return json_response({"status": "ok", "cluster": rt.publisher.status()})
        return json_response({"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        rt = self.rt
        rec = rt.node_record()
        if rec.ready:
            return json_response({"status": "ready"})
        waiting = {i.name: i.state for i in rec.instances if i.state != "READY"}
        reason = "agent is not serving yet" if not rt.serving else "instances not ready"
        return json_response({"status": "not ready", "reason": reason, "instances": waiting}, 503)

    async def status(self, _: web.Request) -> web.Response:
        rt = self.rt
        doc = msgspec.to_builtins(rt.node_record())
        # What the file says that is not running: a refused reload, settings waiting for a restart.
        doc["config"] = {"last_reload_failure": rt.reload_failure, "restart_needed": rt.restart_needed}
        if rt.publisher is not None:
            routes = rt.routes
            doc["cluster"] = {
                **rt.publisher.status(),
                "drained": routes.drained if routes is not None else None,
                # Which models' route slices this node follows (served here, or asked for recently).
                "routes_followed": sorted(routes.followed()) if routes is not None else [],
                "route_models": len(routes.headers) if routes is not None else 0,
            }
        return json_response(doc)

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # --- admin actions (behind admin_middleware) ----------------------------------------------

    async def instance_action(self, request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if action not in ACTIONS:
            return error_response(
                404, f"unknown action {action!r}; use one of {', '.join(ACTIONS)}", "invalid_request_error"
            )
        try:
            inst = self.rt.supervisor.command(name, action)  # type: ignore[arg-type]
        except UnknownInstance:
            return error_response(404, f"no instance named {name!r}", "invalid_request_error", "unknown_instance")
        [record] = self.rt.proxy_stats.annotate([inst.record()])
        return json_response({"accepted": action, "instance": record}, 202)

    async def set_gpu(self, request: web.Request) -> web.Response:
        rt = self.rt
        if rt.gpu_source.kind != "simulated":
            return error_response(409, "GPU state can only be changed for simulated GPUs", "invalid_request_error")
        try:
            change = msgspec.json.decode(await request.read(), type=GpuChange)
            index = int(request.match_info["index"])
            rt.gpu_source.set_state(index, **msgspec.structs.asdict(change))  # type: ignore[attr-defined]
        except (msgspec.DecodeError, ValueError) as e:
            return error_response(400, f"invalid request: {e}", "invalid_request_error")
        except IndexError:
            return error_response(404, f"no GPU {request.match_info['index']}", "invalid_request_error")
        await rt.supervisor.tick()
        rt.changed()
        return json_response({g.index: g for g in rt.supervisor.gpus}.get(index))

    async def reload(self, _: web.Request) -> web.Response:
        # 200 applied; 422 the file has errors, 409 it cannot be applied now: the running config
        # is kept either way, and the body names the problems.
        outcome = await self.rt.reload()
        return json_response(outcome.body, outcome.http_status)


def build_app(rt: AgentRuntime) -> web.Application:
    return AgentApi(rt).app
