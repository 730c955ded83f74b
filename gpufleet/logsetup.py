"""structlog configuration shared by the daemons: JSON for journald/collectors, colours on a TTY.

Context (node, instance, request id) is bound with ``structlog.contextvars`` or ``log.bind`` by
callers; this module only decides the output format and level.

Under systemd, stderr is a stream to journald, which files every line at the unit's default
priority (info) unless the line starts with an sd-daemon prefix ``<N>`` (sd-daemon(3)). When
stderr is that stream (``JOURNAL_STREAM`` names its device and inode), every line gets its
level's prefix, so ``journalctl -p err`` shows the errors and only them.

Logging never takes the daemon down. Every line leaves through one ``LineWriter``: a write(2)
that fails (stderr redirected to a file on a full disk, a quota, EIO, journald gone) drops the
line and counts it (``dropped_lines()``, exported as a metric) instead of raising into a request
handler or a supervision loop, says so once through the journal's own socket when there is one,
retries at most every ``RETRY_S`` seconds, and the first line that gets through again is a
notice of how many were lost and why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Literal, NamedTuple

import msgspec
import structlog

_encoder = msgspec.json.Encoder(enc_hook=str)


def _dumps(obj: object, **_: object) -> bytes:
    return _encoder.encode(obj)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# sd-daemon(3) priorities by structlog method name.
_PRIORITIES = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "err": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "msg": 6,
    "debug": 7,
}


def stderr_is_journal(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is systemd's journal stream: ``JOURNAL_STREAM`` is
    ``<st_dev>:<st_ino>`` of it (a redirected stderr keeps the variable but not the inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def _prefix_lines(text: str | bytes, priority: int) -> str | bytes:
    """``<N>`` before every line of ``text`` (not after a final newline)."""
    if isinstance(text, bytes):
        p = b"<%d>" % priority
        body, nl = (text[:-1], b"\n") if text.endswith(b"\n") else (text, b"")
        return p + body.replace(b"\n", b"\n" + p) + nl
    s = f"<{priority}>"
    sbody, snl = (text[:-1], "\n") if text.endswith("\n") else (text, "")
    return s + sbody.replace("\n", "\n" + s) + snl


class JournalPriority:
    """Wraps the renderer: prefixes every line of the rendered event with ``<N>`` by level."""

    def __init__(self, renderer: structlog.typing.Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: object, method_name: str, event_dict: structlog.typing.EventDict) -> str | bytes:
        rendered = self.renderer(logger, method_name, event_dict)
        assert isinstance(rendered, (str, bytes))
        return _prefix_lines(rendered, _PRIORITIES.get(method_name, 6))


def print_error(text: str, stream: IO[str] | None = None) -> None:
    """Print an error message (config problems before logging is set up) to stderr, at error
    priority when stderr is the journal."""
    stream = stream if stream is not None else sys.stderr
    line = _prefix_lines(text, 3) if stderr_is_journal(stream) else text
    print(line if isinstance(line, str) else line.decode(), file=stream, flush=True)


RETRY_S = 1.0  # a failing log stream is retried this often; lines in between are dropped
JOURNAL_SOCKET = "/run/systemd/journal/socket"  # journald's native protocol (sd_journal_send)


class LineWriter:
    """structlog's logger: writes each rendered line to ``fd`` with write(2), never raising.

    Unbuffered on purpose: a buffered stream that failed keeps the failed bytes and raises again
    on every later write, so one full disk would turn every log call into an exception (each
    request handler answering 500, each supervision loop dying on its next state change). Here a
    failure drops the line, counts it, tells the journal once (``journal_socket``, if it exists),
    and holds off ``RETRY_S`` seconds; the first line that is written again is preceded by a
    notice of what was lost (``notice`` renders it like any other line).
    """

    def __init__(
        self,
        fd: int,
        notice: Callable[[str, dict[str, object]], str | bytes],
        journal_socket: str = JOURNAL_SOCKET,
        ident: str = "gpufleet",
    ) -> None:
        self.fd = fd
        self.notice = notice
        self.journal_socket = journal_socket
        self.ident = ident
        self.dropped_lines = 0  # over the process's life
        self._lock = threading.Lock()  # NVML's worker thread logs too
        self._failing_since: float | None = None  # wall clock of the first failed write
        self._error = ""
        self._lost = 0  # dropped in the current outage
        self._retry_at = 0.0
        self._line_start = True

    def msg(self, message: str | bytes) -> None:
        data = message.encode("utf-8", "replace") if isinstance(message, str) else message
        with self._lock:
            self._emit(data + b"\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def write_lines(self, data: bytes, lines: int) -> None:
        """Several whole lines (each ending in a newline) in one write(2), with the same
        handling of failures as one line; ``lines`` counts them if they are dropped."""
        with self._lock:
            self._emit(data, lines)

    def _emit(self, data: bytes, lines: int = 1) -> None:
        if self._failing_since is not None and time.monotonic() < self._retry_at:
            self._drop(lines)
            return
        try:
            if self._failing_since is not None:
                self._write_all(self._recovery_notice())
                self._failing_since, self._lost = None, 0
            self._write_all(data)
        except OSError as e:
            self._failed(e)
            self._drop(lines)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)  # short before ENOSPC; the next one raises
            self._line_start = view[n - 1] == ord("\n") if n else self._line_start
            view = view[n:]

    def _drop(self, lines: int = 1) -> None:
        self.dropped_lines += lines
        self._lost += lines

    def _recovery_notice(self) -> bytes:
        since = self._failing_since or time.time()
        fields: dict[str, object] = {
            "event": "agent log lines dropped",
            "dropped_lines": self._lost,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
            "for_s": round(time.time() - since, 1),
            "error": self._error,
        }
        try:
            line = self.notice("warning", fields)
        except Exception:  # the notice must not be what makes a log call raise
            line = " ".join(f"{k}={v}" for k, v in fields.items())
        line = line.encode("utf-8", "replace") if isinstance(line, str) else line
        return (b"" if self._line_start else b"\n") + line + b"\n"

    def _failed(self, e: OSError) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        if self._failing_since is None:
            self._failing_since = time.time()
            self._error = e.strerror or str(e)
            self._tell_journal(
                f"log writes failing ({self._error}): dropping log lines, retrying every {RETRY_S:g}s; "
                "the log says how many were lost once it works again"
            )

    def _tell_journal(self, message: str) -> None:
        """The one place left to say that the log is failing, when the log is not the journal."""
        if not os.path.exists(self.journal_socket):
            return
        payload = f"MESSAGE={message}\nPRIORITY=4\nSYSLOG_IDENTIFIER={self.ident}\n".encode()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(payload, self.journal_socket)


_writer: LineWriter | None = None


class JsonSink(NamedTuple):
    """For a hot path that renders its own JSON lines (the access log): where they go, the
    journal priority prefix an info line takes there, and the encoder every line uses."""

    writer: LineWriter
    info_prefix: bytes  # b"<6>" when stderr is the journal, else b""
    dumps: Callable[[object], bytes]


_json_sink: JsonSink | None = None


def json_sink() -> JsonSink | None:
    """The sink for self-rendered JSON info lines; None when logs are not JSON lines, or info
    lines are filtered out (then log through structlog, which renders or drops them)."""
    return _json_sink


def dropped_lines() -> int:
    """Log lines this process could not write (the configured writer's count)."""
    return _writer.dropped_lines if _writer is not None else 0


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    journal_socket: str = JOURNAL_SOCKET,
) -> LineWriter:
    global _writer
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        # msgspec encodes several times faster than the json module; the proxy logs a line per
        # request, so this is on the hot path. Unknown types (paths, enums) become strings.
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    if stderr_is_journal():
        renderer = JournalPriority(renderer)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        renderer,
    ]

    def notice(method: str, fields: dict[str, object]) -> str | bytes:
        # The writer's own line, through the same chain as every other line.
        event: object = {"logger": "gpufleet.logsetup", **fields}
        for proc in processors:
            event = proc(None, method, event)  # type: ignore[arg-type]
        assert isinstance(event, (str, bytes))
        return event

    with contextlib.suppress(OSError):
        sys.stderr.flush()  # what print() left buffered goes first
    _writer = LineWriter(sys.stderr.fileno(), notice, journal_socket, os.path.basename(sys.argv[0] or "gpufleet"))
    writer = _writer
    global _json_sink
    info_lines = _LEVELS.get(level, logging.INFO) <= logging.INFO
    prefix = b"<6>" if stderr_is_journal() else b""
    _json_sink = JsonSink(writer, prefix, _encoder.encode) if fmt == "json" and info_lines else None
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
    route_stdlib_logging(_LEVELS.get(level, logging.INFO))
    return writer


class _ToStructlog(logging.Handler):
    """Libraries' stdlib loggers (aiohttp.server, asyncio) through structlog: one line each in
    the daemon's format, a traceback in its ``exception`` field, instead of logging's plain-text
    last-resort handler writing multi-line tracebacks between the JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            extra: dict[str, object] = {"logger": record.name}
            if record.exc_info:
                extra["exc_info"] = record.exc_info
            structlog.get_logger(record.name).log(record.levelno, record.getMessage(), **extra)
        except Exception:
            self.handleError(record)


def route_stdlib_logging(level: int) -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(h)
    root.addHandler(_ToStructlog())
    root.setLevel(level)
