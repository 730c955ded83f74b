"""The fast lane: a request answered by callbacks, with no task, future or coroutine per request.

Most requests wait for nothing between their body arriving and their answer: the route is here,
no cold start holds them, no degradation applies, their model's gate has a free slot, a
kept-alive connection to the instance is pooled, and the instance answers once, whole. For those
the front protocol (front.py) calls ``Proxy.forward_now`` once the body is in; the proxy's steps
up to the plan run at once (server.py), and a :class:`FastRequest` makes the first attempt: the
request goes out on a pooled connection (``UpstreamClient.post_now``), whose parser tells the
FastRequest when the answer's head is here and when the answer is whole, and the answer goes out
through the front's ``send_now``. The attempt's time limit is this object filed on the relay's
Deadlines, and its target going away a watch callback: what a task's timeout scope and
``AbandonIfGone`` are to the coroutine pipeline. Per request that saves a task, three futures,
a timeout scope and about twenty coroutine frames created, resumed and unwound.

Anything else goes on in a task, from where the fast lane stopped, through the code the
coroutine pipeline runs (dispatch.py's ``gated`` and ``resume``, relay.py's ``carry_on``), so
there is one implementation of each rule:

- the gate has no free slot (the request queues), no connection to the target is pooled (one
  is made, for the same target), or no target is ready here (the loop serves deferred
  instances or answers 503);
- the attempt failed before its answer (an error status judged the instance's, its time limit,
  the connection lost, the target gone): the attempt loop retries elsewhere, knowing what was
  tried;
- the pooled connection was closed by the upstream as we reused it: the request is sent again,
  on a new connection, as ``post_lines`` does;
- the answer is an SSE stream: a coroutine relays it from its head.

Streaming requests (``"stream": true``) begin here too: their request goes out by callbacks, and a
coroutine relays the answer from its head (a stream is relayed chunk by chunk, with back-pressure
and its error events, in one place: relay.py). One rule for every request whose steps do not
wait; the first event's latency did not change measurably (docs/benchmarks.md, step 6).

A client that leaves cancels the FastRequest (the front calls ``cancel``, as it cancels a task):
its upstream connection closes, which makes vLLM abort the generation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from gpufleet.deadlines import Timed

from .context import Ctx, Failure, Plan
from .dispatch import Tries, Watched, gone_failure
from .exchange import Answer, NowSink, Request, internal_error
from .httpclient import Disconnected, Response, UpstreamError
from .relay import Outgoing, Target, connect_failure, cut_off, is_stream

if TYPE_CHECKING:
    from .server import Proxy

log = structlog.get_logger("agent.proxy")
_NONE_TRIED: frozenset[str] = frozenset()  # the lane's first attempt: nothing tried yet


class FastRequest(Timed):
    """One request in the fast lane (see the module docstring). Filed on the relay's Deadlines
    for its attempt's time limit; ``upstream`` is its attempt's answer while one runs."""

    __slots__ = (
        "anthropic",
        "body",
        "ctx",
        "gone_kind",
        "headers",
        "limit_s",
        "over",
        "plan",
        "proxy",
        "request",
        "sink",
        "target",
        "upstream",
        "watched",
    )

    def __init__(
        self, proxy: Proxy, request: Request, sink: NowSink, body: bytes, plan: Plan, ctx: Ctx, anthropic: bool
    ) -> None:
        super().__init__(0.0)
        self.proxy = proxy
        self.request = request
        self.sink = sink
        self.body = body
        self.plan = plan
        self.ctx = ctx
        self.anthropic = anthropic
        self.upstream: Response | None = None
        self.target: Target | None = None
        self.headers = b""
        self.limit_s = 0.0
        self.watched: Watched | None = None
        self.gone_kind = ""
        self.over = False  # answered, cancelled, or carried on in a task

    # --- the front's view: a task's cancel() and done() ---------------------------------------------

    def done(self) -> bool:
        return self.over

    def cancel(self) -> None:
        """The client left: the attempt's connection closes; accounted as 499 (nginx's code)."""
        if self.over:
            return
        self.over = True
        self._abandon()
        self.proxy.dispatcher.leave(self.plan)
        self.ctx.status = 499
        self.proxy.finish(self.request, self.ctx)

    # --- the first attempt ----------------------------------------------------------------------

    def start(self) -> None:
        """Through the gate to the first attempt, by callbacks if it can start now."""
        proxy, plan, ctx = self.proxy, self.plan, self.ctx
        dispatcher = proxy.dispatcher
        gate = dispatcher.enter(plan)
        if gate is not None and not gate.try_acquire():
            self._carry_on(dispatcher.gated(self.request, self.sink, self.body, plan, ctx, gate, self._tries()))
            return
        plan.gate = gate
        target = dispatcher.next_target(plan, _NONE_TRIED, ctx)
        relay = proxy.relay
        if target is None or relay.client is None:
            # Nothing ready here now: the loop serves deferred instances, or answers 503.
            self._carry_on(dispatcher.gated(self.request, self.sink, self.body, plan, ctx, None, self._tries()))
            return
        ctx.instance = target.name
        self.target = target
        self.headers = relay.request_headers(self.request, self.body, target, ctx)
        upstream = relay.client.post_now(target.base_url, self.request.path_qs, self.headers, self.body, self)
        if upstream is None:  # no idle connection: the attempt connects in a task (same target)
            request, sink, body = self.request, self.sink, self.body
            self._resume(lambda: relay.attempt(request, sink, body, target, ctx))
            return
        self.upstream = upstream
        self.sink.answering(self)  # before the watch below, which may call back at once
        relay.attempt_begins(target, ctx)
        self.limit_s = relay.first_byte_limit(ctx, target)
        relay.deadlines.move(self, relay.loop_deadline(ctx, self.limit_s))
        watch = dispatcher.gone_watch(target)
        if watch is not None:
            self.watched, self.gone_kind = watch
            self.watched.watch(self._gone)

    def upstream_changed(self) -> None:
        """The answer's head is here, or the answer is whole, or its connection failed."""
        upstream = self.upstream
        if upstream is None:
            return  # abandoned meanwhile
        try:
            try:
                complete = upstream.progress()
            except UpstreamError as e:
                self._lost(upstream, e)
                return
            if not upstream.headed:
                return
            if upstream.status < 400 and is_stream(upstream):
                self._relay_stream(upstream)
            elif not complete:  # the head, once: answering, only the total deadline applies now
                relay = self.proxy.relay
                relay.deadlines.move(self, relay.loop_deadline(self.ctx))
            else:
                self._whole(upstream)
        except Exception as e:  # one request's bug must not be lost in the upstream's callback
            self._crashed(e)

    def _whole(self, upstream: Response) -> None:
        self._stop()
        payload = upstream.body_now()
        upstream.release()  # read to its end: back to the pool
        target = self.target
        assert target is not None
        try:
            answer = self.proxy.relay.whole_answer(upstream, payload, target, self.ctx)
        except Failure as f:
            self._resume(f)
            return
        self._answered(answer)

    def _lost(self, upstream: Response, e: UpstreamError) -> None:
        """The connection failed: before the head, a failed connect (or, on a connection we
        reused, the upstream closing it as we did: sent again on a new one); after it, an
        answer cut off."""
        target = self.target
        assert target is not None
        when = self._when
        self._stop(ended=False)
        upstream.release()
        relay = self.proxy.relay
        if not upstream.headed and isinstance(e, Disconnected) and upstream.reused and relay.client is not None:
            relay.client.drop_idle(target.base_url)  # its pool is as stale: post_lines connects anew
            outgoing = Outgoing(self.request.path_qs, self.body, self.headers)
            self._resume(lambda: relay.carry_on(self.sink, target, self.ctx, when, self.limit_s, outgoing))
            return
        relay.attempt_ends(target)
        self._resume(connect_failure(target, e) if not upstream.headed else cut_off(target, e))

    def _relay_stream(self, upstream: Response) -> None:
        """An SSE answer: a coroutine relays it from here (its first chunk is still the first
        byte, under the attempt's first-byte deadline)."""
        target = self.target
        assert target is not None
        when = self._when
        self._stop(ended=False)  # carry_on's own end counts it
        upstream.detach()
        relay = self.proxy.relay
        self._resume(lambda: relay.carry_on(self.sink, target, self.ctx, when, self.limit_s, upstream))

    def fire(self, now: float) -> float | None:
        """The attempt's deadline (Deadlines calls it): a Failure to retry, as a timeout."""
        if self._when > now:
            return self._when  # moved later meanwhile
        target = self.target
        if self.upstream is not None and target is not None:
            self._abandoned(self.proxy.relay.timed_out(self.ctx, target, self._when, self.limit_s))
        return None

    def _gone(self) -> None:
        """Its instance left rotation, or its node went DOWN, before it answered."""
        target = self.target
        if self.upstream is not None and target is not None and self.ctx.ttfb is None:
            self._abandoned(gone_failure(self.gone_kind, target.name))

    def _abandoned(self, failure: Failure) -> None:
        """The attempt ends unanswered (its connection closes); the attempt loop takes the
        ``failure`` on."""
        try:
            self._abandon()
            self._resume(failure)
        except Exception as e:
            self._crashed(e)

    # --- endings ----------------------------------------------------------------------------------

    def _stop(self, ended: bool = True) -> None:
        """The attempt's deadline and watch end (and, ``ended``, its in-flight count)."""
        self.upstream = None
        relay = self.proxy.relay
        relay.deadlines.remove(self)
        if self.watched is not None:
            self.watched.unwatch(self._gone)
            self.watched = None
        if ended and self.target is not None:
            relay.attempt_ends(self.target)

    def _abandon(self) -> None:
        """End the attempt, its answer unread: its connection closes (never reused half-read)."""
        upstream = self.upstream
        if upstream is not None:
            self._stop()
            upstream.release()

    def _answered(self, answer: Answer) -> None:
        self.over = True
        self.proxy.dispatcher.leave(self.plan)
        self.proxy.finish(self.request, self.ctx)
        self.sink.send_now(self.proxy.labelled(answer, self.anthropic))

    def _resume(self, outcome: Failure | Callable[[], Awaitable[Answer]]) -> None:
        """The attempt loop takes over in a task, from this attempt's ``outcome``."""
        target = self.target
        assert target is not None
        dispatcher = self.proxy.dispatcher
        self._carry_on(
            dispatcher.resume(self.request, self.sink, self.body, self.plan, self.ctx, self._tries(), target, outcome)
        )

    def _tries(self) -> Tries:
        """The attempt loop's state as it takes over: the lane's one target tried, if any (most
        requests never need one: it is made here, not per request)."""
        tries = Tries(self.ctx)
        if self.target is not None:
            tries.tried.add(self.target.name)
        return tries

    def _carry_on(self, work: Awaitable[Answer]) -> None:
        self.over = True
        self.sink.carry_on(self.proxy.run(self.request, self.sink, self.ctx, work, self.anthropic))

    def _crashed(self, e: Exception) -> None:
        """A bug in a callback: the client gets a 500 (as the coroutine path's listener gives),
        not a request that hangs."""
        log.error("unhandled error serving a proxy request", path=self.request.path, error=repr(e), exc_info=e)
        if self.over:
            return
        self._abandon()
        self.ctx.status = 500
        self._answered(internal_error())
