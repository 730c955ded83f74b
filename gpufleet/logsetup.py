"""structlog configuration shared by the daemons: JSON for journald/collectors, colours on a TTY.

Context (node, instance, request id) is bound with ``structlog.contextvars`` or ``log.bind`` by
callers; this module only decides the output format and level.

Under systemd, stderr is a stream to journald, which files every line at the unit's default
priority (info) unless the line starts with an sd-daemon prefix ``<N>`` (sd-daemon(3)). When
stderr is that stream (``JOURNAL_STREAM`` names its device and inode), every line gets its
level's prefix, so ``journalctl -p err`` shows the errors and only them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Literal

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


def configure_logging(fmt: Literal["auto", "json", "console"] = "auto", level: str = "info") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        # msgspec encodes several times faster than the json module; the proxy logs a line per
        # request, so this is on the hot path. Unknown types (paths, enums) become strings.
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        factory: structlog.typing.WrappedLogger = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = structlog.WriteLoggerFactory(file=sys.stderr)
    if stderr_is_journal():
        renderer = JournalPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
