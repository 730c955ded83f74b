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
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, upstream=True), self._pipe(up_reader, writer, upstream=False)
            )
        finally:
            for w in (writer, up_writer):
                self._conns.discard(w)
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await src.read(65536):
                mode = self.mode
                if mode == "blackhole" or (mode == "half-open" and not upstream):
                    continue  # dropped on the floor; the connection stays up
                if mode == "reset":
                    return
                if mode == "delay":
                    await asyncio.sleep(self.delay_s)
                dst.write(chunk)
                await dst.drain()
        dst.transport.abort() if self.mode == "reset" else None
