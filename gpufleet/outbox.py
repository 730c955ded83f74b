"""Writes held to the end of the event loop's turn, then made one after the other.

A proxy at saturation reads many sockets in one turn of the loop. Writing each answer (and each
request upstream) as it is made runs the kernel's network path between every two requests'
Python work: each evicts the other from the CPU's caches. Holding the writes to the end of the
turn runs the Python work of every request read in the turn together, then the system calls
together. Same system calls, same bytes; measured in bench/proxy.py (one core, canned backend)
the agent's proxy went from 158 to 105 µs of CPU per request (docs/benchmarks.md, issue 18).
An answer leaves at most one turn later: microseconds, as the turn's reads are already done.

A writer (a protocol) keeps the bytes it holds; the outbox keeps the writers that hold some
and, at the end of the turn, has each write them (``write_held``). A writer that must write at
once (a stream's chunk, the last answer before a close, a handover) first writes what it holds,
so that its bytes go out in order.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

log = structlog.get_logger("gpufleet.outbox")


class Holder(Protocol):
    def write_held(self) -> None:
        """Write what it holds (nothing if its connection closed meanwhile)."""


class Outbox:
    """The writers holding bytes in this turn of one event loop."""

    __slots__ = ("_loop", "_writers")

    def __init__(self) -> None:
        self._writers: list[Holder] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once (a getpid(2) per call)

    def hold(self, writer: Holder) -> None:
        """``writer`` began holding bytes in this turn (once a turn: it calls this when what it
        held was empty)."""
        writers = self._writers
        writers.append(writer)
        if len(writers) == 1:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._write)

    def _write(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            try:
                writer.write_held()
            except Exception as e:  # one connection's failure must not keep the others' bytes
                log.error("writing held bytes failed", error=repr(e), exc_info=e)
