"""The etcd keyspace: paths (paths.py), record types (records.py), decoding (codec.py)."""

from .codec import decode, decode_or_skip, encode
from .paths import InvalidName, Keyspace, check_name

__all__ = ["InvalidName", "Keyspace", "check_name", "decode", "decode_or_skip", "encode"]
