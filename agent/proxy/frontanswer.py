"""The answering half of a front connection (front.py): the pipeline's
:class:`~agent.proxy.exchange.Sink` and the fast lane's ``NowSink``, the answer's head, the
writes held to the end of the loop's turn (gpufleet/outbox.py) and the client's back-pressure.

A mixin of :class:`~agent.proxy.front.FrontProtocol`, which holds the state (its slots): a
connection is one object, as thousands of open streams each hold one (issue 18's goal is at
most 16 KB per stream), and its reading half decides what comes next once an answer is out
(``_next``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from gpufleet.outbox import JOIN_BELOW, Outbox

from .exchange import Answer, Cancellable

if TYPE_CHECKING:
    from gpufleet.httpserver import ConnectionGuard

    from .front import Front
    from .frontrequest import FrontRequest

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
CLOSE = b"Connection: close\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class _Date:
    """The ``Date`` header line, formatted once a second, not per answer."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode() + b"\r\n"
        return self._line


_date = _Date()


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Status\r\n".encode()


class Answering:
    """What a front connection does to answer its current request (see the module docstring)."""

    __slots__ = ()
    # FrontProtocol's state that answering reads and writes.
    front: Front
    loop: asyncio.AbstractEventLoop
    transport: Any
    task: Cancellable | None
    _guard: ConnectionGuard
    _outbox: Outbox
    _current: FrontRequest | None
    _queue: list[FrontRequest]
    _closing: bool
    _pending_head: bytes | None
    _sent: bool
    _held: list[bytes]
    _write_paused: bool
    _drain: asyncio.Future[None] | None
    _after_drain: FrontRequest | None
    # The reading half's, which decides what comes after an answer.
    _next: Callable[[FrontRequest], None]
    _serve: Callable[[FrontRequest, Awaitable[object]], Coroutine[Any, Any, None]]

    def _head(self, status: int, headers: CIMultiDict[str] | bytes, framing: bytes) -> bytes:
        """An answer's head; ``headers`` as a dict, or as header lines ready to send."""
        parts = [status_line(status)]
        if isinstance(headers, bytes):
            parts.append(headers)
        else:
            parts.append("".join([f"{k}: {v}\r\n" for k, v in headers.items()]).encode("utf-8", "surrogateescape"))
        parts.append(framing)
        parts.append(_date.line())
        if self._closing or self._guard.draining or self.front.stopping or not self._keeps_alive():
            parts.append(CLOSE)
            self._closing = True
        parts.append(b"\r\n")
        return b"".join(parts)

    def _keeps_alive(self) -> bool:
        req = self._current
        return req is None or (req.keep_alive and req.complete and not req.too_large)

    # The Sink interface (agent/proxy/exchange.py), for the current request.

    async def send(self, answer: Answer) -> None:
        self._write_answer(answer)
        if self._write_paused:
            await self._drained()

    def _write_answer(self, answer: Answer) -> None:
        self._sent = True
        body = answer.body
        lines = answer.lines
        framing = b"Content-Length: %d\r\n" % len(body)
        head = self._head(answer.status, lines if lines is not None else answer.headers, framing)
        self.write_raw(head + body if len(body) < JOIN_BELOW else None, head, body)
        if self._queue:
            self.write_held()  # a pipelined request is next: it waits if the client reads slowly

    # The fast lane's (NowSink, agent/proxy/exchange.py).

    def answering(self, request: Cancellable) -> None:
        self.task = request

    def send_now(self, answer: Answer) -> None:
        req = self._current
        assert req is not None
        self._write_answer(answer)
        if self._write_paused and self.transport is not None:
            self._after_drain = req  # the next request once the client reads (resume_writing)
        else:
            self._next(req)

    def carry_on(self, work: Awaitable[object]) -> None:
        req = self._current
        assert req is not None
        self.task = self.loop.create_task(self._serve(req, work))

    async def start(self, status: int, headers: CIMultiDict[str]) -> None:
        self._pending_head = self._head(status, headers, _CHUNKED)

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left: the task's cancellation follows
        self._sent = True
        if self._held:
            self.write_held()  # before this chunk
        size = b"%x\r\n" % len(chunk)
        head, self._pending_head = self._pending_head, None
        if head is not None:
            transport.writelines((head, size, chunk, b"\r\n"))
        else:
            transport.writelines((size, chunk, b"\r\n"))
        if self._write_paused:
            await self._drained()

    async def end(self) -> None:
        self._sent = True
        head, self._pending_head = self._pending_head, None
        self.write_raw(head + _LAST_CHUNK if head is not None else _LAST_CHUNK)

    def write_raw(self, data: bytes | None, *parts: bytes) -> None:
        """Write ``data`` (or ``parts``) at the end of this turn (gpufleet/outbox.py)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        held = self._held
        if not held:
            self._outbox.hold(self)
        if data is not None:
            held.append(data)
        else:
            held += parts

    def write_held(self) -> None:
        held = self._held
        if not held:
            return
        self._held = []
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left, or the connection was closed under it
        if len(held) == 1:
            transport.write(held[0])
        else:
            transport.writelines(held)

    # --- back-pressure -----------------------------------------------------------------------------

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()
        req, self._after_drain = self._after_drain, None
        if req is not None:
            self._next(req)

    def _wake_writer(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def _drained(self) -> None:
        """Wait while the client reads slower than the answer comes (the transport's buffer is
        over its high-water mark)."""
        if not self._write_paused or self.transport is None:
            return
        if self._drain is None:
            self._drain = self.loop.create_future()
        await self._drain
