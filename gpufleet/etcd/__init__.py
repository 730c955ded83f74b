"""gpufleet's etcd v3 client, over etcd's JSON gateway (see docs/etcd.md).

Everything in gpufleet that talks to etcd goes through this package.
"""

from .client import EtcdClient
from .errors import (
    EtcdAuthError,
    EtcdCompacted,
    EtcdError,
    EtcdHistoryLost,
    EtcdKeyNotFound,
    EtcdLeaseNotFound,
    EtcdNoLeader,
    EtcdTimeout,
    EtcdTLSError,
    EtcdUnavailable,
)
from .listwatch import Change, Delete, KeyMirror, Put, Snapshot, list_prefix, list_watch
from .messages import (
    Compare,
    DeleteResult,
    Event,
    KeyValue,
    Lease,
    LeaseInfo,
    Op,
    PutResult,
    RangeResult,
    Status,
    TxnResult,
    WatchResponse,
    prefix_range_end,
)
from .watch import Watch

__all__ = [
    "Change",
    "Compare",
    "Delete",
    "DeleteResult",
    "EtcdAuthError",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdHistoryLost",
    "EtcdKeyNotFound",
    "EtcdLeaseNotFound",
    "EtcdNoLeader",
    "EtcdTLSError",
    "EtcdTimeout",
    "EtcdUnavailable",
    "Event",
    "KeyMirror",
    "KeyValue",
    "Lease",
    "LeaseInfo",
    "Op",
    "Put",
    "PutResult",
    "RangeResult",
    "Snapshot",
    "Status",
    "TxnResult",
    "Watch",
    "WatchResponse",
    "list_prefix",
    "list_watch",
    "prefix_range_end",
]
