"""One attempt on one upstream: the request out, the answer back to the client.

Bytes go through untouched: the request body as received, a non-streaming answer read whole
and returned, an SSE stream copied chunk by chunk, one client write per upstream chunk, never
re-serialised (LiteLLM's re-serialisation is where its 3–12 ms go). Until the first byte has
reached the client an attempt raises :class:`~agent.proxy.context.Failure` (the attempt loop in
server.py retries it elsewhere); a stream's response headers are held back until its first chunk
is here for that reason. After the first byte a failure ends the stream with an SSE error event.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Coroutine
from typing import Any, NamedTuple

import msgspec
import structlog
from multidict import CIMultiDict

from agent.backends import Verdict
from agent.config import ProxySection
from agent.keys.gate import CREDENTIAL_HEADERS, KeyGate
from agent.keys.usage import StreamUsage, Usage, usage_of_body
from gpufleet.deadlines import Deadline, Deadlines, Timed
from gpufleet.facts import INSTANCE_HEADER, NODE_HEADER, REQUEST_ID_HEADER
from gpufleet.outbox import Outbox

from .cache import StreamRecorder
from .context import HOP_BY_HOP, REQUEST_HOP_BY_HOP, Ctx, Failure
from .degrade import DEGRADED_HEADER, DOWNGRADED_HEADER, FALLBACK_REQUEST_HEADER, Degrader
from .exchange import Answer, Request, Sink
from .httpclient import ConnectError, Disconnected, PayloadError, Response, UpstreamClient, header_lines
from .metrics import ProxyMetrics
from .remote import HOPS_HEADER, RemoteTarget, hops_of
from .stats import ProxyStats
from .upstreams import LocalUpstream, Upstreams

log = structlog.get_logger("agent.proxy")
# Failure kinds (and metric labels) of an instance that is full, not failing: not probed.
BUSY = "status_429"  # it said 429: counts toward the error rate (overload is what degrades)
CAPACITY = "capacity"  # its backend knows the request did not fit right now: counts nothing
CUT_OFF = (PayloadError, Disconnected)

Target = LocalUpstream | RemoteTarget
# Request headers never passed on as the client sent them (lower-case, as bytes: the relay
# compares raw header names): hop-by-hop ones, and those the relay sets itself.
_NOT_PASSED = frozenset(n.encode() for n in REQUEST_HOP_BY_HOP | {REQUEST_ID_HEADER.lower(), "x-forwarded-for"})
_OURS = b"%s: %%s\r\nX-Forwarded-For: %%s\r\n" % REQUEST_ID_HEADER.encode()
# Response headers not passed back: hop-by-hop ones, and Date and Server, which are ours.
_NOT_RETURNED = frozenset(n.encode() for n in HOP_BY_HOP) | {b"date", b"server"}
_NODE = NODE_HEADER.lower().encode()


@functools.lru_cache(maxsize=64)
def _lowered(names: tuple[str, ...]) -> frozenset[bytes]:
    """Header names as the relay compares raw ones (a handful of combinations recur)."""
    return frozenset(name.lower().encode() for name in names)


@functools.lru_cache(maxsize=64)
def _not_returned(names: tuple[str, ...]) -> frozenset[bytes]:
    """An answer's headers not passed back when the relay sets ``names``: one set to test."""
    return _NOT_RETURNED | _lowered(names)


# A local instance's answer: the headers _ours sets on it, when it sets no others.
_NOT_RETURNED_LOCAL = _not_returned((NODE_HEADER, INSTANCE_HEADER, REQUEST_ID_HEADER))
# Another node's answer that names its node: only the request id is ours.
_NOT_RETURNED_RID = _not_returned((REQUEST_ID_HEADER,))
_RID_LINE = b"%s: %%s\r\n" % REQUEST_ID_HEADER.encode()

# Where this node checks keys, the client's key is ours: it goes no further.
_NOT_PASSED_KEYED = _NOT_PASSED | {n.lower().encode() for n in CREDENTIAL_HEADERS}
# A forward with nothing to sign: the hop count follows ours, the client's (if any) is replaced.
_OURS_HOPS = _OURS + b"%s: %%d\r\n" % HOPS_HEADER.encode()
_NOT_PASSED_HOPS = _NOT_PASSED | {HOPS_HEADER.lower().encode()}
_NOT_PASSED_KEYED_HOPS = _NOT_PASSED_KEYED | {HOPS_HEADER.lower().encode()}


def counted(ctx: Ctx, target: Target) -> bool:
    """Does this attempt count toward the cluster error rate? Each node counts attempts on its
    own instances only (a forwarded request is counted once, where it ran), and not those made
    for a fallback (``ctx.counted``)."""
    return ctx.counted and not isinstance(target, RemoteTarget)


class Relay:
    def __init__(
        self,
        upstreams: Upstreams,
        stats: ProxyStats,
        metrics: ProxyMetrics,
        degrader: Degrader,
        gate: KeyGate | None = None,
        peer_ssl: ssl.SSLContext | bool = True,
    ) -> None:
        self.upstreams = upstreams
        # https:// nodes (forwarding) are verified with this: the cluster's CA ([tls] ca_file),
        # or True, the system's trust store. Never False. Plain-http instances ignore it.
        self.peer_ssl = peer_ssl
        self.gate = gate
        self.stats = stats
        self.metrics = metrics
        self.degrader = degrader
        self.client: UpstreamClient | None = None
        # Every request's time limits on one loop timer (gpufleet/deadlines.py), not three
        # timers made and cancelled per request by asyncio.timeout_at.
        self.deadlines = Deadlines()
        # Writes to clients and upstreams, made together at the end of each turn (gpufleet/outbox.py).
        self.outbox = Outbox()
        self._served: dict[str, bytes] = {}  # instance -> its _served_here lines

    @property
    def cfg(self) -> ProxySection:
        return self.upstreams.proxy_cfg  # read live, so a reload applies

    async def start(self) -> None:
        self.client = UpstreamClient(
            self.peer_ssl,
            connect_timeout_s=lambda: self.cfg.connect_timeout_s,
            max_idle=lambda: self.cfg.upstream_keepalive,
            outbox=self.outbox,
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    # --- shared with the attempt loop ----------------------------------------------------------

    def loop_deadline(self, ctx: Ctx, phase_s: float | None = None) -> float:
        """Event-loop time at which the current phase must end: the phase's own limit, capped by
        the request's total deadline."""
        end = ctx.loop_started + ctx.cfg.total_timeout_s
        if phase_s is not None:
            end = min(end, self.deadlines.now() + phase_s)
        return end

    def timeout_response(self, ctx: Ctx, what: str) -> Answer:
        err = {"error": {"message": f"upstream timeout: {what}", "type": "timeout_error", "code": "upstream_timeout"}}
        headers = CIMultiDict({"Content-Type": "application/json", REQUEST_ID_HEADER: ctx.rid})
        return Answer(504, headers, msgspec.json.encode(err))

    def count_error(self, target: Target, ctx: Ctx) -> None:
        self.stats.upstream(target.name).errors += 1
        if counted(ctx, target):
            self.stats.counters.attempt_errors += 1

    def first_byte(self, target: Target, ctx: Ctx) -> None:
        """The upstream answered: the client gets this attempt's answer, whatever follows."""
        ctx.ttfb = time.monotonic() - ctx.started
        if not isinstance(target, RemoteTarget):
            target.report_success()

    # --- one attempt ------------------------------------------------------------------------------

    def attempt(
        self, request: Request, sink: Sink, body: bytes, target: Target, ctx: Ctx
    ) -> Coroutine[Any, Any, Answer]:
        """Send the request to ``target`` and relay its answer (await it at once: the attempt is
        counted from this call). Raises Failure while nothing has reached the client. Returns
        ``carry_on``'s coroutine, not one around it: a frame less that every event of a stream
        would pass through, and less memory per open stream."""
        outgoing = Outgoing(request.path_qs, body, self.request_headers(request, body, target, ctx))
        limit_s = self.first_byte_limit(ctx, target)
        when = self.loop_deadline(ctx, limit_s)
        self.attempt_begins(target, ctx)
        return self.carry_on(sink, target, ctx, when, limit_s, outgoing)

    def attempt_begins(self, target: Target, ctx: Ctx) -> None:
        """Count an attempt on ``target`` (its in-flight count until ``attempt_ends``)."""
        upstream_stats = self.stats.upstream(target.name)
        upstream_stats.in_flight += 1
        upstream_stats.requests += 1
        if counted(ctx, target):
            self.stats.counters.attempts += 1

    def attempt_ends(self, target: Target) -> None:
        self.stats.upstream(target.name).in_flight -= 1

    async def carry_on(
        self,
        sink: Sink,
        target: Target,
        ctx: Ctx,
        when: float,
        limit_s: float,
        upstream: Response | Outgoing,
    ) -> Answer:
        """An attempt counted by ``attempt_begins``, from its request to send (``Outgoing``) or
        from its answer's head (the fast lane began the attempt, fastlane.py), to its end;
        ``when``: its first-byte deadline.

        One timeout scope per attempt. A stream must show its first body chunk (the first token:
        servers send headers at once) within ttfb_timeout_s; a non-streaming answer (headers
        come with the whole answer) within response_timeout_s. Then the scope moves out to the
        total deadline."""
        scope = self.deadlines.at(when)
        try:
            async with scope:
                if isinstance(upstream, Outgoing):
                    upstream = await self.post(target, *upstream)
                try:
                    return await self._answer(sink, upstream, target, ctx, scope)
                finally:
                    upstream.release()
        except TimeoutError:
            raise self.timed_out(ctx, target, scope.when(), limit_s) from None
        finally:
            self.attempt_ends(target)

    def request_headers(self, request: Request, body: bytes, target: Target, ctx: Ctx) -> bytes:
        """The header lines of the request to ``target``: the client's as the parser gave them
        (bytes, never decoded and encoded again), less the hop-by-hop ones, the client's
        credential where this node checks keys, and those the relay sets, which follow."""
        gate = self.gate
        strips = gate is not None and gate.strips_credentials
        skip = _NOT_PASSED_KEYED if strips else _NOT_PASSED
        extra = target.upstream.headers
        remote = isinstance(target, RemoteTarget)
        if not extra and not remote:
            # Most requests: only the request id and X-Forwarded-For are ours. Neither value can
            # hold a line break (the id came through the parser or was made here).
            ours = _OURS % (ctx.rid.encode("utf-8", "surrogateescape"), (request.remote or "").encode())
        elif not extra and ctx.downgraded is None and (gate is None or not gate.signs_forwards):
            # A forward with nothing to sign (a gateway's every request): the hop count is ours too.
            skip = _NOT_PASSED_KEYED_HOPS if strips else _NOT_PASSED_HOPS
            hops = hops_of(request.header(HOPS_HEADER)) + 1
            ours = _OURS_HOPS % (ctx.rid.encode("utf-8", "surrogateescape"), (request.remote or "").encode(), hops)
        else:
            set_here = CIMultiDict(((REQUEST_ID_HEADER, ctx.rid), ("X-Forwarded-For", request.remote or "")))
            if remote:
                hops = hops_of(request.header(HOPS_HEADER)) + 1
                set_here[HOPS_HEADER] = str(hops)
                if ctx.downgraded is not None:
                    set_here[FALLBACK_REQUEST_HEADER] = ctx.model or ""
                if gate is not None:  # the next node trusts our signature instead of the client's key
                    set_here.update(gate.forward_headers(request.path_qs, hops, body, ctx))
            set_here.update(extra)  # the instance's own API key, not the client's
            skip = skip | _lowered(tuple(set_here))
            ours = header_lines(set_here.items())
        passed = [n + b": " + v + b"\r\n" for n, v in request.raw_headers if n.lower() not in skip]
        passed.append(ours)
        return b"".join(passed)

    def first_byte_limit(self, ctx: Ctx, target: Target) -> float:
        cfg = ctx.cfg
        limit = cfg.ttfb_timeout_s if ctx.stream else cfg.response_timeout_s
        # Another node's proxy runs the same limit on its own instance and may retry once after
        # it: give it room for both, or we would give up just as its retry begins.
        return 2 * limit if isinstance(target, RemoteTarget) else limit

    def timed_out(self, ctx: Ctx, target: Target, when: float, limit_s: float) -> Failure:
        """The Failure of an attempt whose deadline ``when`` (first byte, or total) passed."""
        if when == ctx.loop_started + ctx.cfg.total_timeout_s:  # the total deadline
            limit_s = ctx.cfg.total_timeout_s
        what = f"no first chunk within {limit_s:g}s" if ctx.stream else f"no complete answer within {limit_s:g}s"
        return Failure("timeout", self.timeout_response(ctx, what), f"{target.name}: {what}")

    async def post(self, target: Target, path: str, body: bytes, headers: bytes) -> Response:
        """Send the request (httpclient.py retries a kept-alive connection the upstream closed
        as we reused it); refused, unreachable or closed before answering is a Failure."""
        assert self.client is not None
        try:
            return await self.client.post_lines(target.base_url, path, headers, body)
        except (ConnectError, Disconnected, PayloadError) as e:
            raise connect_failure(target, e) from None

    async def _answer(
        self,
        sink: Sink,
        upstream: Response,
        target: Target,
        ctx: Ctx,
        scope: Deadline,
    ) -> Answer:
        """Relay what the upstream answered: an error status as its backend judges it, an SSE
        stream once its first chunk is here, anything else read whole."""
        if upstream.status >= 400:
            return self._error_answer(upstream, await self._read(upstream, target), target, ctx)
        try:
            if is_stream(upstream):
                # Hold the client's headers back until the first chunk is here: until then a
                # dead upstream can still be retried elsewhere.
                first = await upstream.content.readany()
                if not first:
                    raise PayloadError("stream closed before its first chunk")
                self.first_byte(target, ctx)
                scope.reschedule(self.loop_deadline(ctx))
                return await self._stream(sink, upstream, first, target, ctx, scope)
            scope.reschedule(self.loop_deadline(ctx))  # its headers are here: answering
            payload = await upstream.read()
        except CUT_OFF as e:
            raise cut_off(target, e) from None
        return self.whole_answer(upstream, payload, target, ctx)

    def whole_answer(self, upstream: Response, payload: bytes, target: Target, ctx: Ctx) -> Answer:
        """The client's answer to a non-streaming success, or to an error status (which may
        instead raise the Failure to retry)."""
        if upstream.status >= 400:
            return self._error_answer(upstream, payload, target, ctx)
        self.first_byte(target, ctx)
        if ctx.key is not None:
            ctx.usage = usage_of_body(payload)
        remote = isinstance(target, RemoteTarget)
        if ctx.auth_headers or ctx.downgraded is not None or (remote and upstream.header(_NODE) is None):
            ours, skip = self._ours(upstream, target, ctx)
            lines = header_lines(ours)
        elif remote:  # another node's answer names where it was served: only the request id is ours
            skip = _NOT_RETURNED_RID
            lines = _RID_LINE % ctx.rid.encode("utf-8", "surrogateescape")
        else:  # most answers: only where it was served and the request id are ours (as _ours sets them)
            skip = _NOT_RETURNED_LOCAL
            lines = self._served_here(target.name) + _RID_LINE % ctx.rid.encode("utf-8", "surrogateescape")
        # The header lines as the upstream sent them (never decoded), less those not returned,
        # and ours: what the client gets, written as it is (Answer.lines).
        passed = [n + b": " + v + b"\r\n" for n, v in upstream.raw_headers if n.lower() not in skip]
        passed.append(lines)
        answer = Answer(upstream.status, None, payload, lines=b"".join(passed))
        if ctx.cache_key is not None and upstream.status == 200:
            self.degrader.store(ctx.cache_key, upstream.status, answer.headers, payload)
        return ctx.done(answer)

    async def _read(self, upstream: Response, target: Target) -> bytes:
        try:
            return await upstream.read()
        except CUT_OFF as e:
            raise cut_off(target, e) from None

    def _error_answer(self, upstream: Response, payload: bytes, target: Target, ctx: Ctx) -> Answer:
        """An error status: the client's answer if the request was at fault (nothing counted,
        nothing retried), else a Failure to retry elsewhere. The backend decides which."""
        judgement = target.judge(upstream.status, payload)
        status, body = judgement.rewrite or (upstream.status, payload)
        headers = self._response_headers(upstream, target, ctx)
        if judgement.rewrite is not None:
            headers["Content-Type"] = "application/json"
        resp = Answer(status, headers, body)
        if judgement.verdict is Verdict.ANSWER:
            self.first_byte(target, ctx)
            return ctx.done(resp)
        if judgement.verdict is Verdict.BUSY:
            kind = BUSY if judgement.counted else CAPACITY
            raise Failure(kind, resp, f"{target.name}: full, HTTP {upstream.status}", counted=judgement.counted)
        raise Failure("status_5xx", resp, f"{target.name}: HTTP {upstream.status}: {payload[:200]!r}")

    def _response_headers(self, upstream: Response, target: Target, ctx: Ctx, stream: bool = False) -> CIMultiDict[str]:
        """The client's headers: the upstream's, less hop-by-hop ones, with ours set (an open
        stream holds them: built whole in one go, not grown a field at a time)."""
        ours, skip = self._ours(upstream, target, ctx, stream)
        return CIMultiDict(
            [
                (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for n, v in upstream.raw_headers
                if n.lower() not in skip
            ]
            + ours
        )

    def _served_here(self, instance: str) -> bytes:
        """The header lines naming this node and its ``instance`` (made once per instance)."""
        lines = self._served.get(instance)
        if lines is None:
            lines = self._served[instance] = header_lines(
                ((NODE_HEADER, self.upstreams.node_id), (INSTANCE_HEADER, instance))
            )
        return lines

    def _ours(
        self, upstream: Response, target: Target, ctx: Ctx, stream: bool = False
    ) -> tuple[list[tuple[str, str]], frozenset[bytes]]:
        """The headers the relay sets on an answer (none holds a line break: names and ids of
        ours, and a request id the parser let through), and the upstream's header names not
        returned with them (lower-case bytes: hop-by-hop ones and those ours replace)."""
        ours: list[tuple[str, str]] = []
        # Where it was served: another node's answer already names that node (and its instance,
        # unless that node's proxy answered itself: a refusal); a local instance's is ours to name.
        if isinstance(target, RemoteTarget):
            if upstream.header(_NODE) is None:  # a node from before these headers: name where we sent it
                ours += ((NODE_HEADER, target.node), (INSTANCE_HEADER, target.instance))
        else:
            ours += ((NODE_HEADER, self.upstreams.node_id), (INSTANCE_HEADER, target.name))
        ours.append((REQUEST_ID_HEADER, ctx.rid))
        if ctx.auth_headers:  # x-ratelimit-* of the key this node admitted
            ours += ctx.auth_headers.items()
        if ctx.downgraded is not None:
            ours += ((DOWNGRADED_HEADER, ctx.downgraded), (DEGRADED_HEADER, "fallback"))
        if stream:
            # X-Accel-Buffering: tells nginx in front of us not to buffer either.
            ours += (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))
        return ours, _not_returned(tuple([name for name, _ in ours]))

    # --- streams ----------------------------------------------------------------------------------

    async def _stream(
        self,
        sink: Sink,
        upstream: Response,
        first: bytes,
        target: Target,
        ctx: Ctx,
        scope: Deadline,
    ) -> Answer:
        """Start the client's stream with ``first`` and copy the rest; cache it if asked to."""
        headers = self._response_headers(upstream, target, ctx, stream=True)
        resp = ctx.done(Answer(upstream.status, headers, sent=True))
        await sink.start(upstream.status, headers)  # goes out with the first chunk, in one write
        recorder = self.degrader.recorder() if ctx.cache_key is not None else None
        await self._copy(sink, upstream, first, target, ctx, scope, recorder)
        if recorder is not None and ctx.cache_key is not None and not ctx.stream_error and upstream.status == 200:
            self.degrader.store_stream(ctx.cache_key, upstream.status, headers, recorder)
        if self.gate is not None:
            self.gate.bill(ctx)  # a stream without an end event: before its last bytes (once)
        await sink.end()
        return resp

    async def _copy(
        self,
        resp: Sink,
        upstream: Response,
        first: bytes,
        target: Target,
        ctx: Ctx,
        scope: Deadline,
        recorder: StreamRecorder | None,
    ) -> None:
        """Copy the stream chunk by chunk; a stall, the total deadline or the upstream failing
        ends it with an error event (the client already has part of an answer)."""
        # The scope holds the total deadline; between chunks the upstream has
        # stream_idle_timeout_s to send the next one, counted only while we wait on it (a client
        # slow to read is never taken for a stalled server) by a watch on the shared Deadlines
        # (_IdleWatch): rescheduling the scope around every read and write was two timer handles
        # per event, a quarter of the proxy's CPU per event with 500 open streams.
        idle_s = ctx.cfg.stream_idle_timeout_s
        watch = _IdleWatch(self.deadlines, idle_s)
        # The usage of a stream this node admitted under a key: read as it passes (the event
        # asked for on the client's behalf is taken out).
        usage = StreamUsage(ctx.hide_usage, lambda u: self._stream_ends(ctx, u)) if ctx.key is not None else None
        read = upstream.content.readany
        now = self.deadlines.now
        plain = usage is None and recorder is None  # each chunk straight to the client
        write = resp.write
        try:
            await self._pass_on(resp, first, usage, recorder)
            while True:
                watch.reading_since = now()
                chunk = await read()
                watch.reading_since = None
                if not chunk:
                    break
                # One write per upstream chunk.
                if plain:
                    await write(chunk)
                else:
                    await self._pass_on(resp, chunk, usage, recorder)
            if usage is not None:
                await self._pass_on(resp, usage.finish(), None, recorder)
        except asyncio.CancelledError:
            # Swallowing the cancellation is how the deadline scope (and the watch) are told
            # we handled it; the client gets an error event. Anyone else's (the client went
            # away) goes on: nobody to tell.
            if watch.stalled:
                if watch.task.uncancel() > (1 if scope.expired() else 0):
                    raise
                await self._stream_stalled(resp, target, ctx, idle_s)
            elif scope.expired():
                await self._stream_error(resp, target, ctx, "timeout", "total timeout exceeded mid-stream")
            else:
                raise
        except CUT_OFF as e:
            watch.stop()  # no stall to find while the error event goes out
            target.request_probe()
            log.warning("upstream stream ended early", request_id=ctx.rid, instance=target.name, error=str(e))
            await self._stream_error(
                resp, target, ctx, "midstream", f"upstream instance {target.name} failed mid-stream"
            )
        finally:
            watch.stop()
            if usage is not None:
                ctx.usage = usage.usage

    def _stream_ends(self, ctx: Ctx, usage: Usage | None) -> None:
        """The stream's last event is in hand, not yet sent: bill it now (KeyGate.bill), so a
        client that got it was billed even if this agent dies the next instant."""
        ctx.usage = usage
        if self.gate is not None:
            self.gate.bill(ctx)

    @staticmethod
    async def _pass_on(resp: Sink, chunk: bytes, usage: StreamUsage | None, recorder: StreamRecorder | None) -> None:
        """One chunk to the client as it came (no merging, no delay), minus a hidden usage event."""
        if usage is not None:
            chunk = usage.feed(chunk)
            if not chunk:
                return
        await resp.write(chunk)
        if recorder is not None:
            recorder.add(chunk)

    async def _stream_stalled(self, resp: Sink, target: Target, ctx: Ctx, idle_s: float) -> None:
        """The upstream sent nothing for ``idle_s`` mid-stream: an engine hung after its first
        token. Nothing can be retried (the client has part of an answer); it counts against the
        instance like a timeout, so passive health ejects (and in the end restarts) it."""
        detail = f"{target.name}: no data for {idle_s:g}s mid-stream"
        log.warning("upstream stream stalled", request_id=ctx.rid, instance=target.name, idle_s=idle_s)
        target.request_probe()
        if not isinstance(target, RemoteTarget) and target.report_failure(detail):
            self.metrics.ejections.labels(ctx.model, target.name).inc()
        await self._stream_error(resp, target, ctx, "timeout", f"upstream sent nothing for {idle_s:g}s mid-stream")

    async def _stream_error(self, resp: Sink, target: Target, ctx: Ctx, kind: str, message: str) -> None:
        self.count_error(target, ctx)
        ctx.stream_error = True
        self.metrics.upstream_errors.labels(ctx.model, target.name, kind).inc()
        err = {"error": {"message": message, "type": "server_error", "code": "upstream_stream_error"}}
        await resp.write(b"data: " + msgspec.json.encode(err) + b"\n\n")


class Outgoing(NamedTuple):
    """A request to send upstream: its path, body and header lines."""

    path: str
    body: bytes
    headers: bytes


def is_stream(upstream: Response) -> bool:
    """An SSE answer: relayed as it comes, its head held back until its first chunk."""
    return (upstream.header(b"content-type") or b"").startswith(b"text/event-stream")


def connect_failure(target: Target, e: Exception) -> Failure:
    """Refused, unreachable, or closed before answering: nothing was answered."""
    return Failure("connect", None, f"{target.name}: {type(e).__name__}: {e}")


def cut_off(target: Target, e: Exception) -> Failure:
    return Failure("midstream", None, f"{target.name}: answer cut off: {e}")


class _IdleWatch(Timed):
    """A stream's idle limit: the task is cancelled (``stalled``) when a read of the upstream has
    waited ``idle_s``. Filed with the relay's Deadlines, where a read moving the moment it counts
    from is an attribute write (no timer per stream, none around every read and write)."""

    __slots__ = ("deadlines", "idle_s", "reading_since", "stalled", "task")

    def __init__(self, deadlines: Deadlines, idle_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        now = deadlines.now()
        super().__init__(now + idle_s)
        self.deadlines = deadlines
        self.task = task
        self.idle_s = idle_s
        self.reading_since: float | None = None  # None: writing to the client, not waiting on the upstream
        self.stalled = False
        deadlines.add(self)

    def fire(self, now: float) -> float | None:
        since = self.reading_since
        due = now + self.idle_s if since is None else since + self.idle_s
        if now < due:
            return due
        self.stalled = True
        self.task.cancel()
        return None

    def stop(self) -> None:
        self.deadlines.remove(self)
