"""A TCP proxy that injects network faults between a process and etcd (etcd's robustness suite
does the same with its own proxy): pass, blackhole, delay, reset, half-open.

It runs in a thread with its own event loop, so synchronous and asynchronous tests drive it
alike, and the processes under test (agents, coordinators) only see an etcd endpoint that
behaves badly.

    pass       bytes flow both ways
    blackhole  connections stay open, nothing is forwarded either way, new connections are
               accepted and hang (a partition: packets dropped, no RST)
    delay      every chunk waits ``delay_s`` before it is forwarded (a slow, congested link)
    reset      every connection is closed at once, new ones too (a peer that went away)
    half-open  client -> etcd still flows, etcd -> client is dropped (an asymmetric partition)

``freeze_open_connections(match)`` is the one fault that is not a mode: the connections open at
that moment (those whose latest request's first bytes contain ``match``) stop forwarding, silently and
for good, while the others and new ones pass: a watch stream stuck in a load balancer or a NAT
table that forgot it, while the member itself is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Literal

Mode = Literal["pass", "blackhole", "delay", "reset", "half-open"]


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._conns: set[asyncio.StreamWriter] = set()
        self._open: dict[object, bytes] = {}  # per proxied connection: its latest request's first bytes
        self._frozen: set[object] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def set(self, mode: Mode, delay_s: float = 0.0) -> None:
        """Change the fault; ``reset`` also closes every open connection now."""

        def apply() -> None:
            self.mode, self.delay_s = mode, delay_s
            if mode == "reset":
                for w in list(self._conns):
                    w.transport.abort()

        self._loop.call_soon_threadsafe(apply)

    def freeze_open_connections(self, match: bytes = b"") -> int:
        """Silence the connections open now whose latest request contains ``match`` (new ones pass);
        returns how many were frozen."""
        done = threading.Event()
        count = [0]

        def apply() -> None:
            chosen = {t for t, first in self._open.items() if match in first}
            self._frozen |= chosen
            count[0] = len(chosen)
            done.set()

        self._loop.call_soon_threadsafe(apply)
        if not done.wait(10):
            raise RuntimeError("fault proxy did not answer")
        return count[0]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # --- the proxy ------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for w in list(self._conns):
                w.transport.abort()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))
        token = object()
        self._open[token] = b""
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, True, token), self._pipe(up_reader, writer, False, token)
            )
        finally:
            self._open.pop(token, None)
            self._frozen.discard(token)
            for w in (writer, up_writer):
                self._conns.discard(w)
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool, token: object) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await src.read(65536):
                if upstream and chunk.startswith((b"POST ", b"GET ", b"PUT ")):
                    self._open[token] = chunk[:512]  # the latest request on a kept-alive connection
                mode = self.mode
                if token in self._frozen or mode == "blackhole" or (mode == "half-open" and not upstream):
                    continue  # dropped on the floor; the connection stays up
                if mode == "reset":
                    return
                if mode == "delay":
                    await asyncio.sleep(self.delay_s)
                dst.write(chunk)
                await dst.drain()
        dst.transport.abort() if self.mode == "reset" else None
