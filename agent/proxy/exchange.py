"""What the proxy's pipeline needs of an HTTP exchange: a request and a response sink.

The pipeline (server.py, relay.py, degrade.py, the key gate) depends on these two small
interfaces instead of aiohttp's ``Request`` and ``StreamResponse``, so the same code runs behind
two listeners: the agent's own front protocol (front.py: the data path, no aiohttp object per
request) and aiohttp's server (``add_proxy``: the in-process tests, bench/routing.py, and a
connection that aiohttp already serves because it began with an admin request).

- :class:`Request`: ``method``, ``path``, ``path_qs``, ``headers`` (case-insensitive),
  ``header(name)`` (one field, without ``headers`` being made: the front protocol makes them
  only when asked, and the common case asks for three fields, most often absent),
  ``raw_headers`` (the same as the parser gave them, valid UTF-8: what the relay passes on
  without decoding and encoding them again), ``remote``, and ``read()``, the whole body,
  which raises :class:`BodyTooLarge` past ``[proxy] max_body_bytes`` and
  :class:`BodyUnreadable` when its framing is broken.
- :class:`Sink`: a whole answer (``send``), or a stream (``start``, ``write``..., ``end``). A
  client that goes away cancels the task running the pipeline (the listener does it, as aiohttp's
  ``handler_cancellation`` did): that is the "client gone" signal, and it closes the upstream.
- :class:`Answer`: a whole answer, or the record of a stream already written (``sent``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol

import msgspec
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

Headers = CIMultiDict[str] | CIMultiDictProxy[str]


class BodyTooLarge(Exception):
    """The request body is larger than ``[proxy] max_body_bytes``: the proxy answers 413."""


class BodyUnreadable(Exception):
    """The request body broke while being received (bad chunking): the proxy answers 400."""


class Request(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def path_qs(self) -> str: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def remote(self) -> str | None: ...

    def header(self, name: str) -> str | None:
        """The first field called ``name`` (in any case); None when there is none."""
        ...

    async def read(self) -> bytes: ...


class Cancellable(Protocol):
    """What answers a request, as the listener cancels it when the client leaves: a task, or
    the fast lane's request (fastlane.py)."""

    def cancel(self) -> object: ...
    def done(self) -> bool: ...


class Answer:
    """A whole answer (status, headers, body), or, with ``sent``, a stream already written
    through the sink (status and headers kept for the access log and the caller).

    An answer relayed whole carries its headers as the header lines to send (``lines``: the
    upstream's as its parser gave them, and ours), which the front protocol writes as they are;
    ``headers`` decodes them only when something asks (a rewrite, the degradation cache,
    aiohttp's listener), and from then on the decoded headers are the answer's."""

    __slots__ = ("_headers", "body", "lines", "sent", "status")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str] | None,
        body: bytes = b"",
        *,
        sent: bool = False,
        lines: bytes | None = None,
    ) -> None:
        self.status, self._headers, self.body, self.sent, self.lines = status, headers, body, sent, lines

    @property
    def headers(self) -> CIMultiDict[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDict(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, _, value in (line.partition(b": ") for line in (self.lines or b"").split(b"\r\n") if line)
            )
            self.lines = None
        return headers


def internal_error() -> Answer:
    """The JSON 500 of a bug in the pipeline (the listener's, or a fast-lane callback's)."""
    error = {"message": "internal error", "type": "server_error", "code": "internal_error"}
    return Answer(500, CIMultiDict({"Content-Type": "application/json"}), msgspec.json.encode({"error": error}))


def answer_of(resp: web.Response | Answer) -> Answer:
    """An answer the shared helpers made as an aiohttp ``Response`` (error_response,
    json_response, the key gate's refusals): only on refusals, never per relayed answer."""
    if isinstance(resp, Answer):
        return resp
    body = resp.body
    return Answer(resp.status, CIMultiDict(resp.headers), body if isinstance(body, bytes) else b"")


class Sink(Protocol):
    async def send(self, answer: Answer) -> None:
        """The whole answer, with its Content-Length."""

    async def start(self, status: int, headers: CIMultiDict[str]) -> None:
        """Begin a chunked stream; the head may wait to go out with the first ``write``."""

    async def write(self, chunk: bytes) -> None:
        """One chunk of the stream; waits while the client is slow to read (back-pressure)."""

    async def end(self) -> None:
        """The stream's end."""


class NowSink(Sink, Protocol):
    """A :class:`Sink` that also serves the fast lane (fastlane.py): the front protocol."""

    def answering(self, request: Cancellable) -> None:
        """``request`` answers the current request by callbacks (a client leaving cancels it)."""

    def send_now(self, answer: Answer) -> None:
        """The whole answer, written at once; then the connection goes on to its next request."""

    def carry_on(self, work: Awaitable[object]) -> None:
        """The rest of the current request in a task: ``work`` answers it."""


# --- the aiohttp side ------------------------------------------------------------------------


class AiohttpRequest:
    """An aiohttp ``Request`` as the pipeline's :class:`Request`."""

    __slots__ = ("_request", "headers", "method", "path", "path_qs", "raw_headers", "remote")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.method, self.path, self.path_qs = request.method, request.path, request.path_qs
        self.headers, self.raw_headers, self.remote = request.headers, request.raw_headers, request.remote

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    async def read(self) -> bytes:
        try:
            return await self._request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge from None


class AiohttpSink:
    """A :class:`Sink` over aiohttp's response objects; ``response`` is what the handler returns."""

    __slots__ = ("_request", "response")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None

    async def send(self, answer: Answer) -> None:
        self.response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def start(self, status: int, headers: CIMultiDict[str]) -> None:
        resp = self.response = web.StreamResponse(status=status, headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(self._request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()
