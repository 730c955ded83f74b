"""Where a request goes once the proxy knows its model: the model's concurrency gate, then
attempt after attempt until one answers.

A failure before the first response byte (connect error, 5xx, 429, no first byte within its
limit, the instance leaving rotation, its node going DOWN) is retried on another instance within
a bounded number of attempts and time; after the first byte nothing is retried (the client has
part of an answer). One attempt, and the bytes of its answer, are relay.py's. Gateway failures on
a local instance are reported back through the ``Upstreams`` interface: they feed the instance's
passive health (outlier ejection, supervisor/supervision_policy.py).

The attempt loop's state is a :class:`Tries`, so that the fast lane (fastlane.py), which makes a
request's first attempt by callbacks, can hand a failed one to the loop here with what it tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

import structlog
from aiohttp import web

from agent.config import ProxySection
from gpufleet.facts import REQUEST_ID_HEADER
from gpufleet.httperrors import error_response

from .context import Ctx, Failure, Plan, retry_later
from .exchange import Answer, Request, Sink
from .limits import ModelGate, QueueFull
from .metrics import ProxyMetrics
from .relay import BUSY, CAPACITY, Relay, Target
from .remote import RemotePicker, RemoteTarget
from .routing import K, Picker, affine, name_of
from .stats import ProxyStats
from .upstreams import LocalUpstream, Upstreams

log = structlog.get_logger("agent.proxy")
# Failures that say the instance is not serving (Envoy's "gateway failures"): passive health.
GATEWAY_FAILURES = frozenset({"connect", "status_5xx", "timeout", "midstream"})
# The client waited for an answer that never came: retried even past retry_budget_s.
ABANDONED = frozenset({"node_down", "instance_down", "timeout"})


class Tries:
    """The attempt loop's state: targets tried, the last failure, timeouts so far, and when the
    retry budget runs out."""

    __slots__ = ("last", "retry_deadline", "timeouts", "tried")

    def __init__(self, ctx: Ctx) -> None:
        self.tried: set[str] = set()
        self.last: Failure | None = None
        self.timeouts = 0
        self.retry_deadline = ctx.started + ctx.held + ctx.cfg.retry_budget_s


class Dispatcher:
    def __init__(self, upstreams: Upstreams, relay: Relay, stats: ProxyStats, metrics: ProxyMetrics) -> None:
        self.upstreams = upstreams
        self.relay = relay
        self.stats = stats
        self.metrics = metrics
        self.picker = Picker()
        self.remote = RemotePicker(upstreams.node_id)
        self.gates: dict[str, ModelGate] = {}

    @property
    def cfg(self) -> ProxySection:
        return self.upstreams.proxy_cfg  # read live, so a reload applies

    def queued(self) -> dict[str, int]:
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

    def _overflows(self, plan: Plan, gate: ModelGate | None) -> bool:
        """Should the local instances wait until no other node can take the request? When
        remote capacity exists: a drained node sends new work away, and a saturated model
        overflows to other nodes instead of queueing here. Asked for every request: whether
        another node could take it is looked at last, only for a node drained or saturated."""
        if plan.route is None:
            return False
        routes = self.upstreams.routes
        drained = routes is not None and routes.drained
        if not drained and (gate is None or gate.active < gate.max_concurrency):
            return False
        return bool(self.remote.eligible(plan.route, self.upstreams.gpu_classes()))

    def dispatch(self, request: Request, sink: Sink, body: bytes, plan: Plan, ctx: Ctx) -> Coroutine[Any, Any, Answer]:
        """Through the model's concurrency gate (local instances only) to the attempts (await it
        at once: the request is in flight from this call; ``gated``'s coroutine, no frame
        around it)."""
        return self.gated(request, sink, body, plan, ctx, self.enter(plan), Tries(ctx))

    def enter(self, plan: Plan) -> ModelGate | None:
        """The request is in flight for ``plan.model`` until ``leave``; the gate it must pass
        before a local attempt (None: none, or only other nodes may serve it now)."""
        gate = self.gate(plan.model) if plan.serving else None
        if self._overflows(plan, gate):
            plan.deferred, plan.serving = plan.serving, []
        in_flight = self.metrics.in_flight
        in_flight[plan.model] = in_flight.get(plan.model, 0) + 1
        return gate if plan.serving else None

    def leave(self, plan: Plan) -> None:
        self.metrics.in_flight[plan.model] -= 1
        if plan.gate is not None:
            plan.gate.release()
            plan.gate = None

    async def gated(
        self, request: Request, sink: Sink, body: bytes, plan: Plan, ctx: Ctx, gate: ModelGate | None, tries: Tries
    ) -> Answer:
        """Through ``gate`` (if any) to the attempts; the request leaves when they end."""
        try:
            if gate is not None and (refused := await self._enter_gate(gate, plan, ctx)):
                return refused
            return await self.attempts(request, sink, body, plan, ctx, tries)
        finally:
            self.leave(plan)

    async def resume(
        self,
        request: Request,
        sink: Sink,
        body: bytes,
        plan: Plan,
        ctx: Ctx,
        tries: Tries,
        target: Target,
        outcome: Failure | Callable[[], Awaitable[Answer]],
    ) -> Answer:
        """The fast lane's request from its first attempt on ``target``, as ``gated`` would have
        gone on: that attempt's ``outcome`` is a Failure, or the rest of it to await (an SSE
        answer, or its request to send again on a new connection)."""
        try:
            failure = outcome
            if not isinstance(failure, Failure):
                try:
                    with self.abandon_if_gone(target, ctx):
                        return await failure()
                except Failure as f:
                    failure = f
            if (given_up := self.after_failure(target, failure, tries, ctx)) is not None:
                return given_up
            return await self.attempts(request, sink, body, plan, ctx, tries)
        finally:
            self.leave(plan)

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

    async def attempts(self, request: Request, sink: Sink, body: bytes, plan: Plan, ctx: Ctx, tries: Tries) -> Answer:
        """Attempt after attempt, each on an upstream not tried yet, until one answers or the
        request runs out of candidates, attempts or budget."""
        while True:
            target = self.next_target(plan, tries.tried, ctx)
            if target is None and plan.deferred:
                if refused := await self._serve_deferred(plan, ctx):
                    return refused
                continue
            if target is None:
                return ctx.done(self._unavailable(plan, tries.last, ctx))
            tries.tried.add(target.name)
            ctx.instance = target.name
            try:
                with self.abandon_if_gone(target, ctx):  # inline: a frame less per stream
                    return await self.relay.attempt(request, sink, body, target, ctx)
            except Failure as f:
                if (given_up := self.after_failure(target, f, tries, ctx)) is not None:
                    return given_up

    def after_failure(self, target: Target, f: Failure, tries: Tries, ctx: Ctx) -> Answer | None:
        """Count the failed attempt on ``target``; the answer if no retry is left, else None."""
        tries.last = f
        self._failed(target, f, ctx)
        tries.timeouts += f.kind == "timeout"
        if self._out_of_retries(f, len(tries.tried), tries.timeouts, tries.retry_deadline):
            return ctx.done(self._given_up(f, ctx))
        ctx.retries += 1
        self.metrics.retries.labels(ctx.model).inc()
        return None

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

    def next_target(self, plan: Plan, tried: AbstractSet[str], ctx: Ctx) -> Target | None:
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
            home = self.remote.home(plan.session, candidates)
            sticky = self._sticky(home, candidates, lambda t: in_flight(t.name))
            if sticky is not None:
                return sticky
        return self.remote.pick(ctx.model or "", candidates, lambda t: in_flight(t.name), self.cfg.remote_balance)

    def _sticky(self, home: K | None, keys: Sequence[tuple[K, int]], load: Callable[[K], int]) -> K | None:
        """The session's ``home`` among ``keys``, unless it has affinity_max_extra more in flight
        than the least busy one (then the request goes by load, and the session sticks again
        later). Most homes are within that margin of none in flight, which no key is below: the
        others' loads are looked at only when not."""
        if home is None:
            return None
        extra, mine = self.cfg.affinity_max_extra, load(home)
        if mine <= extra:
            return home
        least = min(load(k) for k, _ in keys)
        return home if mine <= least + extra else None

    def _pick_local(self, plan: Plan, tried: AbstractSet[str], ctx: Ctx, *, suspect_ok: bool) -> LocalUpstream | None:
        in_flight = self.stats.in_flight
        ready = [
            i for i in plan.serving if i.name not in tried and i.routable(in_flight(i.name), suspect_ok=suspect_ok)
        ]
        if plan.group is not None:
            grouped = [i for i in ready if i.name in plan.group]
            ready = grouped if grouped or not self.cfg.task_route_fallback else ready
        if plan.session is not None and len(ready) > 1:
            keys = [(i, 1) for i in ready]
            sticky = self._sticky(affine(plan.session, keys, name_of), keys, lambda i: in_flight(i.name))
            if sticky is not None:
                return sticky
        return self.picker.pick(ctx.model or "", ready, in_flight)

    def gone_watch(self, target: Target) -> tuple[Watched, str] | None:
        """What ends an attempt on ``target`` early, and the Failure kind it makes: its instance
        leaving rotation, or its node going DOWN in the routes (none in standalone mode)."""
        if not isinstance(target, RemoteTarget):
            return target, "instance_down"
        routes = self.upstreams.routes
        if routes is None:
            return None
        return routes.node_gone(target.node), "node_down"

    def abandon_if_gone(self, target: Target, ctx: Ctx) -> contextlib.AbstractContextManager[object]:
        watch = self.gone_watch(target)
        if watch is None:
            return contextlib.nullcontext()
        return AbandonIfGone(watch[0], target.name, watch[1], lambda: ctx.ttfb is not None)

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


class Watched(Protocol):
    """What an attempt watches: its instance's rotation, or its node's gone flag."""

    def watch(self, on_leave: Callable[[], None]) -> None: ...
    def unwatch(self, on_leave: Callable[[], None]) -> None: ...


# Why an attempt was abandoned, by Failure kind: the detail's text, with the target's name.
_LEFT = {
    "instance_down": "{}: left rotation before it answered",
    "node_down": "{}: its node went DOWN in the routes before it answered",
}


def gone_failure(kind: str, name: str) -> Failure:
    """The Failure of an attempt abandoned because its target went away (``gone_watch``)."""
    return Failure(kind, None, _LEFT[kind].format(name))


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
            raise gone_failure(self._kind, self._name) from None
