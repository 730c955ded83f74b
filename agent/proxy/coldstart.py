"""Cold start: a request for an on-demand model that has no replica ready anywhere waits here.

A registered model with ``min_replicas = 0`` may have no replica at all (unloaded after its
idle time, coordinator/policy/ondemand.py). Its first request is held in a bounded queue per
model (``[proxy] cold_start_queue``) while the leader places a replica and it warms up, for at
most ``cold_start_timeout_s``; the request's demand goes into the node record at once
(agent/cluster/demand.py), which is what makes the leader place it. A full queue or a wait past
the limit is answered 503 with Retry-After.

Waiters sleep on an event, no polling: the agent pokes it when a local instance changes (the
supervisor's change callback) and the route table when a model's route changes (a header with a
READY endpoint elsewhere). The hold does not count against the request's total timeout or retry
budget (``Ctx.held``): those are for the answer, and the warm-up is announced by the limit here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import structlog
from aiohttp import web

from agent.config import ProxySection
from agent.supervisor.supervision_policy import InstanceState
from gpufleet.keyspace.records import ModelRecord
from gpufleet.routeslices import has_ready

from .context import Ctx, retry_later
from .upstreams import Upstreams

log = structlog.get_logger("agent.proxy")


class Demand(Protocol):
    """agent/cluster/demand.py's DemandTracker, as the proxy uses it."""

    def on_demand(self, model: str) -> ModelRecord | None: ...
    def models(self) -> list[str]: ...
    def begin(self, model: str) -> bool: ...
    def end(self, model: str) -> None: ...


class _Queue:
    __slots__ = ("changed", "waiting")

    def __init__(self) -> None:
        self.waiting = 0
        self.changed = asyncio.Event()


class ColdStart:
    def __init__(self, upstreams: Upstreams, demand: Demand, rejected: Callable[[str], None] = lambda _: None) -> None:
        self.upstreams = upstreams
        self.demand = demand
        self._rejected = rejected  # counts a refusal by kind (the proxy's metrics)
        self._queues: dict[str, _Queue] = {}

    @property
    def cfg(self) -> ProxySection:
        return self.upstreams.proxy_cfg

    def waiting(self) -> dict[str, int]:
        return {m: q.waiting for m, q in self._queues.items()}

    def poke(self, model: str | None = None) -> None:
        """Something that may end a wait changed (``model``'s route; None: a local instance):
        the waiters look again."""
        queues = self._queues.values() if model is None else filter(None, [self._queues.get(model)])
        for q in queues:
            q.changed.set()
            q.changed = asyncio.Event()

    def ready(self, model: str) -> bool:
        """A replica serves ``model``: here (READY), or elsewhere (a READY endpoint in its route)."""
        if any(i.state is InstanceState.READY for i in self.upstreams.local(model)):
            return True
        routes = self.upstreams.routes
        if routes is None:
            return False
        here = self.upstreams.node_id
        route = routes.route(model)
        if route is not None:  # this node's own endpoints are what local() says, not a stale route
            return any(e.state == "READY" and e.weight > 0 and e.node != here for e in route.endpoints)
        header = routes.headers.get(model)
        return header is not None and has_ready(header)

    async def hold(self, model: str, ctx: Ctx, wait: bool = True) -> web.Response | None:
        """Note the request's demand; wait while ``model`` is on demand and nothing serves it.
        None: go on (served now, or not an on-demand model); else the 503 to answer. Not
        ``wait``: a request another node forwarded here, which that node holds if it must (it
        saw a READY endpoint here; a wait here would only hide that it is gone)."""
        if not self.note(model, ctx) or not wait or self.ready(model):
            return None
        cfg = self.cfg
        q = self._queues.get(model) or self._queues.setdefault(model, _Queue())
        if q.waiting >= cfg.cold_start_queue:
            self._rejected("cold_start_queue_full")
            return self._refuse(ctx, f"{q.waiting} requests already wait for it to start (cold_start_queue)")
        q.waiting += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(cfg.cold_start_timeout_s):
                while not self.ready(model):
                    await q.changed.wait()
        except TimeoutError:
            self._rejected("cold_start_timeout")
            return self._refuse(ctx, f"no replica became ready within {cfg.cold_start_timeout_s:g} s")
        finally:
            q.waiting -= 1
            if not q.waiting and self._queues.get(model) is q:
                del self._queues[model]
        held = time.monotonic() - started
        ctx.held += held
        ctx.loop_started += held  # the total timeout starts over: see the module docstring
        log.info(
            "cold start: request held until a replica was ready", request_id=ctx.rid, model=model, held_s=round(held, 3)
        )
        routes = self.upstreams.routes
        if routes is not None:
            await routes.want(model)  # its route slices exist now: follow them
        return None

    def would_hold(self, model: str, wait: bool = True) -> bool:
        """Would ``hold`` wait (an on-demand model that no replica serves yet)? Changes nothing."""
        return wait and self.demand.on_demand(model) is not None and not self.ready(model)

    def note(self, model: str, ctx: Ctx) -> bool:
        """Note the request's demand for ``model`` (``end`` ends it): True if on demand."""
        if not self.demand.begin(model):
            return False
        ctx.demand = model  # the proxy calls end() when the request is over
        return True

    def end(self, ctx: Ctx) -> None:
        if ctx.demand is not None:
            self.demand.end(ctx.demand)
            ctx.demand = None

    def _refuse(self, ctx: Ctx, why: str) -> web.Response:
        return retry_later(
            503,
            f"model {ctx.model} is loaded on demand and is not ready: {why}; retry later",
            "service_unavailable",
            "model_starting",
            ctx.rid,
            self.cfg.retry_after_s,
        )
