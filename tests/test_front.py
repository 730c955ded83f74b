"""The agent's front protocol (agent/proxy/front.py) over raw sockets: keep-alive, pipelining,
chunked uploads, Expect: 100-continue, malformed heads, a client leaving mid-stream, a slow
reader, and the handover of other requests to aiohttp on the same port.

The listener is the agent's (GuardedRunner + install_front) in process, in front of a real
``Proxy`` over the fake upstreams of test_proxy_inprocess.py and real aiohttp servers standing in
for model servers. Every proxy test of the agent process (test_proxy.py, faults/, ...) runs
through the same protocol end to end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from test_proxy_inprocess import FakeInstance, FakeUpstreams, ok, serve, sse

from agent.proxy import Proxy, add_proxy
from agent.proxy.front import Front, FrontProtocol, install_front
from agent.proxy.metrics import ProxyMetrics
from gpufleet.facts import REQUEST_ID_HEADER
from gpufleet.httpserver import ApiSection, ConnectionGuard, GuardedRunner

__all__ = ["serve"]  # the fixture, imported for pytest

CHAT = "/v1/chat/completions"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
STREAM_BODY = b'{"model": "m", "stream": true, "messages": []}'


class Port:
    def __init__(self, port: int, front: Front, proxy: Proxy, runner: web.AppRunner) -> None:
        self.port, self.front, self.proxy, self.runner = port, front, proxy, runner

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def port() -> AsyncIterator[Callable[..., Awaitable[Port]]]:
    """``make(upstreams)``: the agent's listener (front + aiohttp app with the proxy, /healthz
    and an admin-like POST route) on a free port."""
    runners: list[web.AppRunner] = []

    async def make(upstreams: FakeUpstreams) -> Port:
        proxy = Proxy(upstreams, ProxyMetrics(CollectorRegistry(auto_describe=False)))
        app = web.Application(client_max_size=upstreams.proxy_cfg.max_body_bytes)
        add_proxy(app, proxy)

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def admin(request: web.Request) -> web.Response:
            return web.json_response({"admin": len(await request.read())})

        app.router.add_get("/healthz", healthz)
        app.router.add_post("/admin/reload", admin)
        guard = ConnectionGuard(ApiSection(), cap=64)
        runner = GuardedRunner(app, guard, access_log=None, handle_signals=False, handler_cancellation=True)
        await runner.setup()
        runners.append(runner)
        front = install_front(runner)
        assert front is not None
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        return Port(site._server.sockets[0].getsockname()[1], front, proxy, runner)  # type: ignore[attr-defined]

    yield make
    for r in runners:
        await r.cleanup()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}".encode() + (
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer: status, headers (lower-case names), body (de-chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)}
    if status == 100:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return status, headers, bytes(body)
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


def recording(seen: list[bytes]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(body)
        return web.json_response({"len": len(body), "rid": request.headers.get(REQUEST_ID_HEADER)})

    return handle


# --- keep-alive and pipelining ------------------------------------------------------------------


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(port: Any, serve: Any) -> None:
    p = await port(FakeUpstreams([FakeInstance("a", await serve(recording([])))]))
    reader, writer = await p.connect()
    writer.write(post(CHAT, BODY, f"{REQUEST_ID_HEADER}: one\r\n"))
    status, headers, body = await response(reader)
    assert status == 200 and json.loads(body)["rid"] == "one" and headers[REQUEST_ID_HEADER.lower()] == "one"
    # Three pipelined in one write: three answers, in order, on the same connection.
    writer.write(b"".join(post(CHAT, BODY, f"{REQUEST_ID_HEADER}: p{i}\r\n") for i in range(3)))
    for i in range(3):
        status, _, body = await response(reader)
        assert status == 200 and json.loads(body)["rid"] == f"p{i}"
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await response(reader)
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["m"]
    assert p.front.handed_over == 0  # all of it on the front
    writer.close()


async def test_chunked_upload_and_expect_100_continue(port: Any, serve: Any) -> None:
    seen: list[bytes] = []
    p = await port(FakeUpstreams([FakeInstance("a", await serve(recording(seen)))]))
    reader, writer = await p.connect()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    writer.write(head)
    for piece in (BODY[:10], BODY[10:30], BODY[30:]):
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    status, _, body = await response(reader)
    assert status == 200 and json.loads(body)["len"] == len(BODY) and seen == [BODY]
    # Expect: 100-continue: the interim answer first, the body after it.
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
    )
    status, _, _ = await response(reader)
    assert status == 100
    writer.write(BODY)
    status, _, body = await response(reader)
    assert status == 200 and seen == [BODY, BODY]
    writer.close()


async def test_a_body_over_the_limit_is_413_without_100_continue_and_closes(port: Any, serve: Any) -> None:
    p = await port(FakeUpstreams([FakeInstance("a", await serve(ok("a")))], max_body_bytes=1024))
    reader, writer = await p.connect()
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n".encode())
    status, headers, body = await response(reader)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert headers["connection"] == "close"
    assert await reader.read() == b""  # closed, nothing else
    # Sent anyway (no Expect): the rest is read and dropped, so the close resets nothing.
    reader, writer = await p.connect()
    big = b"x" * 300_000
    writer.write(post(CHAT, big))
    status, _, body = await response(reader)
    assert status == 413 and await reader.read() == b""
    # Chunked past the limit: the same.
    reader, writer = await p.connect()
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    writer.write(b"%x\r\n%s\r\n" % (2000, b"y" * 2000) + b"0\r\n\r\n")
    status, _, body = await response(reader)
    assert status == 413 and await reader.read() == b""


# --- bad bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"G\xffT /v1/models HTTP/1.1\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nX-B\xffd: 1\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: a\r\nContent-Type: b\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
async def test_malformed_heads_get_a_json_400(port: Any, serve: Any, raw: bytes) -> None:
    p = await port(FakeUpstreams([FakeInstance("a", await serve(ok("a")))]))
    reader, writer = await p.connect()
    writer.write(raw)
    status, headers, body = await response(reader)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["message"]
    writer.close()
    # The same bytes after an answered request on a kept-alive connection: aiohttp's as well.
    reader, writer = await p.connect()
    writer.write(post(CHAT, BODY))
    assert (await response(reader))[0] == 200
    writer.write(raw)
    status, headers, body = await response(reader)
    assert status == 400 and json.loads(body)["error"]["message"]
    writer.close()


async def test_broken_chunking_under_a_request_is_400_bad_body(port: Any, serve: Any) -> None:
    p = await port(FakeUpstreams([FakeInstance("a", await serve(ok("a")))]))
    reader, writer = await p.connect()
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    await writer.drain()
    writer.write(b"5\r\n{}\r\nzz\r\n")
    status, _, body = await response(reader)
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_body"
    assert await reader.read() == b""


# --- handover to aiohttp ---------------------------------------------------------------------------


async def test_other_requests_go_to_aiohttp_on_the_same_port(port: Any, serve: Any) -> None:
    p = await port(FakeUpstreams([FakeInstance("a", await serve(ok("a")))]))
    reader, writer = await p.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await response(reader)
    assert status == 200 and json.loads(body) == {"status": "ok"} and p.front.handed_over == 1
    writer.write(post(CHAT, BODY))  # aiohttp keeps the connection, and serves the proxy routes too
    status, _, body = await response(reader)
    assert status == 200 and json.loads(body)["served_by"] == "a"
    writer.close()
    # Kept alive after a proxy request: handed over at the admin request, its body with it.
    reader, writer = await p.connect()
    writer.write(post(CHAT, BODY))
    assert (await response(reader))[0] == 200
    writer.write(post("/admin/reload", b"12345"))
    status, _, body = await response(reader)
    assert status == 200 and json.loads(body) == {"admin": 5} and p.front.handed_over == 2
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await response(reader))[0] == 200
    writer.close()


async def test_an_admin_request_pipelined_behind_a_proxy_request_is_refused(port: Any, serve: Any) -> None:
    p = await port(FakeUpstreams([FakeInstance("a", await serve(ok("a")))]))
    reader, writer = await p.connect()
    writer.write(post(CHAT, BODY) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await response(reader))[0] == 200
    status, headers, body = await response(reader)
    assert status == 400 and json.loads(body)["error"]["code"] == "pipelined_request"
    assert headers["connection"] == "close" and await reader.read() == b""


# --- streams: the client leaving, a slow reader ---------------------------------------------------------


async def test_a_client_leaving_mid_stream_cancels_the_upstream(port: Any, serve: Any) -> None:
    gone = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b'data: {"x": 1}\n\n')
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise

    p = await port(FakeUpstreams([FakeInstance("a", await serve(endless))]))
    reader, writer = await p.connect()
    writer.write(post(CHAT, STREAM_BODY))
    await reader.readuntil(b"data: ")  # the stream is under way
    writer.transport.abort()
    await asyncio.wait_for(gone.wait(), 10)  # the upstream's connection was closed under it
    assert p.proxy.stats.in_flight("a") == 0


async def test_a_slow_reader_holds_the_upstream_back(port: Any, serve: Any) -> None:
    chunk = b"data: " + b"x" * 65_530 + b"\n\n"
    total = 1000  # ~64 MiB: far more than every socket buffer on the way together
    done = asyncio.Event()

    async def firehose(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(total):
            await resp.write(chunk)
        await resp.write_eof()
        done.set()
        return resp

    p = await port(FakeUpstreams([FakeInstance("a", await serve(firehose))]))
    paused = asyncio.Event()
    original = FrontProtocol.pause_writing

    def pause_writing(self: FrontProtocol) -> None:
        original(self)
        paused.set()

    FrontProtocol.pause_writing = pause_writing  # type: ignore[method-assign]
    try:
        reader, writer = await p.connect()
        writer.write(post(CHAT, STREAM_BODY))
        await asyncio.wait_for(paused.wait(), 10)  # the client's buffer filled up: writes wait
        [conn] = p.front.connections
        assert conn.transport.get_write_buffer_size() <= 2 * 64 * 1024 + len(chunk)
        with pytest.raises(TimeoutError):  # nothing reads: the upstream cannot finish either
            await asyncio.wait_for(done.wait(), 1.0)
        status, _, body = await response(reader)
        assert status == 200 and len(body) == total * len(chunk)
        await asyncio.wait_for(done.wait(), 10)
    finally:
        FrontProtocol.pause_writing = original  # type: ignore[method-assign]
    writer.close()


async def test_sse_errors_before_the_first_chunk_are_retried_on_the_front(port: Any, serve: Any) -> None:
    dying = FakeInstance("a", await serve(sse([], die_before_first=True)))
    fine = FakeInstance("b", await serve(sse([b"data: 1\n\n", b"data: [DONE]\n\n"])))
    p = await port(FakeUpstreams([dying, fine]))
    for _ in range(2):  # whichever is picked first, the answer is b's stream
        reader, writer = await p.connect()
        writer.write(post(CHAT, STREAM_BODY))
        status, headers, body = await response(reader)
        assert status == 200 and headers["x-gpufleet-instance"] == "b"
        assert body == b"data: 1\n\ndata: [DONE]\n\n"
        writer.close()


async def test_a_stop_lets_requests_in_progress_finish(port: Any, serve: Any) -> None:
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(0.5)  # the model generating
        return web.json_response({"done": True})

    p = await port(FakeUpstreams([FakeInstance("a", await serve(slow))]))
    idle_reader, _ = await p.connect()
    reader, writer = await p.connect()
    writer.write(post(CHAT, BODY))
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.ensure_future(p.runner.cleanup())
    assert await idle_reader.read() == b""  # an idle connection is closed at once
    status, headers, body = await response(reader)  # the one in progress gets its answer
    assert status == 200 and json.loads(body) == {"done": True} and headers["connection"] == "close"
    await stopping


async def test_a_bug_in_the_pipeline_is_a_json_500_or_a_cut_stream_never_a_mixed_answer(port: Any, serve: Any) -> None:
    p = await port(FakeUpstreams([FakeInstance("a", await serve(ok("a")))]))

    async def broken(request: Any, sink: Any, ctx: Any, parsed: Any = None) -> None:
        raise RuntimeError("a bug")

    async def broken_mid_stream(request: Any, sink: Any, ctx: Any, parsed: Any = None) -> None:
        await sink.start(200, CIMultiDict({"Content-Type": "text/event-stream"}))
        await sink.write(b"data: 1\n\n")
        raise RuntimeError("a bug")

    def broken_now(request: Any, body: bytes, sink: Any, *, anthropic: bool = False) -> None:
        raise RuntimeError("a bug")

    # In the fast lane (fastlane.py), which runs in the protocol's callbacks.
    p.proxy.forward_now = broken_now
    for _ in range(2):  # the connection survives nothing, the listener does
        reader, writer = await p.connect()
        writer.write(post(CHAT, BODY))
        status, headers, body = await response(reader)
        assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
        assert headers["connection"] == "close" and await reader.read() == b""
    # In the coroutine pipeline (where a request goes that some step makes wait).
    del p.proxy.forward_now
    p.proxy._must_wait = lambda model, forwarded: True
    p.proxy._forward = broken
    reader, writer = await p.connect()
    writer.write(post(CHAT, STREAM_BODY))
    status, headers, body = await response(reader)
    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
    assert headers["connection"] == "close" and await reader.read() == b""
    p.proxy._forward = broken_mid_stream
    reader, writer = await p.connect()
    writer.write(post(CHAT, STREAM_BODY))
    with pytest.raises(asyncio.IncompleteReadError):  # the stream is cut: no terminating chunk
        await response(reader)


async def test_only_the_upstream_stalling_ends_a_stream_not_a_slow_reader(port: Any, serve: Any) -> None:
    chunk = b"data: " + b"x" * 65_530 + b"\n\n"
    stall = asyncio.Event()

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(300):  # ~19 MiB: the proxy waits on the client, not on us
            await resp.write(chunk)
        await stall.wait()  # then nothing: an engine stuck mid-generation
        return resp

    p = await port(FakeUpstreams([FakeInstance("a", await serve(upstream))], stream_idle_timeout_s=0.3))
    reader, writer = await p.connect()
    writer.write(post(CHAT, STREAM_BODY))
    # Not a wait for a condition: the client reads nothing for 1 s, over the 0.3 s idle limit,
    # while the upstream has plenty to send. That is not the upstream stalling.
    await asyncio.sleep(1.0)
    status, _, body = await response(reader)
    events = body.split(b"\n\n")
    assert status == 200 and events.count(chunk[:-2]) == 300  # all of it, then the stall's error
    assert json.loads(events[-2].removeprefix(b"data: "))["error"]["code"] == "upstream_stream_error"
    assert b"nothing for 0.3s" in events[-2]
    stall.set()
    writer.close()
