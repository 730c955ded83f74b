"""The proxy's upstream client (agent/proxy/httpclient.py) against raw asyncio servers that
answer exactly as scripted: keep-alive and its limits, a connection closed as it is reused,
sized, chunked and until-close bodies, cut-off bodies, back-pressure, and half-read answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agent.proxy.httpclient import (
    HIGH_WATER,
    ConnectError,
    Disconnected,
    PayloadError,
    UpstreamClient,
    origin_of,
)
from gpufleet_dev.fleetbase import free_port

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class Server:
    """Counts connections and requests; ``handler(reader, writer, request_no)`` answers one
    request (its head and body already read) and returns whether to keep the connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(length))
                self.requests += 1
                if not await self.handler(reader, writer, self.requests):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went, or the test ended
        finally:
            writer.close()


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    body = f"answer {n}".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    return True


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[Server, str]]]]:
    servers = []

    async def start(handler: Handler) -> tuple[Server, str]:
        s = Server(handler)
        port = free_port()
        servers.append(await asyncio.start_server(s.serve, "127.0.0.1", port))
        return s, f"http://127.0.0.1:{port}"

    yield start
    for srv in servers:
        srv.close()


async def test_one_connection_serves_request_after_request(serve) -> None:  # type: ignore[no-untyped-def]
    server, url = await serve(ok)
    client = UpstreamClient()
    for n in (1, 2, 3):
        async with await client.post(url, "/v1/x?a=1", [("X-Request-ID", "r")], b'{"q": 1}') as r:
            assert r.status == 200 and r.headers["content-type"] == "text/plain"
            assert await r.read() == f"answer {n}".encode()
    assert server.connections == 1 and server.bodies == [b'{"q": 1}'] * 3
    head = server.heads[0].decode()
    assert head.startswith("POST /v1/x?a=1 HTTP/1.1\r\n") and f"Host: {url[7:]}\r\n" in head
    assert "Content-Length: 8\r\n" in head and "X-Request-ID: r\r\n" in head
    await client.close()


async def test_idle_connections_are_capped_per_upstream(serve) -> None:  # type: ignore[no-untyped-def]
    server, url = await serve(ok)
    client = UpstreamClient(max_idle=lambda: 2)
    answers = await asyncio.gather(*(client.post(url, "/", [], b"") for _ in range(5)))
    for r in answers:
        await r.read()
        r.release()
    assert server.connections == 5 and client.idle_connections() == 2
    none_kept = UpstreamClient(max_idle=lambda: 0)
    for _ in range(2):
        async with await none_kept.post(url, "/", [], b"") as r:
            await r.read()
    assert server.connections == 7 and none_kept.idle_connections() == 0


async def test_a_connection_closed_as_it_is_reused_is_retried_on_a_new_one(serve) -> None:  # type: ignore[no-untyped-def]
    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n % 2 == 0:
            return False  # read the request, answer nothing, close: an idle timeout racing our reuse
        return await ok(reader, writer, n)

    server, url = await serve(once_then_close)
    client = UpstreamClient()
    async with await client.post(url, "/", [], b"a") as r:
        assert await r.read() == b"answer 1"
    async with await client.post(url, "/", [], b"b") as r:  # reused, closed unanswered, retried
        assert await r.read() == b"answer 3"
    assert server.connections == 2 and server.bodies == [b"a", b"b", b"b"]
    # On a new connection the same thing is the upstream's failure, not ours to repeat.
    fresh = UpstreamClient(max_idle=lambda: 0)
    with pytest.raises(Disconnected):
        await fresh.post(url, "/", [], b"c")  # request 4: closed unanswered


async def test_chunked_and_until_close_bodies_arrive_as_sent(serve) -> None:  # type: ignore[no-untyped-def]
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.02)  # two TCP segments, two chunks
        writer.write(b"0\r\n\r\n")
        return True

    _, url = await serve(chunked)
    client = UpstreamClient()
    async with await client.post(url, "/", [], b"") as r:
        assert [await r.readany(), await r.readany(), await r.readany()] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert client.idle_connections() == 1

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        return False

    _, url = await serve(until_close)
    async with await client.post(url, "/", [], b"") as r:
        assert await r.read() == b"all of it"
    assert client.idle_connections() == 1  # the closed one is not kept


async def test_a_cut_off_body_is_an_error_and_its_connection_is_not_kept(serve) -> None:  # type: ignore[no-untyped-def]
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
        await writer.drain()
        return False

    _, url = await serve(cut)
    client = UpstreamClient()
    async with await client.post(url, "/", [], b"") as r:
        assert r.status == 200
        with pytest.raises(PayloadError):
            await r.read()
    assert client.idle_connections() == 0

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        return True

    _, url = await serve(garbage)
    with pytest.raises((PayloadError, Disconnected)):
        await client.post(url, "/", [], b"")


async def test_refused_is_a_connect_error() -> None:
    with pytest.raises(ConnectError):
        await UpstreamClient().post(f"http://127.0.0.1:{free_port()}", "/", [], b"")


async def test_a_slow_reader_pauses_the_upstream(serve) -> None:  # type: ignore[no-untyped-def]
    size = 64 << 20  # far more than the kernel's socket buffers hold
    sent = asyncio.Event()

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()  # returns only once the client reads: back-pressure end to end
        sent.set()
        return True

    _, url = await serve(big)
    client = UpstreamClient()
    r = await client.post(url, "/", [], b"")
    conn = r._conn
    await asyncio.sleep(0.2)  # the upstream writes as fast as it can meanwhile
    assert conn._paused and conn.buffered <= HIGH_WATER + 256 * 1024 and not sent.is_set()
    got = len(await r.read())
    assert got == size and not conn._paused
    await asyncio.wait_for(sent.wait(), 5)
    r.release()
    assert client.idle_connections() == 1


async def test_a_half_read_answer_closes_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async def two_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(b"3\r\ndef\r\n0\r\n\r\n")
        return True

    server, url = await serve(two_chunks)
    client = UpstreamClient()
    async with await client.post(url, "/", [], b"") as r:
        assert await r.readany() == b"abc"  # the client went away here
    assert client.idle_connections() == 0
    async with await client.post(url, "/", [], b"") as r:
        assert await r.read() == b"abcdef"
    assert server.connections == 2


async def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        await UpstreamClient().post("http://127.0.0.1:1", "/", [("X-A", "1\r\nX-Injected: 2")], b"")


def test_origins() -> None:
    assert origin_of("http://10.0.0.1:8080") == ("http" == "https", "10.0.0.1", 8080, b"10.0.0.1:8080")
    assert origin_of("https://node-a") == (True, "node-a", 443, b"node-a")
    assert origin_of("http://[::1]:9000").host_header == b"[::1]:9000"
