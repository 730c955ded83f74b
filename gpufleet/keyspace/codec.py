"""Encode and decode keyspace records; a record that fails validation is logged and skipped.

One bad value (a hand-edited key, a newer schema with a changed meaning, a truncated write)
must never crash a loop that reads the whole prefix; it is reported once per key revision.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
import structlog

log = structlog.get_logger("gpufleet.keyspace")

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}
_reported: set[tuple[str, int]] = set()
_REPORTED_MAX = 10_000


def encode(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


def decode(value: bytes, typ: type[T]) -> T:
    """Strict decode; raises msgspec.DecodeError / ValidationError."""
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.json.Decoder(typ)
    return dec.decode(value)


def decode_or_skip(key: str, value: bytes, typ: type[T], mod_revision: int = 0) -> T | None:
    """Decode, or log (once per key revision) and return None."""
    try:
        return decode(value, typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        marker = (key, mod_revision)
        if marker not in _reported:
            if len(_reported) > _REPORTED_MAX:
                _reported.clear()
            _reported.add(marker)
            log.warning(
                "invalid record skipped",
                key=key,
                mod_revision=mod_revision,
                record_type=typ.__name__,
                error=str(e),
                value_prefix=value[:120].decode("utf-8", "replace"),
            )
        return None
