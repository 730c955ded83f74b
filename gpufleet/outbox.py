"""Writes held to the end of the event loop's turn, then made one after the other.

A proxy at saturation reads many sockets in each turn of the loop. uvloop writes at once (a
send(2) inside ``transport.write``), so each answer went out as it was made, and woke its peer,
in the middle of the turn's Python work. Holding the writes to the end of the turn makes them
together, after the turn's reads are all done: while they are held more requests come in, and
the next turn has more of them to do in one go, with one epoll wake-up for many. Same system
calls, same bytes. Measured in bench/proxy.py (one core, canned backend), the agent's proxy went
from 158 to 100 µs of CPU per request, 6,344 to 9,974 req/s (docs/benchmarks.md, issue 18).

The price is latency: a write waits for the turn's other work. At one request at a time the
added latency measured 0.07 ms in one pair of runs (two writes per request) and was lost in the
noise in another (docs/benchmarks.md, "Issue 18, step 5"). Holding only while the loop is busy
(the last turn had several writes) was tried and lost most of the gain: holding is what makes
the turns busy, so a loop that does not hold stays at a write or two per turn.

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

# A head and a body shorter than this are held as one buffer (a small copy, one write); a longer
# body is held as it is, beside its head (a request or answer of megabytes is not copied).
JOIN_BELOW = 16384


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
        """``writer`` holds bytes to write at the end of this turn (it calls this for its first
        bytes of the turn, then holds the others too)."""
        writers = self._writers
        writers.append(writer)
        if len(writers) == 1:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            try:
                writer.write_held()
            except Exception as e:  # one connection's failure must not keep the others' bytes
                log.error("writing held bytes failed", error=repr(e), exc_info=e)
