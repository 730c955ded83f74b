"""The agent's port, first in line: an ``asyncio.Protocol`` that serves the proxy's data path
itself and hands every other connection to aiohttp.

Why: aiohttp's server objects (request parsing, routing, middlewares, ``StreamResponse``) were
most of the proxy's CPU per request once the upstream side had its own client (httpclient.py).
Here a request head is parsed by httptools (llhttp, C); a request of the data path (``POST`` on
one of ``context.ROUTES``, ``GET /v1/models``) runs the proxy's pipeline (server.py) with this
protocol as its :class:`~agent.proxy.exchange.Sink`, and the answer goes out as one precomputed
head and the body in one ``writelines``.

Anything else goes to aiohttp as it came: the admin API, ``/metrics``, ``/v1/status``, and every
request that is unusual (a parse error, a line or field past aiohttp's 8190-byte limits, more than
100 headers, a header or path that is not plain UTF-8, a ``Content-Encoding``, a
``Transfer-Encoding`` other than chunked, HTTP/1.0, an upgrade, an ``Expect`` other than
100-continue). The transport is given to a new :class:`~gpufleet.httpserver.GuardedRequestHandler`
(``transport.set_protocol``) and every byte of the request so far is fed to it, so aiohttp answers
exactly as it did when it owned the port (its 4xx in JSON, its log line, its decoding of gzip
bodies), and keeps the connection for the rest of its life (it serves the proxy's routes too,
through ``add_proxy``).

Keep-alive: a connection that sends data-path requests and then another one is handed over at
that request, once the answers before it are out. Its bytes are known exactly when they began a
read (a client that waits for each answer, which is every HTTP client but a pipelining one).
Pipelining: data-path requests are answered one after the other in order (reading pauses while
one waits its turn); a request of another kind pipelined behind one in the same read (its first
byte's position in the read is not known: httptools does not say where a message ended) gets a
400 asking for its own connection, and the connection closes.

The connection's phases and limits are the listener's (gpufleet/httpserver.py, the same
``ConnectionGuard`` and ``[api]`` timeouts as aiohttp's connections): head, body (a minimum rate),
busy, idle (keep-alive); the connection cap; the handover drain. A request body is held whole
(a retry on another instance needs it again) up to ``[proxy] max_body_bytes``: 413 past it, at
the head when its Content-Length says so; ``Expect: 100-continue`` is answered when the pipeline
asks for the body. A client that goes away cancels the request's task, which closes its upstream
connection (vLLM then aborts the generation). A slow reader: ``write`` waits while the
transport's buffer is over its high-water mark, the relay stops reading its upstream, and the
upstream client pauses that socket (httpclient.py).

A connection is one object, :class:`FrontProtocol`, in three modules: this one reads (the parser's
callbacks, the handover, launching each request and choosing what comes after its answer);
frontanswer.py answers (the Sink, the answer's head, the held writes, back-pressure);
frontphases.py keeps the phase and its limit. The request itself is frontrequest.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import msgspec
import structlog
from aiohttp import web

from gpufleet.httpserver import OVERLOADED, ConnectionGuard, GuardedServer, safe_reason

from .context import ROUTES
from .exchange import Cancellable, internal_error
from .frontanswer import CLOSE, Answering, status_line
from .frontphases import BODY, HEAD, IDLE, Phases, PhaseTimer
from .frontrequest import FrontRequest
from .server import PROXY_KEY, Proxy

log = structlog.get_logger("agent.proxy.front")

MODELS_PATH = b"/v1/models"
_POST_PATHS = frozenset(p.encode() for p in ROUTES)
# aiohttp's limits: a request past them is handed to aiohttp, which refuses it as before.
MAX_LINE = 8190
MAX_HEADERS = 100
# Headers that may come once (aiohttp's http_parser.SINGLETON_HEADERS): twice is aiohttp's 400.
_SINGLETONS = frozenset(
    {
        b"content-length",
        b"content-location",
        b"content-range",
        b"content-type",
        b"etag",
        b"host",
        b"max-forwards",
        b"server",
        b"transfer-encoding",
        b"user-agent",
    }
)
# Headers that may make a request aiohttp's (screened in _data_path_request).
_SCREENED = frozenset({b"content-encoding", b"transfer-encoding", b"expect"})
# A head still incomplete past this many bytes is refused without waiting for more.
MAX_HEAD_BYTES = 64 * 1024
LINGER_S = 10.0  # at most this long reading the rest of a refused body (aiohttp's lingering_time)


def _error_body(message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": type_, "code": code}})


class _HandOver(Exception):
    """Raised in a parser callback to stop the parser at a head that goes to aiohttp."""


class Front:
    """The protocol factory of the agent's port (gpufleet/httpserver.py's ``GuardedServer.front``)
    and the set of its connections, for the runner's graceful stop."""

    def __init__(self, proxy: Proxy, guard: ConnectionGuard, handler: Callable[[], asyncio.Protocol]) -> None:
        self.proxy = proxy
        self.guard = guard
        self.deadlines = proxy.relay.deadlines  # the connections' phase limits, on one loop timer
        self.outbox = proxy.relay.outbox  # answers written at the end of the turn
        self.handler = handler  # makes aiohttp's protocol for a connection handed over
        self.connections: set[FrontProtocol] = set()
        self.stopping = False
        self._ended: asyncio.Future[None] | None = None  # shutdown waits on it
        self.handed_over = 0  # connections given to aiohttp (tests and metrics read it)

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def pre_shutdown(self) -> None:
        """The listener stopped accepting: idle connections close now, busy ones after their answer."""
        self.stopping = True
        for conn in list(self.connections):
            conn.close_when_idle()

    async def shutdown(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for the requests in progress, then cancel what is left."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while busy := [c.task for c in self.connections if c.task is not None and not c.task.done()]:
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                break
            # A request answered by callbacks (fastlane.py) has no task to wait on: its end
            # (FrontProtocol._next) sets this.
            ended = self._ended = loop.create_future()
            await asyncio.wait(
                [*(t for t in busy if isinstance(t, asyncio.Task)), ended],
                timeout=left,
                return_when=asyncio.FIRST_COMPLETED,
            )
        tasks = [t for t in busy if isinstance(t, asyncio.Task)]
        for t in busy:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for conn in list(self.connections):
            conn.force_close()

    def request_ended(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)


class FrontProtocol(Answering, Phases, asyncio.Protocol):
    """One client connection on the agent's port (see the module docstring)."""

    # Slots: thousands of open streams each hold one (issue 18's goal is <= 16 KB per stream).
    __slots__ = (
        "_after_drain",
        "_between",
        "_between_at_read",
        "_close_answer",
        "_closing",
        "_completed_in_read",
        "_counted",
        "_current",
        "_data",
        "_deadline",
        "_drain",
        "_guard",
        "_handover",
        "_head_bytes",
        "_headers",
        "_held",
        "_in_head",
        "_lingering",
        "_outbox",
        "_parser",
        "_parsing",
        "_pending_head",
        "_phase",
        "_queue",
        "_raw",
        "_reading_paused",
        "_sent",
        "_timer",
        "_unstarted",
        "_unusual",
        "_url",
        "_window",
        "_write_paused",
        "front",
        "heard",
        "loop",
        "proxy",
        "remote",
        "task",
        "transport",
    )

    def __init__(self, front: Front) -> None:
        self.front = front
        self.proxy = front.proxy
        self._guard = front.guard
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.remote: str | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._counted = False
        self.heard = False  # the server has read bytes from it (see ConnectionGuard._victim)
        self._phase = HEAD
        self._timer: PhaseTimer | None = None  # filed with the relay's Deadlines
        self._deadline: float | None = None  # when the current phase's limit runs out
        self._window = 0  # body bytes in the current body_timeout_s window
        # The request being parsed (from its head on), the one being answered, and those
        # pipelined behind it.
        self._parsing: FrontRequest | None = None
        self._current: FrontRequest | None = None
        self._queue: list[FrontRequest] = []  # not a deque: 600 bytes per connection, rarely used
        self._unstarted = False  # the current request is not answered yet: launched after the read
        # What answers the current request: a task, or the fast lane's request (fastlane.py).
        self.task: Cancellable | None = None
        self._after_drain: FrontRequest | None = None  # answered; the next waits for the client to read
        # Head in progress.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._unusual = False  # past aiohttp's limits, or not plain: aiohttp's to answer
        self._in_head = False
        self._head_bytes = 0
        # Bytes since the start of the current message, for a handover; None when its start
        # is not known (it began mid-read, after a message that ended in the same read).
        self._raw: list[bytes] | None = None
        self._between = True  # no message begun since the last one completed
        self._between_at_read = True
        self._completed_in_read = False
        self._data = b""
        self._handover = False  # a head for aiohttp was parsed: hand over once it is our turn
        self._closing = False  # close once the answers in progress are out
        self._lingering = False  # reading (and dropping) the rest of a body refused with 413
        self._close_answer: bytes | None = None  # written before that close (a 400)
        # Writing: the head of a stream goes out with its first chunk.
        self._pending_head: bytes | None = None
        self._sent = False  # bytes of the current request's answer went out
        self._write_paused = False
        self._outbox = front.outbox
        self._held: list[bytes] = []  # written at the end of this turn (gpufleet/outbox.py)
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False

    # --- connection -----------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        if not self._guard.admit(self):  # type: ignore[arg-type]
            transport.write(OVERLOADED)
            transport.close()
            return
        self._counted = True
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.front.connections.add(self)
        self._enter(HEAD)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._release()
        self.front.connections.discard(self)
        self.transport = None
        task = self.task
        if task is not None and not task.done():  # the client left: its upstream request goes with it
            if isinstance(task, asyncio.Task):
                # A turn later: a task made in this turn (the fast lane carrying a request on,
                # fastlane.py) begins first, so its ``finally`` blocks (the gate's slot, the
                # in-flight count, the access log) run. Cancelled before its first step, a
                # coroutine runs none of them.
                self.loop.call_soon(task.cancel)
            else:
                task.cancel()
        self._wake_writer()
        self.front.request_ended()
        for req in (self._parsing, *self._queue):
            if req is not None and not req.complete:
                req.broken = "the client closed the connection"
                req.wake()

    def _release(self) -> None:
        self._cancel_timer()
        if self._counted:
            self._counted = False
            self._guard.release(self)  # type: ignore[arg-type]

    # ConnectionGuard's interface, as GuardedRequestHandler offers it.

    @property
    def idle(self) -> bool:
        return self._phase is IDLE

    def evict(self) -> None:
        self._release()
        self.force_close()

    def force_close(self) -> None:
        self.write_held()  # an answer made in this turn still goes (close flushes what is written)
        if self.transport is not None:
            self.transport.close()

    def close_when_idle(self) -> None:
        self._closing = True
        if self.task is None and self._parsing is None:
            self.force_close()

    # --- reading --------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self._handover:  # waiting for our answers to finish before aiohttp takes over
            if self._raw is not None:
                self._raw.append(data)
            return
        if self._closing and self._close_answer is not None:
            return
        if self._phase is BODY:
            self._window += len(data)
        if self._between:  # this read begins the next message: its bytes are known from here
            self._raw = [data]
        elif self._in_head:
            self._head_bytes += len(data)
            if self._raw is not None:
                self._raw.append(data)
        self._data = data
        self._between_at_read = self._between
        self._completed_in_read = False
        error = None
        try:
            self._parser.feed_data(data)
        except _HandOver:
            pass
        except httptools.HttpParserUpgrade:
            pass  # an upgrade head: marked for aiohttp in on_headers_complete
        except httptools.HttpParserError as e:
            error = e
        if self._unstarted:  # after the parser: its body may have come in the same read
            self._unstarted = False
            assert self._current is not None
            self._launch(self._current)
        if error is not None and not self._handover:
            self._parse_error(error)
            return
        if self._handover:
            self._try_hand_over()
        elif self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._parse_error(None, "request head too large")
        else:
            self._settle()

    # httptools' callbacks

    def on_message_begin(self) -> None:
        # Its bytes are known from the start of this read (data_received kept them) if the parser
        # was between messages when the read began and no message ended in it.
        if not self._between_at_read or self._completed_in_read:
            self._raw = None
        self._between = False
        self._in_head = True
        self._head_bytes = len(self._data)
        self._url = b""
        self._headers = []
        self._unusual = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            self._unusual = True

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(name) + len(value) > MAX_LINE or len(headers) > MAX_HEADERS:
            self._unusual = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        req = None if self._unusual else self._data_path_request()
        if req is None:
            self._handover = True
            raise _HandOver
        req.keep_alive = parser.should_keep_alive()
        self._parsing = req
        if self._current is None:
            self._current = req
            self._unstarted = True  # launched once the parser is done with this read
        else:
            self._queue.append(req)
            self._pause_reading()  # pipelined: one at a time

    def _data_path_request(self) -> FrontRequest | None:
        """The request, if its head is one the front serves; None: aiohttp's."""
        parser = self._parser
        if parser.get_http_version() != "1.1" or parser.should_upgrade():
            return None
        method = parser.get_method()
        url = self._url
        path_b = url.partition(b"?")[0]
        if method == b"POST":
            if path_b not in _POST_PATHS:
                return None
        elif method != b"GET" or path_b != MODELS_PATH:
            return None
        raw = self._headers
        lowered = [n.lower() for n, _ in raw]
        names = set(lowered)
        if len(names) != len(raw):  # some header came more than once
            singles = [n for n in lowered if n in _SINGLETONS]
            if len(singles) != len(set(singles)):
                return None  # one that may come once came twice: aiohttp's 400
        try:
            path_qs = url.decode()
            values = b"".join([v for _, v in raw])  # names are tokens (ASCII): llhttp checks them
            if not values.isascii():
                for _, v in raw:
                    v.decode()
        except UnicodeDecodeError:
            return None  # aiohttp's bad-input check answers it (400 invalid_header / path)
        limit = self.proxy.cfg.max_body_bytes
        req = FrontRequest(self, method.decode(), path_b.decode(), path_qs, raw, lowered, limit)
        if not names.isdisjoint(_SCREENED):  # rare: most requests carry none of them
            headers = req.headers
            if "Content-Encoding" in headers and headers["Content-Encoding"].strip().lower() != "identity":
                return None  # aiohttp decodes gzip and deflate, and refuses the rest with 415
            te = headers.get("Transfer-Encoding")
            if te is not None and te.strip().lower() != "chunked":
                return None
            expect = headers.get("Expect")
            if expect is not None and expect.strip().lower() != "100-continue":
                return None
            req.expect_continue = expect is not None
        length = req.raw_value(b"content-length")
        if length is not None and int(length) > limit:
            req.too_large = True
        return req

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is not None:
            req.add(body)

    def on_message_complete(self) -> None:
        self._between = True
        self._completed_in_read = True
        self._raw = None
        req = self._parsing
        self._parsing = None
        if req is not None:
            req.complete = True
            req.wake()
        if self._lingering:  # the rest of a body we refused has been read: close now
            self._finish_connection()

    def _parse_error(self, exc: BaseException | None, reason: str | None = None) -> None:
        """Bytes that are not HTTP: aiohttp's to answer if they began the message where they are
        (its 400, as before); a body that broke under a request being served fails that request."""
        if self._lingering:
            self._finish_connection()
            return
        if self._raw is not None and self._parsing is None:
            self._handover = True  # after the answers before it (_try_hand_over waits for them)
            self._try_hand_over()
            return
        req = self._parsing
        why = safe_reason(exc, reason)
        if req is not None and not req.complete:
            req.broken = why  # its read() raises: the pipeline answers 400
            req.keep_alive = False
            req.wake()
            self._parsing = None
            self._closing = True
            self._pause_reading()
            return
        self._refuse(why, "bad_http_request")

    def _refuse(self, message: str, code: str) -> None:
        """A 400 for the bytes at the head of the queue, after the answers in progress; then close."""
        g = self._guard
        g.bad_requests += 1
        if g.bad_request_log.allow():
            log.info(
                "bad HTTP request refused",
                status=400,
                reason=message,
                remote=self.remote,
                **g.bad_request_log.take_suppressed(),
            )
        body = _error_body(message, code)
        self._close_answer = (
            status_line(400)
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + CLOSE
            + b"\r\n"
            + body
        )
        self._closing = True
        self._pause_reading()
        if self.task is None:
            self._finish_connection()

    # --- handing over to aiohttp ----------------------------------------------------------------

    def _try_hand_over(self) -> None:
        if self.task is not None or self._queue:
            self._pause_reading()
            return  # once the answers before it are out (_next)
        raw = self._raw
        transport = self.transport
        if transport is None:
            return
        if raw is None:  # pipelined behind a request of ours in the same read: position unknown
            self._handover = False
            self._refuse("a request pipelined behind another must be sent on its own connection", "pipelined_request")
            return
        self._release()
        self.front.connections.discard(self)
        self.front.handed_over += 1
        self.write_held()  # our answers before aiohttp's
        handler = self.front.handler()
        transport.set_protocol(handler)
        self.transport = None
        handler.connection_made(transport)
        if self._reading_paused:
            transport.resume_reading()
        handler.data_received(b"".join(raw))  # type: ignore[attr-defined]

    # --- answering --------------------------------------------------------------------------------

    def _launch(self, req: FrontRequest) -> None:
        """Answer ``req`` (the current request): by ``forward_now`` if its body is here (the
        fast lane, fastlane.py, or a task it starts), else in a task that reads it."""
        proxy = self.proxy
        if req.models:
            self.task = self.loop.create_task(self._serve(req, self._models(req)))
            return
        body = req.body_now()
        if body is None:  # still coming (or refused): the pipeline reads it
            self.task = self.loop.create_task(self._serve(req, proxy.forward(req, self, anthropic=req.anthropic)))
            return
        try:
            proxy.forward_now(req, body, self, anthropic=req.anthropic)
        except Exception as e:
            self._crashed(req, e)
            self._next(req)

    async def _models(self, req: FrontRequest) -> None:
        await self.send(await self.proxy.models(req))

    def _crashed(self, req: FrontRequest, e: BaseException) -> None:
        """A bug serving ``req``: one request's bug must not take the connection's others (or
        the listener) down. A JSON 500 if nothing of an answer is out yet; the connection
        closes after it (written before the close, which flushes it)."""
        log.error("unhandled error serving a proxy request", path=req.path, error=repr(e), exc_info=e)
        self._closing = True
        self._pending_head = None
        if not self._sent and self.transport is not None:
            self._write_answer(internal_error())

    async def _serve(self, req: FrontRequest, work: Awaitable[object]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            self._closing = True
            if self.transport is not None and self._current is req:
                raise  # stopping: the runner cancelled what outlived its grace
            return
        except Exception as e:
            self._crashed(req, e)
        finally:
            self._next(req)

    def _next(self, done: FrontRequest) -> None:
        """The answer to ``done`` is out: the next pipelined request, a handover, or idle."""
        self.task = None
        self._current = None
        self.front.request_ended()
        self._pending_head = None
        self._sent = False
        if not done.keep_alive or not done.complete or done.too_large:
            self._closing = True  # Connection: close, or a body refused (413)
        if self.transport is None:
            return
        if not done.complete and done.broken is None and self._parsing is done and not done.expect_continue:
            # The client is still sending the body we refused: read it to its end (dropped), then
            # close, so that the close does not reset the connection under our answer (as
            # aiohttp's lingering). The body timer bounds a slow one, LINGER_S a long one.
            self._lingering = True
            self._resume_reading()
            self._enter(BODY)
            self._window = 0
            self.loop.call_later(LINGER_S, self.force_close)
            return
        if self._closing:
            self._finish_connection()
            return
        if self._queue:
            self._current = req = self._queue.pop(0)
            if not self._queue and not self._handover:
                self._resume_reading()
            self._launch(req)
            self._settle(answered=True)
            return
        if self._handover:
            self._try_hand_over()
            return
        self._resume_reading()
        self._settle(answered=True)

    def _finish_connection(self) -> None:
        self.write_held()  # the last answer, before the close
        if self._close_answer is not None:
            self._close_with(self._close_answer)
        elif self.transport is not None:
            self.transport.close()

    def _close_with(self, answer: bytes) -> None:
        """Write a last answer and close without resetting it away: the write side is shut
        (the client reads the answer, then EOF) and what the client still sends is read and
        dropped for up to a second. Closing a socket with unread bytes sends a reset, which can
        reach the client before it has read the answer (a slow client still sending its head)."""
        self.write_held()  # what it answered before
        transport = self.transport
        if transport is None:
            return
        self._close_answer = answer
        self._closing = True
        transport.write(answer)
        if not transport.can_write_eof():  # TLS
            transport.close()
            return
        transport.write_eof()
        self._resume_reading()
        self.loop.call_later(1.0, self.force_close)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()


def install_front(runner: web.AppRunner) -> Front | None:
    """Put the front before aiohttp on every listener ``runner`` serves (its sites are made
    after this: a new socket, the socket handed over by the previous agent, TLS or not). None
    when the app has no proxy, or the runner is not a guarded one."""
    server, app = runner.server, runner.app
    proxy = app.get(PROXY_KEY) if app is not None else None
    if not isinstance(server, GuardedServer) or proxy is None:
        return None
    front = server.front = Front(proxy, server.guard, server.handler)
    return front
