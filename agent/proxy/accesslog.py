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

A line waits as an :class:`AccessLine` (a msgspec Struct: made in C, no dict) and a batch is
rendered by one ``encode_lines`` call when it is written: per request, the proxy only fills in
the line's fields.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog

from gpufleet.logsetup import JsonSink, json_sink

access = structlog.get_logger("agent.access")
FLUSH_S = 0.05
BATCH_LINES = 256


def _iso_now() -> str:
    """structlog's TimeStamper(fmt="iso", utc=True) format."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class AccessLine(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One request's line, its keys in the order written. A field at its default is left out:
    the three after ``retries`` when they do not apply, and ``level`` and ``timestamp`` until
    :meth:`AccessLog.write` stamps them (structlog adds its own on the console)."""

    event: str
    request_id: str
    method: str
    path: str
    model: str | None
    instance: str | None
    status: int
    stream: bool
    ttfb_ms: float | None
    duration_ms: float
    retries: int
    key: str | None = None  # the client's key, by name, where keys are checked
    stream_error: bool = False
    degraded: str | None = None
    level: str = ""
    timestamp: str = ""


_lines = msgspec.json.Encoder()


class AccessLog:
    def __init__(self) -> None:
        self._pending: list[AccessLine] = []
        self._sink: JsonSink | None = None
        self._stamp = ""
        self._stamped = False  # in this turn of the event loop
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once (a getpid(2) per call)

    def write(self, line: AccessLine) -> None:
        """Log ``line`` (this takes it: it is stamped and kept until its batch is written)."""
        sink = json_sink()
        if sink is None:
            fields = msgspec.to_builtins(line)  # as encoded: defaults left out
            access.info(fields.pop("event"), **fields)
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if not self._stamped:
            self._stamp, self._stamped = _iso_now(), True
            loop.call_soon(self._turn_ended)
        self._sink = sink
        line.level = "info"
        line.timestamp = self._stamp
        self._pending.append(line)
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
        data = _lines.encode_lines(pending)  # each line ends in a newline; none has one inside
        prefix = sink.info_prefix
        if prefix:
            data = prefix + data[:-1].replace(b"\n", b"\n" + prefix) + b"\n"
        sink.writer.write_lines(data, len(pending))
