"""The gateway's JSON messages, as typed values, and the encoding rules between the two.

grpc-gateway speaks proto3 JSON: ``bytes`` fields (keys, values) are base64 strings, int64
fields (revisions, lease ids, TTLs) are decimal *strings*, and fields at their zero value are
left out entirely (a PUT event has no ``type``, a failed txn has no ``succeeded``, a range with
no match has no ``kvs``). Everything here parses with defaults for absent fields, and callers
only ever see Python ints, bytes and dataclasses.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Literal

Key = str | bytes


def to_bytes(k: Key) -> bytes:
    return k.encode() if isinstance(k, str) else bytes(k)


def b64(k: Key) -> str:
    return base64.b64encode(to_bytes(k)).decode("ascii")


def unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def as_int(v: Any) -> int:
    return int(v) if v not in (None, "") else 0


def prefix_range_end(prefix: Key) -> bytes:
    """The smallest key greater than every key starting with ``prefix``.

    Increment the last byte that is not 0xff and drop what follows it (b"a\\xff" -> b"b"). A
    prefix of only 0xff bytes (or empty) has no such key; etcd's convention is then
    range_end = b"\\x00", meaning "every key >= key".
    """
    p = bytearray(to_bytes(prefix))
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\x00"


def range_fields(key: Key, *, prefix: bool, range_end: Key | None = None) -> dict[str, str]:
    """``key``/``range_end`` for one key, for every key under a prefix (empty prefix = all
    keys), or for the keys in [key, range_end) when ``range_end`` is given."""
    k = to_bytes(key)
    if range_end is not None:
        return {"key": b64(k), "range_end": b64(to_bytes(range_end))}
    if not prefix:
        return {"key": b64(k)}
    # An empty key is not valid in etcd; the whole key space is key=\0, range_end=\0.
    return {"key": b64(k or b"\x00"), "range_end": b64(prefix_range_end(k))}


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0

    @property
    def key_str(self) -> str:
        # surrogateescape: any byte string round-trips through str and back.
        return self.key.decode("utf-8", "surrogateescape")

    @property
    def value_str(self) -> str:
        return self.value.decode("utf-8", "surrogateescape")

    @classmethod
    def parse(cls, d: dict[str, Any]) -> KeyValue:
        return cls(
            key=unb64(d.get("key")),
            value=unb64(d.get("value")),
            create_revision=as_int(d.get("create_revision")),
            mod_revision=as_int(d.get("mod_revision")),
            version=as_int(d.get("version")),
            lease=as_int(d.get("lease")),
        )


def header_revision(d: dict[str, Any]) -> int:
    return as_int((d.get("header") or {}).get("revision"))


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KeyValue]
    revision: int  # the store revision the range was served at
    count: int = 0  # number of keys in the range (may exceed len(kvs) with a limit)
    more: bool = False  # True when ``limit`` cut the result short

    @classmethod
    def parse(cls, d: dict[str, Any]) -> RangeResult:
        return cls(
            kvs=[KeyValue.parse(kv) for kv in d.get("kvs") or ()],
            revision=header_revision(d),
            count=as_int(d.get("count")),
            more=bool(d.get("more", False)),
        )


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    prev_kv: KeyValue | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> PutResult:
        prev = d.get("prev_kv")
        return cls(revision=header_revision(d), prev_kv=KeyValue.parse(prev) if prev else None)


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: int
    revision: int
    prev_kvs: list[KeyValue] = field(default_factory=list)

    @classmethod
    def parse(cls, d: dict[str, Any]) -> DeleteResult:
        return cls(
            deleted=as_int(d.get("deleted")),
            revision=header_revision(d),
            prev_kvs=[KeyValue.parse(kv) for kv in d.get("prev_kvs") or ()],
        )


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    id: int
    ttl: int  # seconds remaining
    granted_ttl: int
    keys: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Status:
    endpoint: str
    version: str
    member_id: int
    leader: int  # 0 when the member knows no leader
    raft_term: int
    raft_index: int
    revision: int
    db_size: int
    errors: list[str] = field(default_factory=list)  # alarms, e.g. "NOSPACE" (etcd 3.4+)

    @classmethod
    def parse(cls, endpoint: str, d: dict[str, Any]) -> Status:
        header = d.get("header") or {}
        return cls(
            endpoint=endpoint,
            version=str(d.get("version", "")),
            member_id=as_int(header.get("member_id")),
            leader=as_int(d.get("leader")),
            raft_term=as_int(d.get("raftTerm", header.get("raft_term"))),
            raft_index=as_int(d.get("raftIndex")),
            revision=as_int(header.get("revision")),
            db_size=as_int(d.get("dbSize")),
            errors=list(d.get("errors") or ()),
        )


# --- transactions ------------------------------------------------------------------------------

_CMP_RESULT = {"==": "EQUAL", "=": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
CompareOp = Literal["==", "=", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One txn guard. Build with the class methods: ``Compare.create_revision(k, "==", 0)``."""

    key: bytes
    target: Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
    op: CompareOp
    operand: int | bytes

    @classmethod
    def value(cls, key: Key, op: CompareOp, value: Key) -> Compare:
        return cls(to_bytes(key), "VALUE", op, to_bytes(value))

    @classmethod
    def version(cls, key: Key, op: CompareOp, version: int) -> Compare:
        return cls(to_bytes(key), "VERSION", op, version)

    @classmethod
    def create_revision(cls, key: Key, op: CompareOp, revision: int) -> Compare:
        return cls(to_bytes(key), "CREATE", op, revision)

    @classmethod
    def mod_revision(cls, key: Key, op: CompareOp, revision: int) -> Compare:
        return cls(to_bytes(key), "MOD", op, revision)

    @classmethod
    def lease(cls, key: Key, op: CompareOp, lease_id: int) -> Compare:
        return cls(to_bytes(key), "LEASE", op, lease_id)

    @classmethod
    def absent(cls, key: Key) -> Compare:
        """The key does not exist (the create-if-absent guard)."""
        return cls.create_revision(key, "==", 0)

    def to_json(self) -> dict[str, Any]:
        if self.op not in _CMP_RESULT:
            raise ValueError(f"compare operator must be one of {sorted(_CMP_RESULT)}, not {self.op!r}")
        field_name = {
            "VERSION": "version",
            "CREATE": "create_revision",
            "MOD": "mod_revision",
            "VALUE": "value",
            "LEASE": "lease",
        }[self.target]
        operand = b64(self.operand) if isinstance(self.operand, bytes) else str(self.operand)
        return {"key": b64(self.key), "target": self.target, "result": _CMP_RESULT[self.op], field_name: operand}


_OP_FIELD = {"put": "request_put", "range": "request_range", "delete": "request_delete_range"}


@dataclass(frozen=True, slots=True)
class Op:
    """One txn operation. Build with ``Op.put``, ``Op.get``, ``Op.delete``."""

    kind: Literal["put", "range", "delete"]
    request: dict[str, Any]

    @classmethod
    def put(cls, key: Key, value: Key, *, lease: int | None = None, prev_kv: bool = False) -> Op:
        return cls("put", put_request(key, value, lease=lease, prev_kv=prev_kv))

    @classmethod
    def get(cls, key: Key, *, prefix: bool = False, limit: int = 0, keys_only: bool = False) -> Op:
        return cls("range", range_request(key, prefix=prefix, limit=limit, keys_only=keys_only))

    @classmethod
    def delete(cls, key: Key, *, prefix: bool = False, prev_kv: bool = False) -> Op:
        req: dict[str, Any] = range_fields(key, prefix=prefix)
        if prev_kv:
            req["prev_kv"] = True
        return cls("delete", req)

    @property
    def size(self) -> int:
        """Bytes this op adds to a transaction: key and value as sent (base64, an upper bound
        of the raw bytes etcd's request limit counts)."""
        req = self.request
        return len(req.get("key", "")) + len(req.get("value", "")) + len(req.get("range_end", ""))

    def to_json(self) -> dict[str, Any]:
        return {
            {"put": "request_put", "range": "request_range", "delete": "request_delete_range"}[self.kind]: self.request
        }


TxnResponse = RangeResult | PutResult | DeleteResult


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[TxnResponse]

    @classmethod
    def parse(cls, d: dict[str, Any]) -> TxnResult:
        out: list[TxnResponse] = []
        for r in d.get("responses") or ():
            if "response_range" in r:
                out.append(RangeResult.parse(r["response_range"]))
            elif "response_put" in r:
                out.append(PutResult.parse(r["response_put"]))
            elif "response_delete_range" in r:
                out.append(DeleteResult.parse(r["response_delete_range"]))
        return cls(succeeded=bool(d.get("succeeded", False)), revision=header_revision(d), responses=out)


def put_request(key: Key, value: Key, *, lease: int | None, prev_kv: bool) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    if prev_kv:
        req["prev_kv"] = True
    return req


def range_request(
    key: Key,
    *,
    prefix: bool,
    limit: int = 0,
    keys_only: bool = False,
    revision: int | None = None,
    count_only: bool = False,
) -> dict[str, Any]:
    req: dict[str, Any] = range_fields(key, prefix=prefix)
    if limit:
        req["limit"] = str(limit)
    if keys_only:
        req["keys_only"] = True
    if count_only:
        req["count_only"] = True
    if revision:
        req["revision"] = str(revision)
    return req


# --- watch -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue  # for DELETE: the key and the deletion's mod_revision, no value
    prev_kv: KeyValue | None = None  # only with prev_kv=True on the watch

    @classmethod
    def parse(cls, d: dict[str, Any]) -> Event:
        prev = d.get("prev_kv")
        return cls(
            type="DELETE" if d.get("type") == "DELETE" else "PUT",
            kv=KeyValue.parse(d.get("kv") or {}),
            prev_kv=KeyValue.parse(prev) if prev else None,
        )


@dataclass(frozen=True, slots=True)
class WatchResponse:
    events: list[Event]
    revision: int  # header revision; see watch.py for why resuming uses event revisions instead
    compact_revision: int = 0
    created: bool = False
    canceled: bool = False
    cancel_reason: str = ""

    @property
    def progress(self) -> bool:
        """A progress notification: no events, nothing created or cancelled, just "you are at ``revision``"."""
        return not self.events and not self.created and not self.canceled

    @classmethod
    def parse(cls, d: dict[str, Any]) -> WatchResponse:
        return cls(
            events=[Event.parse(e) for e in d.get("events") or ()],
            revision=header_revision(d),
            compact_revision=as_int(d.get("compact_revision")),
            created=bool(d.get("created", False)),
            canceled=bool(d.get("canceled", False)),
            cancel_reason=str(d.get("cancel_reason", "")),
        )
