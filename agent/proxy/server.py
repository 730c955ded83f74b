"""The OpenAI-compatible proxy on the agent's port: which upstream serves a request, and retries.

A request is read and its ``model`` and ``stream`` decoded (nothing else), degradation applied
(degrade.py), then sent to an instance of the model: local ones in rotation first, then other
nodes by the route table (remote.py). A failure before the first response byte (connect error,
5xx, 429, no first byte within its limit, the instance leaving rotation) is retried on another
instance within a bounded number of attempts and time; after the first byte nothing is retried
(the client has part of an answer). One attempt, and the bytes of its answer, are relay.py's.
Gateway failures on a local instance are reported back through the ``Upstreams`` interface
(upstreams.py), which is all the proxy knows of the rest of the agent: they feed the instance's
passive health (outlier ejection, supervisor/supervision_policy.py). The proxy's counters are
its own (stats.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from aiohttp import web

from agent.config import ProxySection
from agent.keys.gate import KeyGate, Refusal
from gpufleet.facts import REQUEST_ID_HEADER
from gpufleet.httperrors import error_response, json_response
from gpufleet.keyspace.records import RouteRecord
from gpufleet.routeslices import has_ready

from .accesslog import AccessLog
from .coldstart import ColdStart
from .context import (
    ANTHROPIC_ROUTES,
    ROUTES,
    UNKNOWN_MODEL_LABEL,
    Ctx,
    Failure,
    Head,
    Plan,
    new_request_id,
    parse_head,
    retry_later,
)
from .degrade import FALLBACK_REQUEST_HEADER, Degrader
from .exchange import AiohttpRequest, AiohttpSink, Answer, BodyTooLarge, BodyUnreadable, Request, Sink, answer_of
from .limits import ModelGate, QueueFull
from .metrics import ProxyMetrics
from .relay import BUSY, CAPACITY, Relay, Target
from .remote import HOPS_HEADER, MAX_HOPS, RemotePicker, RemoteTarget, hops_of
from .routing import K, Picker, affine, classify_task, task_route_group
from .stats import ProxyStats
from .surface import labelled
from .upstreams import LocalUpstream, Upstreams

log = structlog.get_logger("agent.proxy")
# Failures that say the instance is not serving (Envoy's "gateway failures"): passive health.
GATEWAY_FAILURES = frozenset({"connect", "status_5xx", "timeout", "midstream"})
# The client waited for an answer that never came: retried even past retry_budget_s.
ABANDONED = frozenset({"node_down", "instance_down", "timeout"})


class _Reply(Exception):
    """The request is answered before any upstream (refused, unknown model, degraded): the
    pipeline in ``Proxy._forward`` stops and the client gets ``response``."""

    def __init__(self, response: web.Response | Answer) -> None:
        self.response = answer_of(response)


class Proxy:
    """The proxy over an :class:`~agent.proxy.upstreams.Upstreams`; its counters in ``stats``."""

    def __init__(
        self,
        upstreams: Upstreams,
        metrics: ProxyMetrics,
        stats: ProxyStats | None = None,
        key_gate: KeyGate | None = None,
        peer_ssl: ssl.SSLContext | bool = True,
        cold_start: ColdStart | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.cold_start = cold_start  # on-demand models: hold a request while one starts
        self.key_gate = key_gate  # API keys (agent/keys/gate.py); None: every request is let through
        self.metrics = metrics
        self.stats = stats if stats is not None else ProxyStats()
        self.picker = Picker()
        self.remote = RemotePicker(upstreams.node_id)
        self.degrader = Degrader(upstreams, self.stats)
        self.relay = Relay(upstreams, self.stats, metrics, self.degrader, key_gate, peer_ssl)
        self.gates: dict[str, ModelGate] = {}
        self.access_log = AccessLog()
        metrics.degradation_level.set_function(self.degrader.level)
        metrics.watch_state(self.stats, lambda: self.degrader.cache, self._queued)

    @property
    def cfg(self) -> ProxySection:
        return self.upstreams.proxy_cfg  # read live, so a reload applies

    async def start(self) -> None:
        await self.relay.start()

    async def close(self) -> None:
        self.access_log.flush()
        await self.relay.close()

    def _queued(self) -> dict[str, int]:
        """Requests waiting per model with a concurrency limit (0 before its first request)."""
        return {m: g.queued if (g := self.gates.get(m)) is not None else 0 for m in self.cfg.limits}

    def gate(self, model: str) -> ModelGate | None:
        limit = self.cfg.limits.get(model)
        if limit is None:
            return None
        g = self.gates.get(model)
        if g is None or (g.max_concurrency, g.max_queue) != (limit.max_concurrency, limit.max_queue):
            g = self.gates[model] = ModelGate(limit.max_concurrency, limit.max_queue)
        return g

    # --- handlers ---------------------------------------------------------------------------

    async def models(self, request: Request) -> Answer:
        """``GET /v1/models``: the models this node can serve, itself or through the cluster."""
        allowed: set[str] | None = None  # None: every model
        if self.key_gate is not None:
            try:
                key = self.key_gate.listing(request)
            except Refusal as r:
                return answer_of(r.response)
            if key is not None and key.models:
                allowed = set(key.models)
        listed = await self._models()
        if allowed is not None:  # a key limited to some models sees only those
            listed["data"] = [m for m in listed["data"] if m["id"] in allowed]
        return answer_of(json_response(listed))

    async def _models(self) -> dict[str, Any]:
        local = self.upstreams.ready_models()
        data = [
            {"id": m.id, "object": "model", "created": int(m.created), "owned_by": "gpufleet", "root": m.root}
            for m in local
        ]
        routes = self.upstreams.routes
        seen = {m.id for m in local}
        if routes is not None:  # models served elsewhere in the cluster, reachable through us
            for m, header in sorted(routes.headers.items()):
                if m not in seen and has_ready(header):
                    seen.add(m)
                    data.append({"id": m, "object": "model", "created": int(header.updated_at), "owned_by": "gpufleet"})
        if self.cold_start is not None:  # loaded on their first request: listed while unloaded too
            data += [
                {"id": m, "object": "model", "created": 0, "owned_by": "gpufleet"}
                for m in self.cold_start.demand.models()
                if m not in seen
            ]
        return {"object": "list", "data": data}

    async def forward(self, request: Request, sink: Sink, *, anthropic: bool = False) -> Answer:
        """Serve one request of a proxied route; the answer goes out through ``sink`` (a stream
        as it is relayed, a whole answer at the end). ``anthropic``: one of ANTHROPIC_ROUTES."""
        started = time.monotonic()
        rid = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
        ctx = Ctx(rid, started, self.cfg)
        try:
            answer = await self._forward(request, sink, ctx)
        except asyncio.CancelledError:
            ctx.status = 499  # client went away (nginx's code); upstream was cancelled with us
            raise
        finally:
            if self.cold_start is not None:
                self.cold_start.end(ctx)  # its model was wanted while it lasted
            self._account(request, ctx)
        if not answer.sent:  # a stream's headers went out with the relayed answer's
            await sink.send(labelled(answer, self.upstreams.node_id, anthropic=anthropic))
        return answer

    # --- one request, step by step ------------------------------------------------------------

    async def _forward(self, request: Request, sink: Sink, ctx: Ctx) -> Answer:
        try:
            body, head = await self._read_head(request, ctx)
            body = self._authorize(request, body, head, ctx)
            forwarded = self._entered(request, ctx)
            await self._want(head.model)
            if self.cold_start is not None:
                if (held := await self.cold_start.hold(head.model, ctx, wait=not forwarded)) is not None:
                    raise _Reply(ctx.done(held))
            serving, route = self._known(head.model, ctx)
            if (fallback := await self._degrade(request, sink, body, head, forwarded, ctx)) is not None:
                body, head = fallback
                await self._want(head.model)
                serving, route = self._where(head.model)
            plan = self._plan(request, body, head.model, serving, route, ctx)
            return await self._dispatch(request, sink, body, plan, ctx)
        except _Reply as r:
            return ctx.done(r.response)

    async def _read_head(self, request: Request, ctx: Ctx) -> tuple[bytes, Head]:
        """The body, and the ``model`` and ``stream`` it asks for; 413 or 400 if unreadable."""
        try:
            body = await request.read()
        except BodyTooLarge:
            self.metrics.rejected.labels("too_large").inc()
            raise _Reply(
                error_response(
                    413,
                    f"request body larger than {self.cfg.max_body_bytes} bytes",
                    "invalid_request_error",
                    "body_too_large",
                    {REQUEST_ID_HEADER: ctx.rid},
                )
            ) from None
        except BodyUnreadable as e:
            self.metrics.rejected.labels("bad_request").inc()
            raise _Reply(
                error_response(
                    400,
                    f"the request body could not be read: {e}",
                    "invalid_request_error",
                    "bad_body",
                    {REQUEST_ID_HEADER: ctx.rid},
                )
            ) from None
        head = parse_head(body, request.path, request.headers.get("Content-Type", ""))
        if not isinstance(head, Head):
            self.metrics.rejected.labels("bad_request").inc()
            head.headers[REQUEST_ID_HEADER] = ctx.rid
            raise _Reply(head)
        ctx.model, ctx.stream = head.model, head.stream
        return body, head

    def _authorize(self, request: Request, body: bytes, head: Head, ctx: Ctx) -> bytes:
        """The key check (401/403/429/503 end the request); the body to send on."""
        if self.key_gate is None:
            return body
        try:
            return self.key_gate.admit(request, body, head, hops_of(request.headers.get(HOPS_HEADER)), ctx)
        except Refusal as r:
            raise _Reply(r.response) from None

    def _entered(self, request: Request, ctx: Ctx) -> bool:
        """Count a request entering the cluster here; True when another node forwarded it (it
        was counted there, and attempts for a fallback there are not counted here either)."""
        if HOPS_HEADER not in request.headers:
            self.stats.counters.requests += 1
            return False
        if FALLBACK_REQUEST_HEADER in request.headers:
            ctx.counted = False
        return True

    async def _want(self, model: str) -> None:
        """Have the model's route followed (the first request for it waits for one etcd list)."""
        routes = self.upstreams.routes
        if routes is not None:
            await routes.want(model)

    def _where(self, model: str) -> tuple[list[LocalUpstream], RouteRecord | None]:
        """Local instances of ``model``, and its cluster route (None in standalone mode)."""
        routes = self.upstreams.routes
        return self.upstreams.local(model), routes.route(model) if routes is not None else None

    def _known(self, model: str, ctx: Ctx) -> tuple[list[LocalUpstream], RouteRecord | None]:
        """``_where``, or 404 when neither this node nor the cluster serves the model."""
        serving, route = self._where(model)
        routes = self.upstreams.routes
        if not serving and route is None and routes is not None and model in routes.headers:
            ctx.model_label = model  # known to the cluster, but its route did not arrive in time
            raise _Reply(
                retry_later(
                    503,
                    f"The route of model `{model}` is not available from etcd yet; retry.",
                    "server_error",
                    "route_unavailable",
                    ctx.rid,
                    self.cfg.retry_after_s,
                )
            )
        if not serving and route is None:
            ctx.model_label = UNKNOWN_MODEL_LABEL
            raise _Reply(
                error_response(
                    404,
                    f"The model `{model}` does not exist.",
                    "invalid_request_error",
                    "model_not_found",
                    {REQUEST_ID_HEADER: ctx.rid},
                )
            )
        ctx.model_label = model
        return serving, route

    async def _degrade(
        self, request: Request, sink: Sink, body: bytes, head: Head, forwarded: bool, ctx: Ctx
    ) -> tuple[bytes, Head] | None:
        """Apply the cluster's degradation level: the static answer or a cached one end the
        request (``_Reply``); the fallback model comes back as the body and head to serve.
        None: serve the request as asked (storing its answer in the cache, at level 1 and up)."""
        applied = self.degrader.plan(request, body, head.model, forwarded)
        if not applied.level:
            return None
        if applied.level >= 3:
            raise _Reply(self._degraded(ctx, "static", self.degrader.static_response(ctx.rid)))
        hit = self.degrader.cached(applied.cache_key)
        if hit is not None:
            raise _Reply(self._degraded(ctx, "cache", await self.degrader.replay(sink, hit, ctx.rid)))
        ctx.cache_key = applied.cache_key
        if applied.fallback is None or applied.body is None:
            return None
        self._count_degraded(ctx, "fallback")
        ctx.downgraded, ctx.counted = applied.fallback, False
        return applied.body, Head(applied.fallback, head.stream)

    def _count_degraded(self, ctx: Ctx, kind: str) -> None:
        ctx.degraded = kind
        self.stats.counters.degraded += 1
        self.metrics.degraded.labels(kind).inc()

    def _degraded(self, ctx: Ctx, kind: str, resp: Answer) -> Answer:
        self._count_degraded(ctx, kind)
        return resp

    def _plan(
        self,
        request: Request,
        body: bytes,
        model: str,
        serving: list[LocalUpstream],
        route: RouteRecord | None,
        ctx: Ctx,
    ) -> Plan:
        plan = Plan(model=model, serving=serving, route=None)
        cfg = ctx.cfg
        if cfg.affinity_header:
            plan.session = request.headers.get(cfg.affinity_header) or None
        if route is not None and hops_of(request.headers.get(HOPS_HEADER)) < MAX_HOPS:
            plan.route = route
        task_routes = cfg.task_routes
        plan.group = task_route_group(task_routes, model, classify_task(body)) if task_routes else None
        return plan

    def _overflows(self, plan: Plan, gate: ModelGate | None) -> bool:
        """Should the local instances wait until no other node can take the request? When
        remote capacity exists: a drained node sends new work away, and a saturated model
        overflows to other nodes instead of queueing here."""
        if plan.route is None or not self.remote.candidates(plan.route, self.upstreams.gpu_classes(), set()):
            return False
        routes = self.upstreams.routes
        drained = routes is not None and routes.drained
        return drained or (gate is not None and gate.active >= gate.max_concurrency)

    async def _dispatch(self, request: Request, sink: Sink, body: bytes, plan: Plan, ctx: Ctx) -> Answer:
        """Through the model's concurrency gate (local instances only) to the attempts."""
        gate = self.gate(plan.model) if plan.serving else None
        if self._overflows(plan, gate):
            plan.deferred, plan.serving = plan.serving, []
        in_flight = self.metrics.in_flight
        in_flight[plan.model] = in_flight.get(plan.model, 0) + 1
        try:
            if plan.serving and gate is not None and (refused := await self._enter_gate(gate, plan, ctx)):
                return refused
            return await self._attempts(request, sink, body, plan, ctx)
        finally:
            in_flight[plan.model] -= 1
            if plan.gate is not None:
                plan.gate.release()

    async def _enter_gate(self, gate: ModelGate, plan: Plan, ctx: Ctx) -> Answer | None:
        """Wait for a local slot (bounded queue); a response if refused, None once admitted."""
        try:
            async with self.relay.deadlines.at(self.relay.loop_deadline(ctx, ctx.cfg.ttfb_timeout_s)):
                await gate.acquire()
        except QueueFull as e:
            self.metrics.rejected.labels("queue_full").inc()
            return ctx.done(
                retry_later(
                    429,
                    f"too many requests for {ctx.model}: {e}",
                    "rate_limit_error",
                    "queue_full",
                    ctx.rid,
                    self.cfg.retry_after_s,
                )
            )
        except TimeoutError:
            return ctx.done(self.relay.timeout_response(ctx, "waiting for a free slot"))
        plan.gate = gate
        return None

    # --- attempts -----------------------------------------------------------------------------

    async def _attempts(self, request: Request, sink: Sink, body: bytes, plan: Plan, ctx: Ctx) -> Answer:
        """Attempt after attempt, each on an upstream not tried yet, until one answers or the
        request runs out of candidates, attempts or budget."""
        retry_deadline = ctx.started + ctx.held + ctx.cfg.retry_budget_s
        tried: set[str] = set()
        last: Failure | None = None
        timeouts = 0
        while True:
            target = self._next_target(plan, tried, ctx)
            if target is None and plan.deferred:
                if refused := await self._serve_deferred(plan, ctx):
                    return refused
                continue
            if target is None:
                return ctx.done(self._unavailable(plan, last, ctx))
            tried.add(target.name)
            ctx.instance = target.name
            try:
                with self._abandon_if_gone(target, ctx):  # inline: a frame less per stream
                    return await self.relay.attempt(request, sink, body, target, ctx)
            except Failure as f:
                last = f
                self._failed(target, f, ctx)
                timeouts += f.kind == "timeout"
                if self._out_of_retries(f, len(tried), timeouts, retry_deadline):
                    return ctx.done(self._given_up(f, ctx))
                ctx.retries += 1
                self.metrics.retries.labels(ctx.model).inc()

    async def _serve_deferred(self, plan: Plan, ctx: Ctx) -> Answer | None:
        """No other node could take it: the local instances set aside serve after all."""
        plan.serving, plan.deferred = plan.deferred, []
        gate = self.gate(plan.model)
        return await self._enter_gate(gate, plan, ctx) if gate is not None else None

    def _out_of_retries(self, f: Failure, attempts: int, timeouts: int, retry_deadline: float) -> bool:
        # Timeouts and targets that left under an attempt are retried even past the budget:
        # the client has waited for an answer that never came. A second timeout is not: a
        # request slow on two instances is likely slow itself (a huge prompt), and a third try
        # would only burn another prefill.
        over_budget = time.monotonic() >= retry_deadline and f.kind not in ABANDONED
        return attempts >= self.cfg.max_attempts or over_budget or timeouts > 1

    def _given_up(self, f: Failure, ctx: Ctx) -> Answer | web.Response:
        if f.response is not None:
            return f.response
        return error_response(
            502, f"upstream failed: {f.detail}", "server_error", "upstream_error", {REQUEST_ID_HEADER: ctx.rid}
        )

    def _unavailable(self, plan: Plan, last: Failure | None, ctx: Ctx) -> Answer | web.Response:
        """Nothing (more) to try: the last failure's answer, else 503."""
        if last is not None and last.response is not None:
            return last.response
        states = ", ".join(f"{i.name} {i.state.value}" for i in plan.serving) or "no local instance"
        remote = " and no eligible remote endpoint" if plan.route is not None else ""
        return retry_later(
            503,
            f"no instance of {ctx.model} is ready ({states}){remote}",
            "service_unavailable",
            "model_not_ready",
            ctx.rid,
            self.cfg.retry_after_s,
        )

    def _next_target(self, plan: Plan, tried: set[str], ctx: Ctx) -> Target | None:
        """Local instances in rotation first (least in-flight); then other nodes by route
        weight; then local READY ones whose last probe failed (a slow probe answer, or a server
        about to be restarted: better than a 503 while nothing else can serve)."""
        local = self._pick_local(plan, tried, ctx, suspect_ok=False)
        if local is not None:
            return local
        if plan.route is not None:
            candidates = self.remote.candidates(plan.route, self.upstreams.gpu_classes(), tried)
            if (remote := self._pick_remote(plan, candidates, ctx)) is not None:
                return remote
        return self._pick_local(plan, tried, ctx, suspect_ok=True)

    def _pick_remote(self, plan: Plan, candidates: list[tuple[RemoteTarget, int]], ctx: Ctx) -> RemoteTarget | None:
        in_flight = self.stats.in_flight
        if plan.session is not None and candidates:
            sticky = self._sticky(plan.session, candidates, lambda t: in_flight(t.name))
            if sticky is not None:
                return sticky
        return self.remote.pick(ctx.model or "", candidates, lambda t: in_flight(t.name), self.cfg.remote_balance)

    def _sticky(self, session: str, keys: Sequence[tuple[K, int]], load: Callable[[K], int]) -> K | None:
        """The session's target, unless it has affinity_max_extra more in flight than the
        least busy one (then the request goes by load, and the session sticks again later)."""
        target = affine(session, keys, lambda k: k.name)  # type: ignore[attr-defined]
        if target is None:
            return None
        least = min(load(k) for k, _ in keys)
        return target if load(target) <= least + self.cfg.affinity_max_extra else None

    def _pick_local(self, plan: Plan, tried: set[str], ctx: Ctx, *, suspect_ok: bool) -> LocalUpstream | None:
        in_flight = self.stats.in_flight
        ready = [
            i for i in plan.serving if i.name not in tried and i.routable(in_flight(i.name), suspect_ok=suspect_ok)
        ]
        if plan.group is not None:
            grouped = [i for i in ready if i.name in plan.group]
            ready = grouped if grouped or not self.cfg.task_route_fallback else ready
        if plan.session is not None and len(ready) > 1:
            sticky = self._sticky(plan.session, [(i, 1) for i in ready], lambda i: in_flight(i.name))
            if sticky is not None:
                return sticky
        return self.picker.pick(ctx.model or "", ready, in_flight)

    def _abandon_if_gone(self, target: Target, ctx: Ctx) -> contextlib.AbstractContextManager[object]:
        """What ends an attempt on ``target`` early: its instance leaving rotation, or its node
        going DOWN in the routes (none in standalone mode)."""
        answered = lambda: ctx.ttfb is not None  # noqa: E731
        if not isinstance(target, RemoteTarget):
            return AbandonIfGone(target, target.name, "instance_down", answered)
        routes = self.upstreams.routes
        if routes is None:
            return contextlib.nullcontext()
        return AbandonIfGone(routes.node_gone(target.node), target.name, "node_down", answered)

    def _failed(self, target: Target, f: Failure, ctx: Ctx) -> None:
        """Count a failed attempt, and report it to the target's health."""
        if f.counted:
            self.relay.count_error(target, ctx)
        self.metrics.upstream_errors.labels(ctx.model, target.name, f.kind).inc()
        log.warning("upstream attempt failed", request_id=ctx.rid, instance=target.name, kind=f.kind, detail=f.detail)
        if f.kind not in (BUSY, CAPACITY):
            target.request_probe()  # active health: look at it now / steer away from it
        if f.kind not in GATEWAY_FAILURES or isinstance(target, RemoteTarget):
            return
        if target.report_failure(f.detail, f.kind == "status_5xx"):
            self.metrics.ejections.labels(ctx.model, target.name).inc()

    def _account(self, request: Request, ctx: Ctx) -> None:
        if self.key_gate is not None:
            self.key_gate.finish(ctx)
        duration = time.monotonic() - ctx.started
        self.metrics.observe(ctx.model_label, ctx.status, duration, ctx.ttfb)
        if ctx.cfg.access_log:
            self.access_log.record(
                request_id=ctx.rid,
                method=request.method,
                path=request.path,
                model=ctx.model,
                instance=ctx.instance,
                status=ctx.status,
                stream=ctx.stream,
                ttfb_ms=None if ctx.ttfb is None else round(ctx.ttfb * 1000, 2),
                duration_ms=round(duration * 1000, 2),
                retries=ctx.retries,
                **({"key": ctx.key_name} if ctx.key_name else {}),
                **({"stream_error": True} if ctx.stream_error else {}),
                **({"degraded": ctx.degraded} if ctx.degraded else {}),
            )


class Watched(Protocol):
    """What an attempt watches: its instance's rotation, or its node's gone flag."""

    def watch(self, on_leave: Callable[[], None]) -> None: ...
    def unwatch(self, on_leave: Callable[[], None]) -> None: ...


# Why an attempt was abandoned, by Failure kind: the detail's text, with the target's name.
_LEFT = {
    "instance_down": "{}: left rotation before it answered",
    "node_down": "{}: its node went DOWN in the routes before it answered",
}


class AbandonIfGone:
    """Around an attempt: if its target goes away before the attempt has answered — a local
    instance leaves rotation (a failed probe, an ejection), another node goes DOWN in the routes
    (behind a silent partition nothing else would end the attempt before the total deadline) —
    the attempt is abandoned with ``Failure(kind)``, which the attempt loop retries elsewhere.

    The attempt runs in this task, and the target going away cancels the task: a callback per
    attempt, not a watcher task (or two) per request, and a ``with`` block rather than a
    coroutine around the attempt (no frame per request). The cancellation lands at the attempt's
    current await, which is before its first byte (``answered()`` was false when it was asked
    for), so nothing reaches the client. ``uncancel`` tells our cancellation apart from the
    client's leaving at the same time. Once something has answered, the attempt runs to its end."""

    __slots__ = ("_answered", "_kind", "_name", "_task", "_watched", "abandoned")

    def __init__(self, watched: Watched, name: str, kind: str, answered: Callable[[], bool]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watched = watched
        self._name = name
        self._kind = kind  # a key of _LEFT
        self._answered = answered
        self.abandoned = False

    def _on_leave(self) -> None:
        if not self.abandoned and not self._answered():
            self.abandoned = True
            self._task.cancel()

    def __enter__(self) -> AbandonIfGone:
        self._watched.watch(self._on_leave)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._watched.unwatch(self._on_leave)
        if not self.abandoned:
            return
        if exc_type is not asyncio.CancelledError:
            self._task.uncancel()  # the attempt swallowed it and ended after all
        elif self._task.uncancel() == 0:
            raise Failure(self._kind, None, _LEFT[self._kind].format(self._name)) from None


PROXY_KEY = web.AppKey("proxy", Proxy)  # the app's proxy, for the front protocol (front.py)


def add_proxy(app: web.Application, proxy: Proxy) -> None:
    """The proxy's routes on ``app`` (aiohttp's server in front: the in-process tests, bench,
    and connections the agent's front protocol handed to aiohttp); its upstream client opens
    with the app (the runner's setup) and closes with it (its cleanup)."""

    async def session(_: web.Application) -> AsyncIterator[None]:
        await proxy.start()
        yield
        await proxy.close()

    app.cleanup_ctx.append(session)
    app[PROXY_KEY] = proxy

    async def models(request: web.Request) -> web.Response:
        answer = await proxy.models(AiohttpRequest(request))
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    def forward(anthropic: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            sink = AiohttpSink(request)
            await proxy.forward(AiohttpRequest(request), sink, anthropic=anthropic)
            assert sink.response is not None
            return sink.response

        return handle

    app.router.add_get("/v1/models", models)
    for path in ROUTES:
        app.router.add_post(path, forward(path in ANTHROPIC_ROUTES))
