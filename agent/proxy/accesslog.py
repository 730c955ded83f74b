"""The proxy's access log: one JSON line per request, written in batches.

With JSON logs (production) the line is rendered here, without structlog's processor chain,
and every line of one event-loop turn goes out in one write(2) when the turn ends, stamped
with one clock reading: at thousands of requests a second a write and a timestamp per request
were a measurable share of the proxy's CPU. The line is the one structlog would write
(``event``, the fields, ``level``, ``timestamp``), through the same writer (gpufleet/logsetup.py),
so a full disk is handled the same way. With console logs (a terminal), or before logging is
configured (in-process tests), lines go through structlog as any other.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from gpufleet.logsetup import JsonSink, json_sink

access = structlog.get_logger("agent.access")


def _iso_now() -> str:
    """structlog's TimeStamper(fmt="iso", utc=True) format."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class AccessLog:
    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._sink: JsonSink | None = None
        self._stamp = ""

    def record(self, **fields: Any) -> None:
        sink = json_sink()
        if sink is None:
            access.info("request", **fields)
            return
        if not self._pending:  # the turn's first line: stamp the turn, flush at its end
            self._sink, self._stamp = sink, _iso_now()
            asyncio.get_running_loop().call_soon(self.flush)
        fields["level"] = "info"
        fields["timestamp"] = self._stamp
        self._pending.append(sink.dumps({"event": "request", **fields}))

    def flush(self) -> None:
        """Write what is pending (at the end of each turn, and when the proxy stops)."""
        pending, self._pending = self._pending, []
        sink = self._sink
        if not pending or sink is None:
            return
        prefix = sink.info_prefix
        sink.writer.write_lines(b"".join(prefix + line + b"\n" for line in pending), len(pending))
