"""The etcd keyspace: paths (paths.py), record types (records.py), decoding (codec.py)."""

from .codec import decode, decode_or_skip, encode
from .paths import InvalidName, Keyspace, assigned_instance_name, check_model, check_name

__all__ = [
    "InvalidName",
    "Keyspace",
    "assigned_instance_name",
    "check_model",
    "check_name",
    "decode",
    "decode_or_skip",
    "encode",
]
