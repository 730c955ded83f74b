"""The OpenAI-compatible proxy on the agent's port.

Bytes go through untouched: the request body is forwarded as received (we decode only
``model`` and ``stream``), SSE chunks are written to the client as they arrive, each in its own
write, never re-serialised (LiteLLM's re-serialisation is where its 3–12 ms go). A failure
before the first response byte (connect error, 5xx, 429, no first byte within its limit, the
instance leaving rotation) is retried on another instance of the model in rotation within a
bounded number of attempts and time; after the first byte nothing is retried (the client has
part of an answer), and a dying upstream ends an SSE stream with an error event. Gateway
failures on a local instance feed its passive health (outlier ejection, supervisor/supervision_policy.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiohttp
import msgspec
import structlog
from aiohttp import web
from multidict import CIMultiDict

from agent.backends import Verdict
from agent.config import ProxySection
from agent.supervisor.supervision_policy import InstanceState
from gpufleet.facts import REQUEST_ID_HEADER
from gpufleet.httperrors import error_response, json_response
from gpufleet.keyspace.records import RouteRecord

from .context import (
    HOP_BY_HOP,
    REQUEST_HOP_BY_HOP,
    ROUTES,
    UNKNOWN_MODEL_LABEL,
    Ctx,
    Failure,
    Head,
    Plan,
    parse_head,
)
from .degrade import DEGRADED_HEADER, DOWNGRADED_HEADER, FALLBACK_REQUEST_HEADER, Degrader
from .limits import ModelGate, QueueFull
from .metrics import ProxyMetrics
from .remote import HOPS_HEADER, MAX_HOPS, RemotePicker, RemoteTarget, hops_of, unless_node_leaves
from .routing import Picker, classify_task, task_route_group

if TYPE_CHECKING:
    from agent.daemon import AgentRuntime
    from agent.supervisor import Instance

log = structlog.get_logger("agent.proxy")
# Failure kinds (and metric labels) of an instance that is full, not failing: not probed.
BUSY = "status_429"  # it said 429: counts toward the error rate (overload is what degrades)
CAPACITY = "capacity"  # its backend knows the request did not fit right now: counts nothing
# Failures that say the instance is not serving (Envoy's "gateway failures"): passive health.
GATEWAY_FAILURES = frozenset({"connect", "status_5xx", "timeout", "midstream"})
# The client waited for an answer that never came: retried even past retry_budget_s.
ABANDONED = frozenset({"node_down", "instance_down", "timeout"})
access = structlog.get_logger("agent.access")
T = TypeVar("T")


class Proxy:
    def __init__(self, rt: AgentRuntime, metrics: ProxyMetrics) -> None:
        self.rt = rt
        self.metrics = metrics
        self.picker = Picker()
        self.remote = RemotePicker(rt.cfg.node_id)
        self.degrader = Degrader(rt)
        metrics.degradation_level.set_function(self.degrader.level)
        metrics.watch_ejected(
            lambda: [(i.cfg.client_model, i.name, i.ejected) for i in rt.supervisor.instances.values()]
        )
        self.gates: dict[str, ModelGate] = {}
        metrics.watch_state(lambda: self.degrader.cache, self._queued)
        self.session: aiohttp.ClientSession | None = None

    @property
    def cfg(self) -> ProxySection:
        return self.rt.cfg.proxy  # read live, so a reload applies

    async def start(self) -> None:
        c = self.cfg
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=c.connect_timeout_s),
            auto_decompress=False,  # pass compressed bodies through as they are
            cookie_jar=aiohttp.DummyCookieJar(),
            read_bufsize=2**16,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

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

    async def models(self, _: web.Request) -> web.Response:
        seen: dict[str, Instance] = {}
        for inst in self.rt.supervisor.instances.values():
            if inst.state is InstanceState.READY:
                seen.setdefault(inst.cfg.client_model, inst)
        data = [
            {"id": m, "object": "model", "created": int(i.state_since), "owned_by": "gpufleet", "root": i.cfg.model}
            for m, i in sorted(seen.items())
        ]
        if self.rt.routes is not None:  # models served elsewhere in the cluster, reachable through us
            for m, route in sorted(self.rt.routes.routes.items()):
                if m not in seen and any(e.state == "READY" and e.weight > 0 for e in route.endpoints):
                    data.append({"id": m, "object": "model", "created": int(route.updated_at), "owned_by": "gpufleet"})
        return json_response({"object": "list", "data": data})

    async def forward(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        ctx = Ctx(rid=rid, started=started)
        try:
            resp = await self._forward(request, ctx)
        except asyncio.CancelledError:
            ctx.status = 499  # client went away (nginx's code); upstream was cancelled with us
            raise
        finally:
            self._account(request, ctx)
        return resp

    async def _forward(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.metrics.rejected.labels("too_large").inc()
            return ctx.done(
                error_response(
                    413,
                    f"request body larger than {self.cfg.max_body_bytes} bytes",
                    "invalid_request_error",
                    "body_too_large",
                    {REQUEST_ID_HEADER: ctx.rid},
                )
            )
        head = parse_head(body)
        if isinstance(head, web.Response):
            self.metrics.rejected.labels("bad_request").inc()
            head.headers[REQUEST_ID_HEADER] = ctx.rid
            return ctx.done(head)
        ctx.model, ctx.stream = head.model, head.stream
        forwarded = HOPS_HEADER in request.headers
        if not forwarded:
            self.rt.proxy_counters.requests += 1
        elif FALLBACK_REQUEST_HEADER in request.headers:
            ctx.counted = False
        serving, route = self._serving(head.model)
        if not serving and route is None:
            ctx.model_label = UNKNOWN_MODEL_LABEL
            return ctx.done(
                error_response(
                    404,
                    f"The model `{head.model}` does not exist.",
                    "invalid_request_error",
                    "model_not_found",
                    {REQUEST_ID_HEADER: ctx.rid},
                )
            )
        ctx.model_label = head.model
        applied = self.degrader.plan(request, body, head.model, forwarded)
        if applied.level:
            if applied.level >= 3:
                return self._degraded(ctx, "static", self.degrader.static_response(ctx.rid))
            hit = self.degrader.cached(applied.cache_key)
            if hit is not None:
                return self._degraded(ctx, "cache", await self.degrader.replay(request, hit, ctx.rid))
            ctx.cache_key = applied.cache_key
            if applied.fallback is not None and applied.body is not None:
                self._count_degraded(ctx, "fallback")
                ctx.downgraded, ctx.counted = applied.fallback, False
                body, head = applied.body, Head(applied.fallback, head.stream)
                serving, route = self._serving(head.model)
        plan = Plan(serving=serving, route=None)
        if route is not None and hops_of(request.headers.get(HOPS_HEADER)) < MAX_HOPS:
            plan.route = route
        task_routes = self.cfg.task_routes
        plan.group = task_route_group(task_routes, head.model, classify_task(body)) if task_routes else None
        gate = self.gate(head.model) if serving else None
        if plan.route is not None and self.remote.candidates(plan.route, self._own_classes(), set()):
            # Remote capacity exists: a drained node sends new work away, and a saturated
            # model overflows to other nodes instead of queueing here.
            drained = self.rt.routes is not None and self.rt.routes.drained
            if drained or (gate is not None and gate.active >= gate.max_concurrency):
                plan.deferred, plan.serving = plan.serving, []
        self.metrics.in_flight.labels(head.model).inc()
        try:
            if plan.serving and gate is not None and (refused := await self._enter_gate(gate, plan, ctx)):
                return refused
            return await self._attempts(request, body, plan, ctx)
        finally:
            self.metrics.in_flight.labels(head.model).dec()
            if plan.gate is not None:
                plan.gate.release()

    def _serving(self, model: str) -> tuple[list[Instance], RouteRecord | None]:
        """Local instances of ``model``, and its cluster route (None in standalone mode)."""
        serving = [i for i in self.rt.supervisor.instances.values() if i.cfg.client_model == model]
        return serving, self.rt.routes.route(model) if self.rt.routes is not None else None

    def _count_degraded(self, ctx: Ctx, kind: str) -> None:
        ctx.degraded = kind
        self.rt.proxy_counters.degraded += 1
        self.metrics.degraded.labels(kind).inc()

    def _degraded(self, ctx: Ctx, kind: str, resp: web.StreamResponse) -> web.StreamResponse:
        self._count_degraded(ctx, kind)
        return ctx.done(resp)

    async def _enter_gate(self, gate: ModelGate, plan: Plan, ctx: Ctx) -> web.Response | None:
        """Wait for a local slot (bounded queue); a response if refused, None once admitted."""
        try:
            async with asyncio.timeout_at(self._loop_deadline(ctx, self.cfg.ttfb_timeout_s)):
                await gate.acquire()
        except QueueFull as e:
            self.metrics.rejected.labels("queue_full").inc()
            return ctx.done(
                error_response(
                    429,
                    f"too many requests for {ctx.model}: {e}",
                    "rate_limit_error",
                    "queue_full",
                    {"Retry-After": str(self.cfg.retry_after_s), REQUEST_ID_HEADER: ctx.rid},
                )
            )
        except TimeoutError:
            return ctx.done(self._timeout_response(ctx, "waiting for a free slot"))
        plan.gate = gate
        return None

    def _own_classes(self) -> set[str]:
        return {g.gpu_class for g in self.rt.supervisor.gpus}

    def _next_target(self, plan: Plan, tried: set[str], ctx: Ctx) -> Instance | RemoteTarget | None:
        """Local instances in rotation first (least in-flight); then other nodes by route
        weight; then local READY ones whose last probe failed (a slow probe answer, or a server
        about to be restarted: better than a 503 while nothing else can serve)."""
        local = self._pick_local(plan, tried, ctx, suspect_ok=False)
        if local is not None:
            return local
        if plan.route is not None:
            candidates = self.remote.candidates(plan.route, self._own_classes(), tried)
            if (remote := self.remote.pick(ctx.model or "", candidates)) is not None:
                return remote
        return self._pick_local(plan, tried, ctx, suspect_ok=True)

    def _pick_local(self, plan: Plan, tried: set[str], ctx: Ctx, *, suspect_ok: bool) -> Instance | None:
        ready = [i for i in plan.serving if i.name not in tried and i.routable(suspect_ok=suspect_ok)]
        if plan.group is not None:
            grouped = [i for i in ready if i.name in plan.group]
            ready = grouped if grouped or not self.cfg.task_route_fallback else ready
        return self.picker.pick(ctx.model or "", ready)

    def _loop_deadline(self, ctx: Ctx, phase_s: float | None = None) -> float:
        """Event-loop time at which the current phase must end: the phase's own limit, capped by
        the request's total deadline."""
        end = ctx.loop_started + self.cfg.total_timeout_s
        if phase_s is not None:
            end = min(end, asyncio.get_running_loop().time() + phase_s)
        return end

    async def _attempts(self, request: web.Request, body: bytes, plan: Plan, ctx: Ctx) -> web.StreamResponse:
        retry_deadline = ctx.started + self.cfg.retry_budget_s
        tried: set[str] = set()
        last: Failure | None = None
        timeouts = 0
        while True:
            target = self._next_target(plan, tried, ctx)
            if target is None and plan.deferred:
                # No other node could take it: the local instances we set aside serve after all.
                plan.serving, plan.deferred = plan.deferred, []
                gate = self.gate(ctx.model or "")
                if gate is not None and (refused := await self._enter_gate(gate, plan, ctx)):
                    return refused
                continue
            if target is None:
                if last is not None and last.response is not None:
                    return ctx.done(last.response)
                states = ", ".join(f"{i.name} {i.state.value}" for i in plan.serving) or "no local instance"
                remote = " and no eligible remote endpoint" if plan.route is not None else ""
                return ctx.done(
                    error_response(
                        503,
                        f"no instance of {ctx.model} is ready ({states}){remote}",
                        "service_unavailable",
                        "model_not_ready",
                        {"Retry-After": str(self.cfg.retry_after_s), REQUEST_ID_HEADER: ctx.rid},
                    )
                )
            tried.add(target.name)
            ctx.instance = target.name
            try:
                return await self._try(request, body, target, ctx)
            except Failure as f:
                last = f
                self._failed(target, f, ctx)
                # Timeouts and targets that left under an attempt are retried even past the
                # budget: the client has waited for an answer that never came. A second timeout
                # is not: a request slow on two instances is likely slow itself (a huge prompt),
                # and a third try would only burn another prefill.
                timeouts += f.kind == "timeout"
                over_budget = time.monotonic() >= retry_deadline and f.kind not in ABANDONED
                if len(tried) >= self.cfg.max_attempts or over_budget or timeouts > 1:
                    if f.response is not None:
                        return ctx.done(f.response)
                    return ctx.done(
                        error_response(
                            502,
                            f"upstream failed: {f.detail}",
                            "server_error",
                            "upstream_error",
                            {REQUEST_ID_HEADER: ctx.rid},
                        )
                    )
                ctx.retries += 1
                self.metrics.retries.labels(ctx.model).inc()

    def _failed(self, target: Instance | RemoteTarget, f: Failure, ctx: Ctx) -> None:
        """Count a failed attempt, and tell the instance's health about it."""
        if f.counted:
            target.errors_total += 1
            if _counted(ctx, target):
                self.rt.proxy_counters.attempt_errors += 1
        self.metrics.upstream_errors.labels(ctx.model, target.name, f.kind).inc()
        log.warning("upstream attempt failed", request_id=ctx.rid, instance=target.name, kind=f.kind, detail=f.detail)
        if f.kind not in (BUSY, CAPACITY):
            target.request_probe()  # active health: look at it now / steer away from it
        local = not isinstance(target, RemoteTarget)
        if f.kind in GATEWAY_FAILURES and local and target.passive_failure(f.detail, f.kind == "status_5xx"):
            self.metrics.ejections.labels(ctx.model, target.name).inc()

    def _first_byte(self, inst: Instance | RemoteTarget, ctx: Ctx) -> None:
        """The upstream answered: the client gets this attempt's answer, whatever follows."""
        ctx.ttfb = time.monotonic() - ctx.started
        if not isinstance(inst, RemoteTarget):
            inst.passive_ok()

    async def _try(
        self, request: web.Request, body: bytes, inst: Instance | RemoteTarget, ctx: Ctx
    ) -> web.StreamResponse:
        """One attempt on one instance (local or on another node). Raises Failure while nothing
        has reached the client."""
        attempt = self._attempt(request, body, inst, ctx)
        if not isinstance(inst, RemoteTarget):
            return await unless_instance_leaves(attempt, inst, lambda: ctx.ttfb is not None)
        if self.rt.routes is None:
            return await attempt
        gone = self.rt.routes.node_gone(inst.node)
        return await unless_node_leaves(attempt, gone, lambda: ctx.ttfb is not None, inst.name)

    async def _attempt(
        self, request: web.Request, body: bytes, inst: Instance | RemoteTarget, ctx: Ctx
    ) -> web.StreamResponse:
        assert self.session is not None
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_HOP_BY_HOP)
        headers[REQUEST_ID_HEADER] = ctx.rid
        headers["X-Forwarded-For"] = request.remote or ""
        if isinstance(inst, RemoteTarget):
            headers[HOPS_HEADER] = str(hops_of(request.headers.get(HOPS_HEADER)) + 1)
            if ctx.downgraded is not None:
                headers[FALLBACK_REQUEST_HEADER] = ctx.model or ""
        headers.update(inst.upstream.headers)  # the instance's own API key, not the client's
        url = inst.base_url + request.path_qs
        inst.in_flight += 1
        inst.requests_total += 1
        if _counted(ctx, inst):
            self.rt.proxy_counters.attempts += 1
        # One timeout scope per attempt. A stream must show its first body chunk (the first
        # token: servers send headers at once) within ttfb_timeout_s; a non-streaming answer
        # (headers come with the whole answer) within response_timeout_s. Then the scope moves
        # out to the total deadline.
        limit_s = self._first_byte_limit(ctx, inst)
        scope = asyncio.timeout_at(self._loop_deadline(ctx, limit_s))
        try:
            async with scope:
                upstream = await self._post(url, body, headers, inst)
                async with upstream:
                    if upstream.status >= 400:
                        return self._error_answer(upstream, await self._read(upstream, inst), inst, ctx)
                    try:
                        if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                            # Hold the client's headers back until the first chunk is here: until
                            # then a dead upstream can still be retried elsewhere.
                            first = await upstream.content.readany()
                            if not first:
                                raise aiohttp.ClientPayloadError("stream closed before its first chunk")
                            self._first_byte(inst, ctx)
                            scope.reschedule(self._loop_deadline(ctx))
                            return await self._stream(request, upstream, first, inst, ctx, scope)
                        scope.reschedule(self._loop_deadline(ctx))  # its headers are here: answering
                        payload = await upstream.read()
                    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                        raise Failure("midstream", None, f"{inst.name}: answer cut off: {e}") from None
                    self._first_byte(inst, ctx)
                    headers = self._response_headers(upstream, ctx)
                    if ctx.cache_key is not None and upstream.status == 200:
                        self.degrader.store(ctx.cache_key, upstream.status, headers, payload)
                    return ctx.done(web.Response(status=upstream.status, body=payload, headers=headers))
        except TimeoutError:
            if scope.when() == ctx.loop_started + self.cfg.total_timeout_s:  # the total deadline
                limit_s = self.cfg.total_timeout_s
            what = f"no first chunk within {limit_s:g}s" if ctx.stream else f"no complete answer within {limit_s:g}s"
            raise Failure("timeout", self._timeout_response(ctx, what), f"{inst.name}: {what}") from None
        finally:
            inst.in_flight -= 1

    def _first_byte_limit(self, ctx: Ctx, inst: Instance | RemoteTarget) -> float:
        limit = self.cfg.ttfb_timeout_s if ctx.stream else self.cfg.response_timeout_s
        # Another node's proxy runs the same limit on its own instance and may retry once after
        # it: give it room for both, or we would give up just as its retry begins.
        return 2 * limit if isinstance(inst, RemoteTarget) else limit

    async def _post(
        self, url: str, body: bytes, headers: CIMultiDict[str], inst: Instance | RemoteTarget
    ) -> aiohttp.ClientResponse:
        """Send the request; a kept-alive connection the upstream closed as we reused it (it
        restarted, or its idle timeout fired) is retried once on a new connection, as nginx
        and browsers do: nothing was answered on it, and the same instance is fine."""
        assert self.session is not None
        for stale_retry in (True, False):
            try:
                return await self.session.post(url, data=body, headers=headers)
            except aiohttp.ClientConnectorError as e:  # refused, unreachable: the instance is not there
                raise Failure("connect", None, f"{inst.name}: {type(e).__name__}: {e}") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                if not stale_retry:
                    raise Failure("connect", None, f"{inst.name}: {type(e).__name__}: {e}") from None
                log.debug("upstream closed a kept-alive connection; retrying on a new one", instance=inst.name)
            except aiohttp.ClientConnectionError as e:
                raise Failure("connect", None, f"{inst.name}: {type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    async def _read(self, upstream: aiohttp.ClientResponse, inst: Instance | RemoteTarget) -> bytes:
        try:
            return await upstream.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            raise Failure("midstream", None, f"{inst.name}: answer cut off: {e}") from None

    def _error_answer(
        self, upstream: aiohttp.ClientResponse, payload: bytes, inst: Instance | RemoteTarget, ctx: Ctx
    ) -> web.Response:
        """An error status: the client's answer if the request was at fault (nothing counted,
        nothing retried), else a Failure to retry elsewhere. The backend decides which."""
        judgement = inst.judge(upstream.status, payload)
        status, body = judgement.rewrite or (upstream.status, payload)
        headers = self._response_headers(upstream, ctx)
        if judgement.rewrite is not None:
            headers["Content-Type"] = "application/json"
        resp = web.Response(status=status, body=body, headers=headers)
        if judgement.verdict is Verdict.ANSWER:
            self._first_byte(inst, ctx)
            return ctx.done(resp)
        if judgement.verdict is Verdict.BUSY:
            kind = BUSY if judgement.counted else CAPACITY
            raise Failure(kind, resp, f"{inst.name}: full, HTTP {upstream.status}", counted=judgement.counted)
        raise Failure("status_5xx", resp, f"{inst.name}: HTTP {upstream.status}: {payload[:200]!r}")

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        inst: Instance | RemoteTarget,
        ctx: Ctx,
        scope: asyncio.Timeout,
    ) -> web.StreamResponse:
        headers = self._response_headers(upstream, ctx)
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"  # tells nginx in front of us not to buffer either
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        ctx.done(resp)
        recorder = self.degrader.recorder() if ctx.cache_key is not None else None
        # Between chunks the upstream has stream_idle_timeout_s to send the next one: the scope
        # is pulled in around each read and put back to the total deadline around each write, so
        # a client slow to read is never taken for a stalled server.
        total, idle_s, loop = self._loop_deadline(ctx), self.cfg.stream_idle_timeout_s, asyncio.get_running_loop()
        try:
            await resp.write(first)
            if recorder is not None:
                recorder.add(first)
            while True:
                scope.reschedule(min(total, loop.time() + idle_s))
                chunk = await upstream.content.readany()
                if not chunk:
                    break
                scope.reschedule(total)
                await resp.write(chunk)  # one write per upstream chunk: no merging, no delay
                if recorder is not None:
                    recorder.add(chunk)
        except asyncio.CancelledError:
            if not scope.expired():
                raise  # the client went away: nobody to tell
            # Swallowing the cancellation is how an asyncio.Timeout scope is told we handled
            # it; the client gets an error event.
            if (scope.when() or total) >= total:
                await self._stream_error(resp, inst, ctx, "timeout", "total timeout exceeded mid-stream")
            else:
                await self._stream_stalled(resp, inst, ctx, idle_s)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            inst.request_probe()
            log.warning("upstream stream ended early", request_id=ctx.rid, instance=inst.name, error=str(e))
            await self._stream_error(resp, inst, ctx, "midstream", f"upstream instance {inst.name} failed mid-stream")
        if recorder is not None and ctx.cache_key is not None and not ctx.stream_error and upstream.status == 200:
            self.degrader.store_stream(ctx.cache_key, upstream.status, headers, recorder)
        await resp.write_eof()
        return resp

    async def _stream_stalled(
        self, resp: web.StreamResponse, inst: Instance | RemoteTarget, ctx: Ctx, idle_s: float
    ) -> None:
        """The upstream sent nothing for ``idle_s`` mid-stream: an engine hung after its first
        token. Nothing can be retried (the client has part of an answer); it counts against the
        instance like a timeout, so passive health ejects (and in the end restarts) it."""
        detail = f"{inst.name}: no data for {idle_s:g}s mid-stream"
        log.warning("upstream stream stalled", request_id=ctx.rid, instance=inst.name, idle_s=idle_s)
        inst.request_probe()
        if not isinstance(inst, RemoteTarget) and inst.passive_failure(detail):
            self.metrics.ejections.labels(ctx.model, inst.name).inc()
        await self._stream_error(resp, inst, ctx, "timeout", f"upstream sent nothing for {idle_s:g}s mid-stream")

    async def _stream_error(
        self, resp: web.StreamResponse, inst: Instance | RemoteTarget, ctx: Ctx, kind: str, message: str
    ) -> None:
        inst.errors_total += 1
        if _counted(ctx, inst):
            self.rt.proxy_counters.attempt_errors += 1
        ctx.stream_error = True
        self.metrics.upstream_errors.labels(ctx.model, inst.name, kind).inc()
        err = {"error": {"message": message, "type": "server_error", "code": "upstream_stream_error"}}
        await resp.write(b"data: " + msgspec.json.encode(err) + b"\n\n")

    def _response_headers(self, upstream: aiohttp.ClientResponse, ctx: Ctx) -> CIMultiDict[str]:
        h = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP)
        h.popall("Date", None)
        h.popall("Server", None)
        h[REQUEST_ID_HEADER] = ctx.rid
        if ctx.downgraded is not None:
            h[DOWNGRADED_HEADER] = ctx.downgraded
            h[DEGRADED_HEADER] = "fallback"
        return h

    def _timeout_response(self, ctx: Ctx, what: str) -> web.Response:
        return error_response(
            504, f"upstream timeout: {what}", "timeout_error", "upstream_timeout", {REQUEST_ID_HEADER: ctx.rid}
        )

    def _account(self, request: web.Request, ctx: Ctx) -> None:
        duration = time.monotonic() - ctx.started
        self.metrics.observe(ctx.model_label, ctx.status, duration, ctx.ttfb)
        if self.cfg.access_log:
            access.info(
                "request",
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
                **({"stream_error": True} if ctx.stream_error else {}),
                **({"degraded": ctx.degraded} if ctx.degraded else {}),
            )


def _counted(ctx: Ctx, target: Instance | RemoteTarget) -> bool:
    """Does this attempt count toward the cluster error rate? Each node counts attempts on its
    own instances only (a forwarded request is counted once, where it ran), and not those made
    for a fallback (``ctx.counted``)."""
    return ctx.counted and not isinstance(target, RemoteTarget)


class Watched(Protocol):
    name: str

    def watch(self, on_leave: Callable[[], None]) -> None: ...
    def unwatch(self, on_leave: Callable[[], None]) -> None: ...


async def unless_instance_leaves(attempt: Coroutine[Any, Any, T], inst: Watched, answered: Callable[[], bool]) -> T:
    """Run a local attempt; if its instance leaves rotation (a failed probe, an ejection)
    before the attempt has answered, abandon it with Failure("instance_down"), which the
    attempt loop retries elsewhere: a frozen server accepts connections and answers nothing.

    The attempt runs in this task, and leaving cancels the task: cheaper than a watcher task
    per request. The cancellation lands at the attempt's current await, which is before its
    first byte (``answered()`` was false when it was asked for), so nothing reaches the client.
    ``uncancel`` tells our cancellation apart from the client's leaving at the same time."""
    task = asyncio.current_task()
    assert task is not None
    abandoned = False

    def on_leave() -> None:
        nonlocal abandoned
        if not abandoned and not answered():
            abandoned = True
            task.cancel()

    inst.watch(on_leave)
    try:
        result = await attempt
    except asyncio.CancelledError:
        if abandoned and task.uncancel() == 0:
            raise Failure("instance_down", None, f"{inst.name}: left rotation before it answered") from None
        raise
    finally:
        inst.unwatch(on_leave)
    if abandoned:
        task.uncancel()  # the attempt swallowed it and answered after all
    return result


def add_proxy_routes(app: web.Application, proxy: Proxy) -> None:
    app.router.add_get("/v1/models", proxy.models)
    for path in ROUTES:
        app.router.add_post(path, proxy.forward)
