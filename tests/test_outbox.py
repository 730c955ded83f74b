"""Writes held to the end of the event loop's turn (gpufleet/outbox.py): each holder writes once,
in the order they began holding, after the turn's work; one holder's failure keeps no other's
bytes; an upstream request given up before the turn ended is never written; a large body goes
out whole."""

from __future__ import annotations

import asyncio

import pytest

from agent.proxy.httpclient import UpstreamClient
from gpufleet.outbox import Outbox

pytestmark = pytest.mark.timeout(30)


class Holder:
    def __init__(self, name: str, written: list[str], fail: bool = False) -> None:
        self.name, self.written, self.fail = name, written, fail

    def write_held(self) -> None:
        if self.fail:
            raise OSError("the socket broke")
        self.written.append(self.name)


async def test_holders_write_at_the_end_of_the_turn_in_order() -> None:
    outbox, written = Outbox(), []
    for name in ("a", "broken", "b"):
        outbox.hold(Holder(name, written, fail=name == "broken"))
    assert written == []  # nothing during the turn
    await asyncio.sleep(0)
    assert written == ["a", "b"]  # each once, in order, past the one that failed
    outbox.hold(Holder("c", written))  # a later turn: its own end
    await asyncio.sleep(0)
    assert written == ["a", "b", "c"]


async def test_an_upstream_request_is_written_at_the_end_of_the_turn_or_not_at_all() -> None:
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                bodies.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = UpstreamClient(outbox=Outbox())
    try:
        async with await client.post_lines(url, "/one", b"", b"first") as resp:
            assert await resp.read() == b"ok"  # written at the turn's end, answered

        class Listener:
            def upstream_changed(self) -> None:
                raise AssertionError("a request given up has no answer")

        given_up = client.post_now(url, "/two", b"", b"given up", Listener())
        assert given_up is not None  # on the pooled connection, held
        given_up.release()  # not answered: its connection closes, the request unwritten
        async with await client.post_lines(url, "/three", b"", b"third") as resp:
            assert await resp.read() == b"ok"
        big = bytes(range(256)) * 400  # past JOIN_BELOW: held beside its head, not copied into it
        async with await client.post_lines(url, "/four", b"", big) as resp:
            assert await resp.read() == b"ok"
        assert bodies == [b"first", b"third", big]
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
