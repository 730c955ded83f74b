"""The proxy's access log: one JSON line per request, written in batches.

With JSON logs (production) the line is rendered here, without structlog's processor chain, and
lines are written together: at most ``FLUSH_S`` after the first of a batch, or at once when
``BATCH_LINES`` are waiting, in one write(2). A write per request (or per event-loop turn,
which at saturation is about the same) was a system call per request: with the log on a pipe to
journald, a wake-up of journald too. The cost: a kill -9 loses the last ``FLUSH_S`` of lines (a
clean stop writes them). Lines are stamped from one wall-clock reading per event-loop turn. The
line is the one structlog would write (``event``, the fields, ``level``, ``timestamp``),
through the same writer (gpufleet/logsetup.py), so a full disk is handled the same way. With
console logs (a terminal), or before logging is configured (in-process tests), lines go through
structlog as any other.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from gpufleet.logsetup import JsonSink, json_sink

access = structlog.get_logger("agent.access")
FLUSH_S = 0.05
BATCH_LINES = 256


def _iso_now() -> str:
    """structlog's TimeStamper(fmt="iso", utc=True) format."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class AccessLog:
    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._sink: JsonSink | None = None
        self._stamp = ""
        self._stamped = False  # in this turn of the event loop
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once (a getpid(2) per call)

    def record(self, **fields: Any) -> None:
        self.write({"event": "request", **fields})

    def write(self, line: dict[str, Any]) -> None:
        """``record``, its fields given as the line's dict (``event`` first), which this takes."""
        sink = json_sink()
        if sink is None:
            access.info(line.pop("event"), **line)
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if not self._stamped:
            self._stamp, self._stamped = _iso_now(), True
            loop.call_soon(self._turn_ended)
        self._sink = sink
        line["level"] = "info"
        line["timestamp"] = self._stamp
        self._pending.append(sink.dumps(line))
        if len(self._pending) >= BATCH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(FLUSH_S, self.flush)

    def _turn_ended(self) -> None:
        self._stamped = False

    def flush(self) -> None:
        """Write what is pending (when the batch is due, and when the proxy stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        sink = self._sink
        if not pending or sink is None:
            return
        prefix = sink.info_prefix
        sink.writer.write_lines(b"".join(prefix + line + b"\n" for line in pending), len(pending))
