"""The fast lane (agent/proxy/fastlane.py): a request whose first attempt runs by callbacks, and
every way it leaves the lane for the coroutine pipeline with nothing lost.

Each test warms the instances' connection pools first (the lane takes only pooled connections),
then checks that the request under test began in the lane (``Proxy._forward``, the coroutine
pipeline's entry, was not called for it) and what the client saw.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from test_front import BODY, CHAT, Port, port, post, response
from test_proxy_inprocess import FakeInstance, FakeUpstreams, ok, serve

from agent.config import ModelLimit
from agent.proxy.fastlane import FastRequest
from gpufleet.facts import INSTANCE_HEADER, REQUEST_ID_HEADER
from gpufleet_dev.fleetbase import wait_until

__all__ = ["port", "serve"]  # the fixtures, imported for pytest


class Lanes:
    """How each request on ``p`` began: in the fast lane, or in the coroutine pipeline."""

    def __init__(self, p: Port, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fast = 0
        self.slow = 0
        forward, start = p.proxy._forward, FastRequest.start

        async def counted_forward(*args: Any, **kwargs: Any) -> Any:
            self.slow += 1
            return await forward(*args, **kwargs)

        def counted_start(fast: FastRequest) -> None:
            self.fast += 1
            start(fast)

        monkeypatch.setattr(p.proxy, "_forward", counted_forward)
        monkeypatch.setattr(FastRequest, "start", counted_start)


async def ask(p: Port, body: bytes = BODY, rid: str = "r") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await p.connect()
    try:
        writer.write(post(CHAT, body, f"{REQUEST_ID_HEADER}: {rid}\r\n"))
        return await response(reader)
    finally:
        writer.close()


def switchable(healthy: Callable[[web.Request], Any]) -> tuple[Callable[[web.Request], Any], dict[str, Any]]:
    """A model server answering with ``healthy`` until ``mode["then"]`` is set to another handler."""
    mode: dict[str, Any] = {"then": None}

    async def handle(request: web.Request) -> web.StreamResponse:
        then = mode["then"]
        return await (then or healthy)(request)

    return handle, mode


async def warm(p: Port, instances: int = 1) -> None:
    """Requests until each instance has a pooled connection (least in-flight rotates them)."""
    for i in range(2 * instances):
        status, _, _ = await ask(p, rid=f"warm{i}")
        assert status == 200


def in_flight_is_zero(p: Port, *names: str) -> bool:
    return all(p.proxy.stats.upstream(n).in_flight == 0 for n in names) and not any(p.proxy.metrics.in_flight.values())


async def test_a_warm_request_is_answered_in_the_lane(port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    a = FakeInstance("a", await serve(ok("a")))
    p = await port(FakeUpstreams([a]))
    await warm(p)
    lanes = Lanes(p, monkeypatch)
    status, headers, body = await ask(p, rid="fast-1")
    assert status == 200 and json.loads(body)["served_by"] == "a"
    assert headers[REQUEST_ID_HEADER.lower()] == "fast-1" and headers[INSTANCE_HEADER.lower()] == "a"
    assert headers["x-gpufleet-node"] == "here"
    assert (lanes.fast, lanes.slow) == (1, 0)
    assert a.successes == 3 and in_flight_is_zero(p, "a")
    assert p.proxy.metrics.done.requests[("m", 200)] == 3  # counted as any other
    # A stream begins in the lane too (its request goes out by callbacks); a coroutine relays its
    # answer from the head (test_an_sse_answer_to_a_plain_request_is_relayed_as_a_stream).
    status, _, _ = await ask(p, b'{"model": "m", "stream": true}')
    assert status == 200 and (lanes.fast, lanes.slow) == (2, 0)


async def test_an_error_status_in_the_lane_is_retried_on_another_instance(
    port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler, mode = switchable(ok("a"))
    a, b = FakeInstance("a", await serve(handler)), FakeInstance("b", await serve(ok("b")))
    p = await port(FakeUpstreams([a, b]))
    await warm(p, 2)

    async def failing(_: web.Request) -> web.Response:
        return web.json_response({"error": "engine died"}, status=500)

    mode["then"] = failing
    lanes = Lanes(p, monkeypatch)
    served = [json.loads((await ask(p, rid=f"e{i}"))[2])["served_by"] for i in range(4)]
    assert served == ["b"] * 4  # every one answered, by the healthy instance
    assert lanes.fast == 4 and lanes.slow == 0
    assert a.failures and all(answered for _, answered in a.failures)  # 5xx: a's fault, reported
    assert p.proxy.stats.upstream("a").errors == len(a.failures)
    assert in_flight_is_zero(p, "a", "b")


async def test_no_answer_in_time_in_the_lane_is_a_timeout_retried_elsewhere(
    port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hang = asyncio.Event()
    handler, mode = switchable(ok("a"))

    async def hung(_: web.Request) -> web.Response:
        await hang.wait()  # the engine stuck in prefill
        return web.json_response({})

    a, b = FakeInstance("a", await serve(handler)), FakeInstance("b", await serve(ok("b")))
    p = await port(FakeUpstreams([a, b], response_timeout_s=0.3))
    await warm(p, 2)
    mode["then"] = hung
    lanes = Lanes(p, monkeypatch)
    try:
        served = [json.loads((await ask(p, rid=f"t{i}"))[2])["served_by"] for i in range(3)]
    finally:
        hang.set()
    assert served == ["b"] * 3 and lanes.fast == 3
    assert any("no complete answer within 0.3s" in detail for detail, _ in a.failures)
    assert in_flight_is_zero(p, "a", "b")


async def test_a_pooled_connection_closed_as_it_is_reused_is_sent_again_on_a_new_one(
    port: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream closes a kept-alive connection just as the lane reuses it (its idle timeout,
    a restart): nothing was answered on it, so the request goes again on a new connection, to
    the same instance, and nothing is counted against it."""
    answered = 0
    answer = b'{"served_by": "a"}'

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(len(BODY))
        answered += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(answer))
        writer.write(answer)
        await reader.read(1)  # the next request's first byte: closed without an answer
        writer.close()

    server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
    try:
        a = FakeInstance("a", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        p = await port(FakeUpstreams([a]))
        assert (await ask(p))[0] == 200  # the connection is pooled now
        lanes = Lanes(p, monkeypatch)
        status, _, body = await ask(p, rid="again")
        assert status == 200 and json.loads(body) == {"served_by": "a"} and answered == 2
        assert lanes.fast == 1 and a.failures == [] and p.proxy.stats.upstream("a").errors == 0
        assert in_flight_is_zero(p, "a")
    finally:
        server.close()


async def test_an_instance_leaving_under_a_lane_attempt_moves_it_elsewhere(
    port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached = asyncio.Event()
    handler, mode = switchable(ok("a"))

    async def stuck(_: web.Request) -> web.Response:
        reached.set()
        await asyncio.Event().wait()  # never answers: only leaving rotation ends the attempt
        raise AssertionError

    a, b = FakeInstance("a", await serve(handler)), FakeInstance("b", await serve(ok("b")))
    p = await port(FakeUpstreams([a, b]))
    await warm(p, 2)
    b.in_rotation = False  # so that the attempt goes to a
    mode["then"] = stuck
    lanes = Lanes(p, monkeypatch)
    asking = asyncio.ensure_future(ask(p, rid="moved"))
    await asyncio.wait_for(reached.wait(), 10)
    assert lanes.fast == 1 and a.watchers  # the lane's attempt watches its instance
    b.in_rotation, a.in_rotation = True, False
    for leave in list(a.watchers):
        leave()  # the supervisor takes a out of rotation (a failed probe)
    status, headers, body = await asyncio.wait_for(asking, 10)
    assert status == 200 and json.loads(body)["served_by"] == "b" and headers[INSTANCE_HEADER.lower()] == "b"
    assert not a.watchers and in_flight_is_zero(p, "a", "b")


async def test_a_client_leaving_a_lane_request_closes_its_upstream_connection(
    port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached, gone = asyncio.Event(), asyncio.Event()
    handler, mode = switchable(ok("a"))

    async def generating(request: web.Request) -> web.Response:
        reached.set()
        try:
            await asyncio.Event().wait()
        finally:
            gone.set()  # aiohttp cancels the handler when the proxy closes the connection
        raise AssertionError

    a = FakeInstance("a", await serve(handler))
    p = await port(FakeUpstreams([a]))
    await warm(p)
    mode["then"] = generating
    lanes = Lanes(p, monkeypatch)
    _, writer = await p.connect()
    writer.write(post(CHAT, BODY))
    await asyncio.wait_for(reached.wait(), 10)
    writer.close()
    await asyncio.wait_for(gone.wait(), 10)  # the upstream saw the client leave
    assert lanes.fast == 1 and in_flight_is_zero(p, "a") and not a.watchers
    assert p.proxy.metrics.done.requests[("m", 499)] == 1
    assert a.failures == []  # the client's leaving is not the instance's fault


async def test_an_sse_answer_to_a_plain_request_is_relayed_as_a_stream(
    port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]

    async def sse_anyway(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(e)
        await resp.write_eof()
        return resp

    handler, mode = switchable(ok("a"))
    p = await port(FakeUpstreams([FakeInstance("a", await serve(handler))]))
    await warm(p)
    mode["then"] = sse_anyway
    lanes = Lanes(p, monkeypatch)
    status, headers, body = await ask(p)
    assert status == 200 and headers["transfer-encoding"] == "chunked" and body == b"".join(events)
    assert lanes.fast == 1 and in_flight_is_zero(p, "a")


async def test_a_full_gate_queues_a_lane_request_in_a_task(
    port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()
    handler, mode = switchable(ok("a"))
    entered = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal entered
        entered += 1
        await release.wait()
        return web.json_response({"served_by": "a"})

    p = await port(
        FakeUpstreams(
            [FakeInstance("a", await serve(handler))], limits={"m": ModelLimit(max_concurrency=1, max_queue=4)}
        )
    )
    await warm(p)
    mode["then"] = slow
    lanes = Lanes(p, monkeypatch)
    first = asyncio.ensure_future(ask(p, rid="first"))
    second = asyncio.ensure_future(ask(p, rid="second"))
    await wait_until(lambda: p.proxy.dispatcher.queued().get("m") == 1, timeout=10, what="the second queued")
    assert entered == 1  # one at a time reaches the instance
    release.set()
    assert [(await f)[0] for f in (first, second)] == [200, 200]
    assert lanes.fast == 2 and entered == 2 and in_flight_is_zero(p, "a")


async def test_a_stop_waits_for_a_lane_request_in_progress(
    port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()
    handler, mode = switchable(ok("a"))

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(0.5)  # the model generating
        return web.json_response({"done": True})

    p = await port(FakeUpstreams([FakeInstance("a", await serve(handler))]))
    await warm(p)
    mode["then"] = slow
    lanes = Lanes(p, monkeypatch)
    reader, writer = await p.connect()
    writer.write(post(CHAT, BODY))
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.ensure_future(p.runner.cleanup())
    status, headers, body = await response(reader)
    assert status == 200 and json.loads(body) == {"done": True} and headers["connection"] == "close"
    await stopping
    assert lanes.fast == 1


class _Transport:
    """Enough of a transport to drive a FrontProtocol by hand, within one turn of the loop."""

    def __init__(self) -> None:
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_client_leaving_in_the_turn_its_request_is_carried_on_leaks_no_slot(
    port: Any, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane takes the request (its in-flight count, and then a wait for the gate, are
    taken before the task that carries it on begins), and the client's connection is lost in
    the same turn. The task still begins, so its cleanup runs: nothing stays counted, and the
    gate's slot is not lost."""
    release = asyncio.Event()
    handler, mode = switchable(ok("a"))

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"served_by": "a"})

    limits = {"m": ModelLimit(max_concurrency=1, max_queue=4)}
    p = await port(FakeUpstreams([FakeInstance("a", await serve(handler))], limits=limits))
    await warm(p)
    mode["then"] = slow
    lanes = Lanes(p, monkeypatch)
    first = asyncio.ensure_future(ask(p, rid="holds-the-slot"))
    await wait_until(lambda: lanes.fast == 1, timeout=10, what="the first request in the lane")
    conn = p.front()
    conn.connection_made(_Transport())
    conn.data_received(post(CHAT, BODY))  # taken by the lane, carried on: the gate is full
    assert lanes.fast == 2 and isinstance(conn.task, asyncio.Task)
    conn.connection_lost(ConnectionResetError())  # in the same turn, before the task began
    release.set()
    assert (await first)[0] == 200
    mode["then"] = None
    assert (await asyncio.wait_for(ask(p, rid="after"), 10))[0] == 200  # the slot is free
    await wait_until(lambda: in_flight_is_zero(p, "a"), timeout=10, what="nothing in flight")
    assert p.proxy.dispatcher.queued().get("m") == 0
    assert p.proxy.metrics.done.requests[("m", 499)] == 1  # and the request was logged


async def test_a_lane_answer_passes_the_upstream_header_lines_as_they_came(
    port: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer's header lines are the upstream's bytes (its names' case, a value that is not
    UTF-8), less the hop-by-hop ones and those the proxy sets, with ours after them."""
    answer = b'{"ok": true}'
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Mixed-Case: a\xe9b\r\n"
        b"Server: upstream\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nKeep-Alive: timeout=5\r\n"
        b"X-Gpufleet-Instance: spoofed\r\nContent-Length: %d\r\n\r\n" % len(answer)
    )

    async def serve_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(len(BODY))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(head + answer)

    server = await asyncio.start_server(serve_forever, "127.0.0.1", 0)
    try:
        a = FakeInstance("a", f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        p = await port(FakeUpstreams([a]))

        async def exchange() -> bytes:
            reader, writer = await p.connect()
            writer.write(post(CHAT, BODY, f"{REQUEST_ID_HEADER}: lines\r\n"))
            raw = await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(len(answer)) == answer
            writer.close()
            return raw

        await exchange()  # pools a connection
        lanes = Lanes(p, monkeypatch)
        raw = await exchange()
        assert lanes.fast == 1
        lines = raw.split(b"\r\n")
        assert b"X-Mixed-Case: a\xe9b" in lines  # byte for byte
        names = [line.split(b":", 1)[0].lower() for line in lines[1:] if line]
        assert names.count(b"date") == 1 and b"server" not in names and b"keep-alive" not in names
        assert b"X-Gpufleet-Instance: a" in lines and b"X-Gpufleet-Instance: spoofed" not in lines
        assert f"{REQUEST_ID_HEADER}: lines".encode() in lines and b"X-Gpufleet-Node: here" in lines
    finally:
        server.close()
