"""The OpenAI-compatible proxy on the agent's port: one request, step by step.

A request is read and its ``model`` and ``stream`` decoded (nothing else), its key checked, its
route and cold start waited for, degradation applied (degrade.py), then dispatched (dispatch.py)
to an instance of the model: local ones in rotation first, then other nodes by the route table
(remote.py), retried before the first response byte. ``Upstreams`` (upstreams.py) is all the
proxy knows of the rest of the agent. The proxy's counters are its own (stats.py).

Two ways through the same steps: ``forward``, a coroutine (a task per request), and
``forward_now``, the fast lane (fastlane.py): for a request whose body is here and that nothing
before its first attempt makes wait, the steps run at once and the attempt by callbacks.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import structlog
from aiohttp import web

from agent.config import ProxySection
from agent.keys.gate import KeyGate, Refusal
from gpufleet.facts import REQUEST_ID_HEADER
from gpufleet.httperrors import error_response, json_response
from gpufleet.keyspace.records import RouteRecord
from gpufleet.routeslices import has_ready

from .accesslog import AccessEntry, AccessLog
from .coldstart import ColdStart
from .context import (
    ANTHROPIC_ROUTES,
    FORM_ROUTES,
    ROUTES,
    UNKNOWN_MODEL_LABEL,
    Ctx,
    Head,
    Plan,
    new_request_id,
    parse_head,
    retry_later,
)
from .degrade import FALLBACK_REQUEST_HEADER, Degrader
from .dispatch import Dispatcher
from .exchange import (
    AiohttpRequest,
    AiohttpSink,
    Answer,
    BodyTooLarge,
    BodyUnreadable,
    NowSink,
    Request,
    Sink,
    answer_of,
)
from .fastlane import FastRequest
from .metrics import ProxyMetrics
from .relay import Relay
from .remote import HOPS_HEADER, MAX_HOPS, hops_of
from .routing import classify_task, task_route_group
from .stats import ProxyStats
from .surface import labelled
from .upstreams import LocalUpstream, Upstreams

log = structlog.get_logger("agent.proxy")


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
        self.degrader = Degrader(upstreams, self.stats)
        self.relay = Relay(upstreams, self.stats, metrics, self.degrader, key_gate, peer_ssl)
        self.dispatcher = Dispatcher(upstreams, self.relay, self.stats, metrics)
        self.access_log = AccessLog()
        metrics.degradation_level.set_function(self.degrader.level)
        metrics.watch_state(self.stats, lambda: self.degrader.cache, self.dispatcher.queued)

    @property
    def cfg(self) -> ProxySection:
        return self.upstreams.proxy_cfg  # read live, so a reload applies

    async def start(self) -> None:
        await self.relay.start()

    async def close(self) -> None:
        self.access_log.flush()
        await self.relay.close()

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

    def forward(self, request: Request, sink: Sink, *, anthropic: bool = False) -> Coroutine[Any, Any, Answer]:
        """Serve one request of a proxied route (await it); the answer goes out through ``sink``
        (a stream as it is relayed, a whole answer at the end). ``anthropic``: one of
        ANTHROPIC_ROUTES. Not a coroutine itself: ``run``'s, without a frame around it that
        every event of a stream would pass through."""
        ctx = self._new_ctx(request)
        return self.run(request, sink, ctx, self._forward(request, sink, ctx), anthropic)

    async def run(self, request: Request, sink: Sink, ctx: Ctx, work: Awaitable[Answer], anthropic: bool) -> Answer:
        """``work`` (the pipeline, or what the fast lane left of it) to the request's answer,
        sent through ``sink`` unless a stream sent it; accounted however it ends."""
        try:
            answer = await work
        except asyncio.CancelledError:
            ctx.status = 499  # client went away (nginx's code); upstream was cancelled with us
            raise
        finally:
            self.finish(request, ctx)
        if not answer.sent:  # a stream's headers went out with the relayed answer's
            await sink.send(self.labelled(answer, anthropic))
        return answer

    def finish(self, request: Request, ctx: Ctx) -> None:
        """The request is over (its answer is about to go out): its demand ends, and it is
        counted and logged."""
        if self.cold_start is not None:
            self.cold_start.end(ctx)  # its model was wanted while it lasted
        self._account(request, ctx)

    def labelled(self, answer: Answer, anthropic: bool) -> Answer:
        return labelled(answer, self.upstreams.node_id, anthropic=anthropic)

    def _new_ctx(self, request: Request) -> Ctx:
        rid = request.header(REQUEST_ID_HEADER) or new_request_id()
        return Ctx(rid, time.monotonic(), self.cfg, self.relay.deadlines.now())

    # --- the fast lane ------------------------------------------------------------------------

    def forward_now(self, request: Request, body: bytes, sink: NowSink, *, anthropic: bool = False) -> None:
        """Serve a request whose whole ``body`` is here: answered at once (``sink.send_now``), or
        under way by callbacks (``sink.answering``: the fast lane, fastlane.py) when no step
        before its first attempt has to wait (a stream too, relayed from its answer's head); else
        the coroutine pipeline in a task (``sink.carry_on``), its body already parsed."""
        ctx = self._new_ctx(request)
        try:
            head = self._parsed(request, body, ctx)
            forwarded = request.header(HOPS_HEADER) is not None
            if self._must_wait(head.model, forwarded):
                sink.carry_on(self.run(request, sink, ctx, self._forward(request, sink, ctx, (body, head)), anthropic))
                return
            body = self._authorize(request, body, head, ctx)
            self._entered(request, forwarded, ctx)
            if self.cold_start is not None:  # _must_wait: it would not hold the request
                self.cold_start.note(head.model, ctx)
            serving, route = self._known(head.model, ctx)
            plan = self._plan(request, body, head.model, serving, route, ctx)
        except _Reply as r:
            answer = ctx.done(r.response)
            self.finish(request, ctx)
            sink.send_now(self.labelled(answer, anthropic))
            return
        FastRequest(self, request, sink, body, plan, ctx, anthropic).start()

    def _must_wait(self, model: str, forwarded: bool) -> bool:
        """Would a step before the attempts wait or change the request: the route not followed
        yet, a cold start to hold it, degradation (its cache may answer, or a fallback serve)?
        Looks only: the steps are ``_forward``'s."""
        routes = self.upstreams.routes
        if routes is not None and not routes.want_now(model):
            return True
        if self.cold_start is not None and self.cold_start.would_hold(model, wait=not forwarded):
            return True
        return not forwarded and self.degrader.level() != 0

    # --- one request, step by step ------------------------------------------------------------

    async def _forward(
        self, request: Request, sink: Sink, ctx: Ctx, parsed: tuple[bytes, Head] | None = None
    ) -> Answer:
        """The pipeline, step by step (``parsed``: the body and its head, already read)."""
        try:
            body, head = parsed if parsed is not None else await self._read_head(request, ctx)
            body = self._authorize(request, body, head, ctx)
            forwarded = request.header(HOPS_HEADER) is not None  # another node sent it
            self._entered(request, forwarded, ctx)
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
            return await self.dispatcher.dispatch(request, sink, body, plan, ctx)
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
        return body, self._parsed(request, body, ctx)

    def _parsed(self, request: Request, body: bytes, ctx: Ctx) -> Head:
        """The ``model`` and ``stream`` the body asks for; 400 if it is not a request."""
        path = request.path
        content_type = (request.header("Content-Type") or "") if path in FORM_ROUTES else ""  # a form's boundary
        head = parse_head(body, path, content_type)
        if not isinstance(head, Head):
            self.metrics.rejected.labels("bad_request").inc()
            head.headers[REQUEST_ID_HEADER] = ctx.rid
            raise _Reply(head)
        ctx.model, ctx.stream = head.model, head.stream
        return head

    def _authorize(self, request: Request, body: bytes, head: Head, ctx: Ctx) -> bytes:
        """The key check (401/403/429/503 end the request); the body to send on."""
        if self.key_gate is None:
            return body
        try:
            return self.key_gate.admit(request, body, head, hops_of(request.header(HOPS_HEADER)), ctx)
        except Refusal as r:
            raise _Reply(r.response) from None

    def _entered(self, request: Request, forwarded: bool, ctx: Ctx) -> None:
        """Count a request entering the cluster here, unless another node ``forwarded`` it (it
        was counted there, and attempts for a fallback there are not counted here either)."""
        if not forwarded:
            self.stats.counters.requests += 1
        elif request.header(FALLBACK_REQUEST_HEADER) is not None:
            ctx.counted = False

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
            plan.session = request.header(cfg.affinity_header) or None
        if route is not None and hops_of(request.header(HOPS_HEADER)) < MAX_HOPS:
            plan.route = route
        task_routes = cfg.task_routes
        plan.group = task_route_group(task_routes, model, classify_task(body)) if task_routes else None
        return plan

    def _account(self, request: Request, ctx: Ctx) -> None:
        if self.key_gate is not None:
            self.key_gate.finish(ctx)
        duration = time.monotonic() - ctx.started
        self.metrics.note(ctx.model_label, ctx.status, duration, ctx.ttfb)
        if ctx.cfg.access_log:
            # Positional: the entry is made once per request (see accesslog.py).
            entry = AccessEntry(
                ctx.rid, request.method, request.path, ctx.model, ctx.instance, ctx.status, ctx.stream,
                ctx.ttfb, duration, ctx.retries, ctx.key_name, ctx.stream_error, ctx.degraded,
            )  # fmt: skip
            self.access_log.write(entry)


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
