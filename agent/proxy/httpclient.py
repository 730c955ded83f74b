"""The proxy's upstream HTTP/1.1 client: asyncio Protocols and httptools (llhttp, in C).

Why not aiohttp's ClientSession: at saturation it was 29 % of the proxy's CPU per request, for
features the relay never uses (cookies, redirects, decompression, DNS caching, a timeout
object per request). This client does what the relay needs and nothing else:

- POST with a body already read whole (the proxy reads it to find the model), head and body
  in one ``writelines``;
- the response head parsed by llhttp; the body handed on as the chunks the upstream sent
  (sized, chunked, or until close), never joined or re-split;
- keep-alive pools per upstream (scheme, host, port), most recently used first, at most
  ``max_idle`` idle connections each (``[proxy] upstream_keepalive``), none kept past
  ``idle_timeout_s``; a connection the upstream closed while idle is never handed out, and
  one it closes just as we reuse it (before any answer) is retried once on a new connection,
  as nginx and browsers do: nothing was answered on it;
- back-pressure: reading from the upstream pauses while more than ``HIGH_WATER`` bytes wait for
  a slow client, and resumes below ``LOW_WATER``;
- a response not read to its end (a client gone, a timeout) closes its connection: a half-read
  connection is never reused;
- two ways to wait for the answer: a coroutine (``post_lines``, then ``readany``/``read``), or,
  on a pooled connection, callbacks (``post_now``): the connection tells a :class:`Listener`
  when the head is here, when the body is complete and when it failed, with no future or task
  per request (the proxy's fast lane, fastlane.py).

Timeouts are the caller's (the relay runs one scope per attempt); only connecting has its own
limit. Errors: :class:`ConnectError` (nothing was sent), :class:`Disconnected` (closed before
the response head), :class:`PayloadError` (the body cut off or malformed).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from gpufleet.outbox import JOIN_BELOW, Outbox

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})  # a body's end is known


class UpstreamError(Exception):
    pass


class ConnectError(UpstreamError):
    """Refused, unreachable, timed out or a failed TLS handshake: nothing was sent."""


class Disconnected(UpstreamError):
    """The connection closed before the response head arrived."""


class PayloadError(UpstreamError):
    """The response body was cut off or malformed."""


class Listener(Protocol):
    def upstream_changed(self) -> None:
        """The response's head arrived, its body completed, or the connection failed: read
        ``Response.progress``. Called after the parser has taken the whole read, never from
        inside it."""


class Origin(NamedTuple):
    tls: bool
    host: str
    port: int
    host_header: bytes  # the Host header's value


def origin_of(base_url: str) -> Origin:
    u = urlsplit(base_url)
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    host = u.hostname or ""
    default = (tls and port == 443) or (not tls and port == 80)
    shown = f"[{host}]" if ":" in host else host
    return Origin(tls, host, port, (shown if default else f"{shown}:{port}").encode("utf-8", "surrogateescape"))


class _Connection(asyncio.Protocol):
    """One upstream connection: parses responses, one at a time, into chunks for the reader."""

    # Slots: one per open stream (issue 18's memory goal is per stream).
    __slots__ = (
        "_changed",
        "_paused",
        "_waiter",
        "buffered",
        "chunks",
        "closed",
        "complete",
        "error",
        "headed",
        "held",
        "idle_since",
        "in_use",
        "keep_alive",
        "listener",
        "loop",
        "outbox",
        "parser",
        "raw_headers",
        "reused",
        "sized",
        "status",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: Outbox | None = None) -> None:
        self.loop = loop
        self.outbox = outbox  # None: a request is written at once
        self.held: tuple[bytes, ...] = ()  # a request written at the end of this turn (gpufleet/outbox.py)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.in_use = False
        self.reused = False
        self.idle_since = 0.0
        self.new_response()

    def new_response(self, listener: Listener | None = None) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headed = False  # the response head is here
        # Told of the head, the end and a failure (post_now); None: a coroutine waits instead.
        self.listener = listener
        self._changed = False  # something the listener must hear of happened in this read
        # A list, not a deque: a deque is 600 bytes even when empty, one per open stream, and
        # the reader takes each chunk soon after it came (one or two are ever waiting).
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.sized = False  # the body's end is known (Content-Length or chunked), not "until close"
        self.error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.in_use:  # bytes nobody asked for (a stray or pipelined answer): unusable
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(PayloadError(f"malformed response: {e}"))
        # The listener hears after the parser is done with the read: what it does next (answer
        # the client, put this connection back, send the next request on it) must not happen
        # inside one of the parser's callbacks.
        if self._changed:
            self._changed = False
            if self.listener is not None:
                self.listener.upstream_changed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.headed:
            if self.error is None:
                self.error = Disconnected(f"closed before the response head{_why(exc)}")
        elif not self.complete and self.error is None:
            if self.sized:
                self.error = PayloadError(f"closed before the end of the body{_why(exc)}")
            else:
                self.complete = True  # a body "until close" ends here
        self._wake()
        if self.listener is not None and self.in_use:
            self.listener.upstream_changed()

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))
        if not self.sized and name.lower() in _FRAMING:
            self.sized = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headed = True
        self._changed = True
        if self._waiter is not None:  # a coroutine reads (none in the fast lane)
            self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._changed = True
        if self._waiter is not None:
            self._wake()

    def send(self, head: bytes, body: bytes, listener: Listener | None = None) -> None:
        """Send a request, head and body in one write (at the end of the turn, with an
        outbox); its answer is parsed from here on."""
        self.new_response(listener)
        self.in_use = True
        assert self.transport is not None
        if self.outbox is None:
            self.transport.writelines((head, body) if body else (head,))
            return
        # One request at a time: its answer comes in a later turn.
        self.held = (head + body,) if len(body) < JOIN_BELOW else (head, body)
        self.outbox.hold(self)

    def write_held(self) -> None:
        held, self.held = self.held, ()
        transport = self.transport
        if not held or self.closed or transport is None or transport.is_closing():
            return
        if len(held) == 1:
            transport.write(held[0])
        else:
            transport.writelines(held)

    # --- the reader's side ------------------------------------------------------------------------

    async def wait_head(self) -> None:
        """Until the response head is here; the connection's error if it failed first."""
        while not self.headed:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def _wait(self) -> None:
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_chunk(self) -> bytes:
        """The next chunk as the upstream sent it; b"" at the end of the body."""
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            await self._wait()
        chunk = self.chunks.pop(0)
        self.buffered -= len(chunk)
        if self._paused and self.buffered < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.error is None and not self.closed

    def close(self) -> None:
        self.closed = True  # a request held and not yet written never is (write_held)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        self._changed = True
        self.close()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


def _why(exc: Exception | None) -> str:
    return f": {exc}" if exc else ""


class Response:
    """An upstream's answer: ``status``, ``headers``, and the body through ``readany``/``read``.
    Use as an async context manager (or call ``release``): its connection goes back to the pool
    only when the body was read to its end."""

    __slots__ = ("_client", "_conn", "_headers", "_origin", "readany", "status")

    def __init__(self, client: UpstreamClient, origin: Origin, conn: _Connection) -> None:
        self._client = client
        self._origin = origin
        self._conn = conn
        self._headers: CIMultiDict[str] | None = None
        self.status = conn.status
        # The next chunk as the upstream sent it, b"" at the end: the connection's own method,
        # not a coroutine around it (one frame less per stream, one call less per event).
        self.readany = conn.read_chunk

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The head's fields as the upstream sent them (names in their own case)."""
        return self._conn.raw_headers

    def header(self, name: bytes) -> bytes | None:
        """The first field called ``name`` (lower-case), without decoding the others."""
        for n, v in self._conn.raw_headers:
            if n.lower() == name:
                return v
        return None

    @property
    def headers(self) -> CIMultiDict[str]:
        if self._headers is None:
            self._headers = CIMultiDict(
                (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for n, v in self._conn.raw_headers
            )
        return self._headers

    @property
    def content(self) -> Response:
        return self  # aiohttp's ``response.content.readany()`` reads the same

    def progress(self) -> bool:
        """With a listener (``post_now``): False while the answer is not whole, True once its
        body is complete; raises the connection's error (Disconnected before the head,
        PayloadError after it). ``status`` is set once the head is here (``headed``)."""
        conn = self._conn
        if conn.error is not None:
            raise conn.error
        if conn.headed and not self.status:
            self.status = conn.status
        return conn.complete

    @property
    def headed(self) -> bool:
        return self._conn.headed

    @property
    def reused(self) -> bool:
        """Sent on a kept-alive connection (one the upstream may have closed as we reused it)."""
        return self._conn.reused

    def body_now(self) -> bytes:
        """The whole body, once ``progress()`` said it is complete."""
        chunks = self._conn.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._conn.buffered = 0
        return body

    def detach(self) -> None:
        """No listener any more: a coroutine reads the rest (``readany``)."""
        self._conn.listener = None

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._conn.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        conn = self._conn
        conn.in_use = False
        conn.listener = None
        if conn.reusable():
            self._client.put_back(self._origin, conn)
        else:
            conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class UpstreamClient:
    def __init__(
        self,
        ssl_context: ssl.SSLContext | bool = True,
        connect_timeout_s: Callable[[], float] = lambda: 5.0,
        max_idle: Callable[[], int] = lambda: 64,
        idle_timeout_s: float = 30.0,
        outbox: Outbox | None = None,
    ) -> None:
        # https upstreams are verified with this (True: the system's trust store); never False.
        default = ssl_context if isinstance(ssl_context, ssl.SSLContext) else None
        self._ssl: ssl.SSLContext = default or ssl.create_default_context()
        self._connect_timeout_s = connect_timeout_s  # read live: a reload applies at once
        self._max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self._outbox = outbox  # requests written at the end of the turn (None: at once)
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._origins: dict[str, Origin] = {}

    async def post(self, base_url: str, path: str, headers: Iterable[tuple[str, str]], body: bytes) -> Response:
        """Send the request; the response once its head is here (ConnectError, Disconnected)."""
        return await self.post_lines(base_url, path, header_lines(headers), body)

    async def post_lines(self, base_url: str, path: str, lines: bytes, body: bytes) -> Response:
        """``post`` with the headers already as lines (``Name: value\\r\\n`` each, no line
        breaks inside: the caller's promise); Host and Content-Length are the client's."""
        origin = self._origin(base_url)
        data = _request_head(origin, path, lines, body)
        while True:
            conn = self._pooled(origin) or await self._connect(origin)
            try:
                return await self._exchange(origin, conn, data, body)
            except Disconnected:
                if not conn.reused:
                    raise
                # Closed by the upstream just as we reused it (its idle timeout, a restart):
                # nothing was answered on it; a new connection, not a pooled one, comes next.
                self._drop(origin)

    def post_now(self, base_url: str, path: str, lines: bytes, body: bytes, listener: Listener) -> Response | None:
        """``post_lines`` without waiting, on a kept-alive connection: the request is written
        and ``listener`` is told of its answer (``Response.progress``). None, with nothing
        sent, when no idle connection is pooled for ``base_url`` (then ``post_lines``
        connects). A pooled connection the upstream closes as we reuse it fails with
        Disconnected (``Response.reused``): the caller retries it on a new one."""
        origin = self._origin(base_url)
        conn = self._pooled(origin)
        if conn is None:
            return None
        conn.send(_request_head(origin, path, lines, body), body, listener)
        return Response(self, origin, conn)

    def _origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = origin_of(base_url)
        return origin

    async def _exchange(self, origin: Origin, conn: _Connection, head: bytes, body: bytes) -> Response:
        try:
            conn.send(head, body)
            await conn.wait_head()
        except BaseException:
            conn.in_use = False
            conn.close()  # an answer we stopped waiting for must not reach the next request
            raise
        return Response(self, origin, conn)

    def _pooled(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have timed out
            if not conn.closed and now - conn.idle_since < self.idle_timeout_s:
                conn.reused = True
                return conn
            conn.close()
        return None

    def drop_idle(self, base_url: str) -> None:
        """Close the idle connections to ``base_url``: one was found closed as it was reused,
        and the others are as old (the upstream restarted, or its idle timeout passed)."""
        self._drop(self._origin(base_url))

    def _drop(self, origin: Origin) -> None:
        for conn in self._idle.pop(origin, ()):
            conn.close()

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s()):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._outbox),
                    origin.host,
                    origin.port,
                    ssl=self._ssl if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError:
            raise ConnectError(f"connect to {origin.host}:{origin.port} timed out") from None
        except (OSError, ssl.SSLError) as e:
            raise ConnectError(f"connect to {origin.host}:{origin.port}: {e}") from None
        return conn

    def put_back(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        conn.idle_since = time.monotonic()
        idle.append(conn)
        while len(idle) > self._max_idle():
            idle.popleft().close()  # the longest idle goes first

    def idle_connections(self) -> int:
        return sum(len(d) for d in self._idle.values())

    async def close(self) -> None:
        for origin in list(self._idle):
            self._drop(origin)


def _request_head(origin: Origin, path: str, lines: bytes, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n" % (
        path.encode("utf-8", "surrogateescape"),
        origin.host_header,
        len(body),
        lines,
    )


def header_lines(headers: Iterable[tuple[str, str]]) -> bytes:
    """Headers as request lines; ValueError for a line break in a name or value, which would
    split the request in two (header injection)."""
    lines = []
    for name, value in headers:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"header {name!r} has a line break")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")
