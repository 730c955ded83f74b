"""The HTTP listener of both daemons: read timeouts, a connection cap under the open-file limit,
and malformed requests answered in JSON with one structured log line.

aiohttp closes a connection that stays idle past its keep-alive timeout, but it sets no limit on
how long a client may take to send its request head or body, and none on the number of
connections: a few hundred sockets that trickle header bytes (slowloris) use up the open-file
limit, and from then on the API cannot accept anyone, with nothing logged. Here each connection
is in one phase at a time, with one timer:

    HEAD   from accept, or from the first byte on a kept-alive connection, until the request head
           is complete: at most ``header_timeout_s``, then 408 and close
    BODY   until the body is complete: each ``body_timeout_s`` window must bring at least
           ``body_min_rate`` bytes/s (a slow but steady upload passes, a trickle does not)
    BUSY   the handler runs (inference takes minutes): no limit here; the proxy has its own
    IDLE   kept alive between requests: closed after ``keepalive_timeout_s``

Connections are capped below the open-file limit (raised to the hard limit at start-up). At the
cap a new connection evicts the one that has waited longest without a request in progress (HEAD
or IDLE), so a flood of slow or idle sockets cannot lock out a client that sends its request at
once; when every connection is busy, the new one gets a 503 and is closed. Each episode of
shedding logs one line when it starts and one when it ends; counters are in /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import itertools
import re
import resource
import time
from collections import OrderedDict
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, cast

import msgspec
import structlog
from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError
from msgspec import Meta
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpufleet.tomlconfig import ConfigProblem, PositiveFloat, StrictSection

log = structlog.get_logger("http")

MIN_CONNECTIONS = 16  # below this the API could not serve a handful of clients at once
# A new connection is not evicted before it had a chance to be read (the loop accepts a whole
# backlog at once), unless the server has read from it: then it had its chance.
EVICT_GRACE_S = 0.05
EVICT_SCAN = 16  # how many of the longest waiting are looked at for one that may be evicted


class ApiSection(StrictSection):
    """``[api]``: limits of the HTTP listener (the agent's API and proxy port, the coordinator's API)."""

    # From accept (or the first byte of a request on a kept-alive connection) to a complete head.
    header_timeout_s: PositiveFloat = 10.0
    # A request body must bring at least body_min_rate bytes/s over every body_timeout_s window.
    body_timeout_s: PositiveFloat = 30.0
    body_min_rate: Annotated[int, Meta(ge=0)] = 1024
    # A kept-alive connection with no request for this long is closed.
    keepalive_timeout_s: PositiveFloat = 75.0
    # 0: derived from the open-file limit (see connection_cap); a larger value is lowered to it.
    max_connections: Annotated[int, Meta(ge=0)] = 0
    # File descriptors kept out of the cap: model-server pipes, log files, etcd, the listener.
    fd_reserve: Annotated[int, Meta(ge=0)] = 256
    # listen(2) backlog; the kernel caps it at net.core.somaxconn (4096 by default since Linux
    # 5.4). 5,000 clients connecting at once overflowed 1,024 (bench/proxy.py, issue 18).
    backlog: Annotated[int, Meta(ge=1, le=65535)] = 4096
    # Who may read /v1/status and /metrics (topology, instance ports and PIDs, API key names and
    # usage). "open": whoever reaches the port (a scraper without credentials); "token": a
    # bearer token, status_token_file's (Prometheus' authorization credentials_file) or an
    # agent's admin token (gpuctl status/check --token-file). /healthz and /readyz stay open.
    status_access: Literal["open", "token"] = "open"
    status_token_file: str | None = None  # the read-only token of status_access = "token"
    # Networks (CIDR, e.g. "10.0.0.0/8", "127.0.0.1/32") that may read them at all; [] = any.
    status_allow: list[str] = msgspec.field(default_factory=list)

    def resolve(self, base: Path) -> None:
        if self.status_token_file and not Path(self.status_token_file).is_absolute():
            self.status_token_file = str((base / self.status_token_file).resolve())

    def problems(self, at: str = "$.api", admin_token: bool | None = None) -> list[ConfigProblem]:
        """``admin_token``: whether the daemon has an admin token, which also opens status in
        "token" mode (None: it has none to have, as the coordinator)."""
        out = []
        if self.status_access == "token" and not self.status_token_file and not admin_token:
            needs = "status_token_file" + (" or agent.admin_token_file" if admin_token is False else "")
            out.append(ConfigProblem(f"{at}.status_access", f'"token" needs {needs}'))
        for i, net in enumerate(self.status_allow):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                problem = f"{net!r} is not a network (CIDR, e.g. 10.0.0.0/8)"
                out.append(ConfigProblem(f"{at}.status_allow[{i}]", problem))
        return out


# --- the open-file limit ---------------------------------------------------------------------------


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel still refuses more than fs.nr_open
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def connection_cap(limits: ApiSection, nofile: int, fds_per_connection: int) -> int:
    """Client connections allowed at once: what the open-file limit leaves after the reserve,
    divided by the descriptors one connection can hold (the agent's proxy opens an upstream
    connection for each request it forwards: 2)."""
    auto = max((nofile - limits.fd_reserve) // fds_per_connection, MIN_CONNECTIONS)
    return min(limits.max_connections, auto) if limits.max_connections else auto


# --- canned answers, written on the socket outside any request handler ------------------------------


def _canned(status: int, message: str, type_: str, code: str, extra: str = "") -> bytes:
    body = msgspec.json.encode({"error": {"message": message, "type": type_, "code": code}})
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


REQUEST_TIMEOUT = _canned(408, "request not received in time", "invalid_request_error", "request_timeout")
OVERLOADED = _canned(503, "too many connections", "server_error", "too_many_connections", "Retry-After: 1\r\n")


class Throttle:
    """At most ``burst`` log lines at once, refilled at ``rate`` per second; what was held back
    is counted into the next line (``suppressed``)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> dict[str, int]:
        n, self.suppressed = self.suppressed, 0
        return {"suppressed": n} if n else {}


# --- the guard: counts, the cap, shedding ------------------------------------------------------------


class ConnectionGuard:
    """The connections of one listener; decides who is let in at the cap."""

    def __init__(self, limits: ApiSection, cap: int) -> None:
        self.limits = limits
        self.cap = cap
        self.open = 0
        # Connections without a request in progress (HEAD or IDLE), longest waiting first.
        # The value: when it started waiting (time.monotonic()).
        self._waiting: OrderedDict[GuardedRequestHandler, float] = OrderedDict()
        self.shed = {"evicted": 0, "refused": 0}
        self.timeouts = {"header": 0, "body": 0}
        self.bad_requests = 0
        self._episode: tuple[float, int, int] | None = None  # since, evicted and refused at its start
        self._timeout_log = {k: Throttle(rate=0.1, burst=1) for k in self.timeouts}
        self.bad_request_log = Throttle(rate=10, burst=100)
        self.draining = False  # handing over: every answer closes its connection (see drain)
        self._all_closed: asyncio.Event | None = None

    # The handlers call these.

    def admit(self, handler: GuardedRequestHandler) -> bool:
        if self.open >= self.cap:
            victim = self._victim()
            if victim is None:
                self._shedding("refused")
                return False
            self._shedding("evicted")
            victim.evict()
        self.open += 1
        return True

    def _victim(self) -> GuardedRequestHandler | None:
        """The longest waiting connection that may be evicted: one the server has read from, or
        one old enough to have been read. A connection accepted a moment ago may not have been
        read yet: evicting it would lose a client that did nothing wrong. But a flood that
        reconnects at once keeps the oldest waiter young, so age alone would refuse everyone
        (the flood's connections have all been read: they sent their first bytes at once)."""
        now = time.monotonic()
        for handler, since in itertools.islice(self._waiting.items(), EVICT_SCAN):
            if handler.heard or now - since >= EVICT_GRACE_S:
                return handler
        return None

    def waiting(self, handler: GuardedRequestHandler) -> None:
        self._waiting.pop(handler, None)
        self._waiting[handler] = time.monotonic()

    def busy(self, handler: GuardedRequestHandler) -> None:
        self._waiting.pop(handler, None)

    def release(self, handler: GuardedRequestHandler) -> None:
        self._waiting.pop(handler, None)
        self.open -= 1
        if self._all_closed is not None and self.open <= 0:
            self._all_closed.set()
        if self._episode is not None and self.open <= self.cap * 0.9:
            since, evicted, refused = self._episode
            self._episode = None
            log.info(
                "connections back under the cap",
                open=self.open,
                cap=self.cap,
                lasted_s=round(time.monotonic() - since, 1),
                evicted=self.shed["evicted"] - evicted,
                refused=self.shed["refused"] - refused,
            )

    async def drain(self, idle_s: float, timeout_s: float) -> int:
        """Before the listening socket goes to the next process (the caller stopped accepting):
        empty this listener's connections without resetting a client. Each answer from now on
        closes its connection (``Connection: close``); connections still idle after ``idle_s``
        are closed; then at most ``timeout_s`` in all for requests in progress. Closing an idle
        kept-alive connection at once would race a client sending its next request on it: it
        sees a reset, and a POST is not retried. Returns how many connections were left open."""
        self.draining = True
        self._all_closed = asyncio.Event()
        if self.open <= 0:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for wait_until in (loop.time() + min(idle_s, timeout_s), deadline):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(wait_until):
                    await self._all_closed.wait()
            if self.open <= 0:
                return 0
            for handler in [h for h in self._waiting if h.idle]:
                handler.force_close()  # nothing came on it for idle_s: close
        return max(0, self.open)

    def timed_out(self, phase: str, remote: str | None) -> None:
        self.timeouts[phase] += 1
        throttle = self._timeout_log[phase]
        if throttle.allow():
            limit = self.limits.header_timeout_s if phase == "header" else self.limits.body_timeout_s
            log.warning(
                f"closed a connection too slow sending its request {phase}",
                limit_s=limit,
                remote=remote,
                **throttle.take_suppressed(),
            )

    def _shedding(self, how: str) -> None:
        self.shed[how] += 1
        if self._episode is None:
            self._episode = (
                time.monotonic(),
                self.shed["evicted"] - (how == "evicted"),
                self.shed["refused"] - (how == "refused"),
            )
            log.warning(
                "connection cap reached: new connections evict those waiting longest without a request",
                cap=self.cap,
                open=self.open,
                first=how,
            )


def listener_guard(limits: ApiSection, fds_per_connection: int) -> ConnectionGuard:
    """Raise the open-file limit and size the connection cap under it (logged once)."""
    before, nofile = raise_nofile_limit()
    cap = connection_cap(limits, nofile, fds_per_connection)
    if limits.max_connections and cap < limits.max_connections:
        log.warning("[api] max_connections lowered to fit the open-file limit", asked=limits.max_connections, cap=cap)
    if (nofile - limits.fd_reserve) // fds_per_connection < MIN_CONNECTIONS:
        log.warning("the open-file limit leaves little room for connections", nofile=nofile, cap=cap)
    log.info("open-file limit", soft_before=before, soft=nofile, max_connections=cap)
    return ConnectionGuard(limits, cap)


# --- the protocol -----------------------------------------------------------------------------------


class Phase(enum.Enum):
    HEAD = "head"
    BODY = "body"
    BUSY = "busy"
    IDLE = "idle"


_RAW_BYTES = re.compile(r":?\s*(?:b['\"]|bytearray\().*")


def safe_reason(exc: BaseException | None, message: str | None) -> str:
    """The first line of a parser error, without the client's bytes aiohttp quotes in it (they
    can hold a token): what the client is told and what is logged."""
    text = message or (getattr(exc, "message", None) if exc is not None else None) or str(exc or "")
    first = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "bad request")
    return _RAW_BYTES.sub("", first).rstrip(":")[:120] or "bad request"


class GuardedRequestHandler(web_protocol.RequestHandler):
    """aiohttp's protocol, with the phase timers and the cap of a :class:`ConnectionGuard`.

    It reads aiohttp's private ``_request_count`` and ``_messages`` to see a request head
    complete: the tests in tests/test_bad_input.py and tests/faults/test_flood.py fail if an
    aiohttp upgrade changes them."""

    __slots__ = (
        "_admitted",
        "_answered",
        "_body",
        "_counted",
        "_got_bytes",
        "_guard",
        "_phase",
        "_timer",
        "_window",
        "heard",
    )

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self.heard = False  # the server has read bytes from it (see ConnectionGuard._victim)
        self._phase = Phase.HEAD
        self._timer: asyncio.TimerHandle | None = None
        self._got_bytes = False  # has the client sent anything of its next request yet
        self._body: Any = None  # the payload stream being received (BODY)
        self._window = 0  # body bytes in the current window
        self._counted = False  # in the guard's count of open connections
        self._admitted = False  # handed to aiohttp (not refused at the cap)
        self._answered = False  # a response was sent for the request whose body is still coming

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard.admit(self):
            refused = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
            refused.write(OVERLOADED)
            refused.close()
            return
        self._counted = self._admitted = True
        super().connection_made(transport)
        self._enter(Phase.HEAD)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        if self._counted:
            self._counted = False
            self._guard.release(self)
        if self._admitted:  # a refused connection never reached aiohttp
            super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room at the cap; counted out now (the close completes later)."""
        self._cancel_timer()
        if self._counted:
            self._counted = False
            self._guard.release(self)
        self.force_close()

    @property
    def idle(self) -> bool:
        """Kept alive between requests, nothing of the next one received yet."""
        return self._phase is Phase.IDLE

    # --- phases -------------------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        self._phase = phase
        limits = self._guard.limits
        timeout = {
            Phase.HEAD: limits.header_timeout_s,
            Phase.BODY: limits.body_timeout_s,
            Phase.IDLE: limits.keepalive_timeout_s,
        }.get(phase)
        if phase in (Phase.HEAD, Phase.IDLE):
            self._guard.waiting(self)
        else:
            self._guard.busy(self)
        self._cancel_timer()
        if timeout is not None:
            self._timer = self._loop.call_at(self._loop.time() + timeout, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        if data:
            self.heard = True
            if self._phase is Phase.IDLE:
                self._enter(Phase.HEAD)
            self._got_bytes = True  # in BUSY: the start of a pipelined request
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._head_complete()
        elif self._phase is Phase.BODY:
            self._window += len(data)
            if self._body is None or self._body.is_eof():
                self._got_bytes = False
                self._enter(Phase.BUSY)

    def _head_complete(self) -> None:
        """A request head was parsed: its body (if any) is what we wait for now."""
        payload = self._messages[-1][1] if self._messages else None
        self._answered = self._got_bytes = False
        if payload is None or payload.is_eof():
            self._body = None
            self._enter(Phase.BUSY)
        else:
            self._body, self._window = payload, 0
            self._enter(Phase.BODY)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if self._guard.draining:
            resp.force_close()  # "Connection: close": the client opens its next one elsewhere
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if self._counted and not self._force_close:
                self._after_response(request)

    def _after_response(self, request: web.BaseRequest) -> None:
        if self._messages:  # pipelined: the next head is already here
            self._head_complete()
        elif not request.content.is_eof():  # answered before reading the body; aiohttp drains it
            self._answered = True
            self._body, self._window = request.content, 0
            self._enter(Phase.BODY)
        else:  # bytes of the next request already came: its head is being sent
            self._enter(Phase.HEAD if self._got_bytes else Phase.IDLE)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._counted or self.transport is None:
            return
        remote = self._remote()
        if self._phase is Phase.HEAD:
            self._guard.timed_out("header", remote)
            self._close_with(REQUEST_TIMEOUT if self._got_bytes else None)
        elif self._phase is Phase.BODY:
            self._check_body_window(remote)
        elif self._phase is Phase.IDLE:
            self._close_with(None)

    def _check_body_window(self, remote: str | None) -> None:
        limits = self._guard.limits
        if self._body is None or self._body.is_eof():
            self._enter(Phase.BUSY)
            return
        # Reading paused by us (the handler has not read what it has) is not the client's fault.
        paused = self._reading_paused or self._buffer_paused
        if paused or self._window >= max(1, limits.body_min_rate * limits.body_timeout_s):
            self._window = 0
            self._enter(Phase.BODY)
            return
        self._guard.timed_out("body", remote)
        self._close_with(None if self._answered else REQUEST_TIMEOUT)

    def _close_with(self, answer: bytes | None) -> None:
        if answer is not None and self.transport is not None:
            self.transport.write(answer)
        self.force_close()

    def _remote(self) -> str | None:
        peer = self.peername
        return peer[0] if isinstance(peer, tuple) else None

    # --- malformed requests -------------------------------------------------------------------

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp reports here what escaped a request: a body that broke while aiohttp drained
        it after the answer (corrupt gzip, bad chunking) is the client's, worth one line."""
        exc = kw.get("exc_info")
        if isinstance(exc, (web_protocol.RequestPayloadError, HttpProcessingError)):
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            log.info("client's request body unreadable", reason=safe_reason(cause, None), remote=self._remote())
            return
        log.error(str(args[0]) if args else "unhandled error in the HTTP server", exc_info=exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused (or to an exception no middleware
        caught): one structured log line instead of a plain-text traceback, and a JSON body in
        OpenAI's error shape instead of text."""
        if status >= 500:
            log.error("unhandled error serving a request", path=request.path, error=repr(exc), exc_info=exc)
            reason, type_, code = "internal error", "server_error", "internal_error"
        else:
            reason, type_, code = safe_reason(exc, message), "invalid_request_error", "bad_http_request"
            self._guard.bad_requests += 1
            throttle = self._guard.bad_request_log
            if throttle.allow():
                log.info(
                    "bad HTTP request refused",
                    status=status,
                    error=type(exc).__name__ if exc is not None else None,
                    reason=reason,
                    remote=self._remote(),
                    **throttle.take_suppressed(),
                )
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        body = msgspec.json.encode({"error": {"message": reason, "type": type_, "code": code}})
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.force_close()
        return resp


class FrontHook(Protocol):
    """A protocol factory that takes the listener's connections before aiohttp does (the agent's
    proxy front, agent/proxy/front.py); it makes aiohttp's protocol with ``GuardedServer.handler``
    for a connection it hands over, and stops with the runner."""

    def __call__(self) -> asyncio.BaseProtocol: ...
    def pre_shutdown(self) -> None: ...
    async def shutdown(self, timeout: float | None) -> None: ...


class GuardedServer(web.Server):
    """aiohttp's Server, making :class:`GuardedRequestHandler` protocols (or, with ``front``, the
    front's, which hands connections back through :meth:`handler`)."""

    def __init__(self, base: web.Server, guard: ConnectionGuard) -> None:
        # aiohttp builds its Server inside AppRunner.setup(); take over what it was given.
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self.guard = guard
        self.front: FrontHook | None = None

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        if self.front is not None:
            return self.front()
        return self.handler()

    def handler(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        if self.front is not None:
            self.front.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        if self.front is not None:
            await asyncio.gather(super().shutdown(timeout), self.front.shutdown(timeout))
        else:
            await super().shutdown(timeout)


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose server protocols are guarded; sites are made as usual."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=guard.limits.keepalive_timeout_s, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.guard)


# --- metrics ------------------------------------------------------------------------------------------


class ConnectionMetrics(Collector):
    """The guard's counts as ``<prefix>_http_*`` metrics."""

    def __init__(self, guard: ConnectionGuard, prefix: str) -> None:
        self.guard, self.prefix = guard, prefix

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        g, p = self.guard, self.prefix
        yield GaugeMetricFamily(f"{p}_http_connections", "Open client connections of the HTTP listener", g.open)
        yield GaugeMetricFamily(
            f"{p}_http_connections_limit", "Most client connections at once (under the open-file limit)", g.cap
        )
        shed = CounterMetricFamily(
            f"{p}_http_connections_shed",
            "Connections closed at the cap: evicted (waiting without a request) or refused (503, all busy)",
            labels=["reason"],
        )
        for reason, n in g.shed.items():
            shed.add_metric([reason], n)
        yield shed
        slow = CounterMetricFamily(
            f"{p}_http_request_timeouts",
            "Connections closed because the request head or body came too slowly",
            labels=["phase"],
        )
        for phase, n in g.timeouts.items():
            slow.add_metric([phase], n)
        yield slow
        yield CounterMetricFamily(f"{p}_http_bad_requests", "Requests the HTTP parser refused (400)", g.bad_requests)
