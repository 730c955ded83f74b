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

What the proxy does per request is note an :class:`AccessEntry` (a msgspec Struct made in C
from the request's values as they are). A batch is rendered when it is written: each entry
becomes its :class:`AccessLine` and one ``encode_lines`` call encodes them all. Rendering each
line as its request ended cost several times as much as the same work done in a batch
(bench/proxy_floor.py): between two requests the kernel's network path runs and the renderer's
code and data are out of the CPU's caches again.
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


class AccessEntry(msgspec.Struct, gc=False):
    """What the proxy notes when a request ends (made positionally, times in seconds)."""

    request_id: str
    method: str
    path: str
    model: str | None
    instance: str | None
    status: int
    stream: bool
    ttfb_s: float | None
    duration_s: float
    retries: int
    key: str | None = None  # the client's key, by name, where keys are checked
    stream_error: bool = False
    degraded: str | None = None


class AccessLine(msgspec.Struct, omit_defaults=True, gc=False):
    """The line written for an entry, its keys in the order written. A field at its default is
    left out: the three after ``retries`` when they do not apply, and ``level`` and
    ``timestamp`` on the console (structlog adds its own there)."""

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
    key: str | None = None
    stream_error: bool = False
    degraded: str | None = None
    level: str = ""
    timestamp: str = ""


def _line(e: AccessEntry, level: str = "", stamp: str = "") -> AccessLine:
    ttfb_ms = None if e.ttfb_s is None else round(e.ttfb_s * 1000, 2)
    duration_ms = round(e.duration_s * 1000, 2)
    return AccessLine(
        "request", e.request_id, e.method, e.path, e.model, e.instance, e.status, e.stream, ttfb_ms, duration_ms,
        e.retries, e.key, e.stream_error, e.degraded, level, stamp,
    )  # fmt: skip


_lines = msgspec.json.Encoder()


class AccessLog:
    def __init__(self) -> None:
        self._pending: list[AccessEntry] = []
        self._stamps: list[tuple[int, str]] = []  # (the first pending entry it stamps, the stamp)
        self._sink: JsonSink | None = None
        self._stamp = ""
        self._stamped = False  # in this turn of the event loop
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once (a getpid(2) per call)

    def write(self, entry: AccessEntry) -> None:
        """Log ``entry``: its line is written with its batch."""
        sink = json_sink()
        if sink is None:
            fields = msgspec.to_builtins(_line(entry))  # as encoded: defaults left out
            access.info(fields.pop("event"), **fields)
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        pending = self._pending
        if not self._stamped:
            self._stamp, self._stamped = _iso_now(), True
            self._stamps.append((len(pending), self._stamp))
            loop.call_soon(self._turn_ended)
        self._sink = sink
        pending.append(entry)
        if len(pending) >= BATCH_LINES:
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
        stamps, self._stamps = self._stamps, [(0, self._stamp)] if self._stamped else []
        sink = self._sink
        if not pending or sink is None:
            return
        lines = []
        for (first, stamp), (end, _) in zip(stamps, [*stamps[1:], (len(pending), "")], strict=True):
            lines += [_line(entry, "info", stamp) for entry in pending[first:end]]
        data = _lines.encode_lines(lines)  # each line ends in a newline; none has one inside
        prefix = sink.info_prefix
        if prefix:
            data = prefix + data[:-1].replace(b"\n", b"\n" + prefix) + b"\n"
        sink.writer.write_lines(data, len(pending))
