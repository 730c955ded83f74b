"""A request of the data path as the front protocol (front.py) parsed it: the pipeline's
:class:`~agent.proxy.exchange.Request` over httptools' fields, and its body as it comes in."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from .context import ANTHROPIC_ROUTES
from .exchange import BodyTooLarge, BodyUnreadable

if TYPE_CHECKING:
    from .front import FrontProtocol

_ANTHROPIC = frozenset(ANTHROPIC_ROUTES)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Header names as FrontRequest.header looks them up among the parser's: the pipeline's few
# names (its constants, [proxy] affinity_header), each lowered once.
_lowered_names: dict[str, bytes] = {}


class FrontRequest:
    """One request of the data path: the pipeline's :class:`~agent.proxy.exchange.Request`.

    Its fields stay as the parser gave them (``raw_headers``, with their names in lower case in
    ``lowered``): ``headers`` is made the first time something asks for it (the key gate, the
    degradation cache's key, a rare header), and ``header`` answers the common case's few
    questions without it. Making a case-insensitive dict of every request's fields cost about
    6 % of the proxy's CPU per request (bench/proxy_inproc.py)."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_continued",
        "_headers",
        "_waiter",
        "anthropic",
        "broken",
        "complete",
        "expect_continue",
        "keep_alive",
        "limit",
        "lowered",
        "method",
        "models",
        "path",
        "path_qs",
        "raw_headers",
        "remote",
        "size",
        "too_large",
    )

    def __init__(
        self,
        conn: FrontProtocol,
        method: str,
        path: str,
        path_qs: str,
        raw_headers: list[tuple[bytes, bytes]],
        lowered: list[bytes],
        limit: int,
    ) -> None:
        self._conn = conn
        self.method, self.path, self.path_qs = method, path, path_qs
        self.raw_headers = raw_headers  # checked by the front: valid UTF-8
        self.lowered = lowered  # the names of raw_headers in lower case, in the same order
        self._headers: CIMultiDict[str] | None = None
        self.remote = conn.remote
        self.models = method == "GET"
        self.anthropic = path in _ANTHROPIC
        self._chunks: list[bytes] = []
        self.size = 0
        self.limit = limit  # [proxy] max_body_bytes as the request began: a reload does not move it
        self.complete = False
        self.too_large = False
        self.broken: str | None = None  # the body's framing broke (the parser's reason)
        self.expect_continue = False
        self._continued = False
        self.keep_alive = True
        self._waiter: asyncio.Future[None] | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDict([(n.decode(), v.decode()) for n, v in self.raw_headers])
        return headers

    def header(self, name: str) -> str | None:
        """The first field called ``name`` (in any case), without making ``headers``."""
        if self._headers is not None:
            return self._headers.get(name)
        low = _lowered_names.get(name)
        if low is None:
            low = _lowered_names[name] = name.lower().encode("utf-8", "surrogateescape")
        value = self.raw_value(low)
        return None if value is None else value.decode()

    def raw_value(self, low: bytes) -> bytes | None:
        """The first field called ``low`` (a lower-case name), as the parser gave it."""
        lowered = self.lowered
        if low not in lowered:  # most lookups: a field the client did not send
            return None
        return self.raw_headers[lowered.index(low)][1]

    async def read(self) -> bytes:
        if not self.complete and not self.too_large and self.broken is None:
            if self.expect_continue and not self._continued:
                self._continued = True
                self._conn.write_raw(CONTINUE)
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.too_large:
            raise BodyTooLarge
        if self.broken is not None:
            raise BodyUnreadable(self.broken)
        return self._joined()

    def body_now(self) -> bytes | None:
        """The whole body if it is here and acceptable (None: ``read`` waits for it, or raises)."""
        if not self.complete or self.too_large or self.broken is not None:
            return None
        return self._joined()

    def _joined(self) -> bytes:
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def add(self, data: bytes) -> None:
        if self.too_large:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.too_large = True
            self._chunks = []
            self.wake()
            return
        self._chunks.append(data)

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
