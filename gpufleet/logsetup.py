"""structlog configuration shared by the daemons: JSON for journald/collectors, colours on a TTY.

Context (node, instance, request id) is bound with ``structlog.contextvars`` or ``log.bind`` by
callers; this module only decides the output format and level.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import msgspec
import structlog

_encoder = msgspec.json.Encoder(enc_hook=str)


def _dumps(obj: object, **_: object) -> bytes:
    return _encoder.encode(obj)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


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
