"""Typed errors for the etcd client, and the mapping from the gateway's error bodies to them.

etcd's JSON gateway (grpc-gateway) answers a failed call with an HTTP status and a body
``{"error": "...", "code": N, "message": "..."}`` where ``code`` is the gRPC status code and the
message is etcd's own error text (``etcdserver: no leader``, ``etcdserver: permission denied``, …).
The gRPC code alone is too coarse (InvalidArgument covers both a wrong password and a compacted
revision), so the mapping looks at etcd's message first and falls back to the code.

Hierarchy, so callers can catch as broadly as they need::

    EtcdError
      EtcdUnavailable          no endpoint gave an answer within the deadline (``reasons`` per endpoint)
        EtcdTimeout            … because the deadline ran out (also a TimeoutError)
        EtcdNoLeader           … because the members answering have no raft leader
      EtcdAuthError            wrong user/password, permission denied, auth required
      EtcdTLSError             certificate or TLS set-up problem (never fixed by retrying)
      EtcdCompacted            the requested revision was compacted (``compact_revision``)
        EtcdHistoryLost        … or never existed: etcd was restored from a backup or wiped
      EtcdLeaseNotFound        the lease expired or was revoked
      EtcdKeyNotFound          a key the caller required is absent
"""

from __future__ import annotations

from typing import Any

# gRPC status codes that etcd uses (google.golang.org/grpc/codes).
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_FAILED_PRECONDITION = 9
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


class EtcdError(Exception):
    """Base of every error the etcd client raises. ``code`` is the gRPC code when etcd gave one."""

    def __init__(self, message: str, *, code: int | None = None, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.endpoint = endpoint


class EtcdUnavailable(EtcdError):
    """No endpoint answered successfully within the deadline. ``reasons`` maps endpoint -> last failure."""

    def __init__(
        self,
        message: str,
        *,
        reasons: dict[str, str] | None = None,
        code: int | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.reasons = dict(reasons or {})
        if self.reasons:
            message = f"{message} ({'; '.join(f'{ep}: {why}' for ep, why in self.reasons.items())})"
        super().__init__(message, code=code, endpoint=endpoint)


class EtcdTimeout(EtcdUnavailable, TimeoutError):
    """The call's deadline ran out before any endpoint answered."""


class EtcdNoLeader(EtcdUnavailable):
    """The member has no raft leader (partitioned, or an election is under way).

    Only raised because the client sends ``hasleader`` metadata (``require_leader=True``): without
    it such a member would serve stale serializable reads and hang watches silently.
    """


class EtcdAuthError(EtcdError):
    """Authentication or authorization failed: wrong credentials, permission denied, auth required."""


class EtcdTLSError(EtcdError):
    """A TLS problem: bad CA, missing/refused client certificate, http vs https mix-up, unreadable files."""


class EtcdCompacted(EtcdError):
    """The revision asked for is older than the last compaction; relist and start over.

    ``compact_revision`` is the oldest revision still available when etcd says so (watch
    cancellations do; a range at a compacted revision does not, and it is ``None`` then).
    """

    def __init__(self, message: str, *, compact_revision: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.compact_revision = compact_revision


class EtcdHistoryLost(EtcdCompacted):
    """etcd's revision went backwards: the cluster was restored from a snapshot or wiped.

    A watch resuming at revision N after such a restore is accepted by etcd as a watch on the
    *future* and then delivers nothing until the new history reaches N (hours or weeks in
    production), and what it would deliver then is a different history. The remedy is the one
    for compaction, which is why this is a subclass: list again and start over.
    """

    def __init__(self, message: str, *, revision: int, resume_revision: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.revision = revision  # the cluster's current revision
        self.resume_revision = resume_revision  # where the watch would have resumed


class EtcdLeaseNotFound(EtcdError):
    """The lease does not exist (never granted, revoked, or expired)."""


class EtcdKeyNotFound(EtcdError):
    """A key the caller required does not exist."""


# etcd's messages (server/etcdserver/api/v3rpc/rpctypes/error.go) that need a specific class.
# Matched as substrings: streams wrap them as "rpc error: code = ... desc = etcdserver: ...".
_NO_LEADER = ("etcdserver: no leader",)
_AUTH = (
    "authentication failed",  # wrong user or password
    "permission denied",
    "user name is empty",  # auth is enabled and we sent no token
    "user name not found",
    "invalid auth token",
    "invalid auth management",
    "root user does not have root role",
)
_INVALID_TOKEN = ("invalid auth token",)
_COMPACTED = ("required revision has been compacted",)
_LEASE_NOT_FOUND = ("requested lease not found",)
# Errors that mean "this member did not apply the request": safe to retry anywhere, even a write.
_NOT_APPLIED = (*_NO_LEADER, "too many requests", "not capable")


def is_invalid_token(err: BaseException) -> bool:
    """True when etcd rejected the auth token itself (expired simple token, member restarted)."""
    return isinstance(err, EtcdAuthError) and any(m in err.message for m in _INVALID_TOKEN)


def was_not_applied(err: EtcdError) -> bool:
    """True when etcd refused the request before applying it, so a write may be retried elsewhere."""
    return any(m in err.message for m in _NOT_APPLIED)


def error_from_body(body: Any, *, status: int | None = None, endpoint: str | None = None) -> EtcdError:
    """Turn a gateway error body (or a stream's ``{"error": {...}}`` line) into a typed error."""
    code: int | None = None
    message = ""
    if isinstance(body, dict):
        # Unary calls: {"error": "...", "code": N, "message": "..."}.
        # Streams (grpc-gateway v1): {"error": {"grpc_code": N, "message": "...", "http_code": ...}}.
        inner = body.get("error")
        if isinstance(inner, dict):
            body = inner
        raw_code = body.get("code", body.get("grpc_code"))
        code = int(raw_code) if isinstance(raw_code, int | str) and str(raw_code).isdigit() else None
        message = str(body.get("message") or body.get("error") or "")
    elif body is not None:
        message = str(body)
    if not message:
        message = f"HTTP {status}" if status is not None else "unknown etcd error"
    return classify(message, code=code, endpoint=endpoint)


def classify(message: str, *, code: int | None = None, endpoint: str | None = None) -> EtcdError:
    """Pick the error class for an etcd message and gRPC code."""
    kw: dict[str, Any] = {"code": code, "endpoint": endpoint}
    if any(m in message for m in _NO_LEADER):
        return EtcdNoLeader(message, **kw)
    if any(m in message for m in _COMPACTED):
        return EtcdCompacted(message, **kw)
    if any(m in message for m in _LEASE_NOT_FOUND):
        return EtcdLeaseNotFound(message, **kw)
    if any(m in message for m in _AUTH) or code in (GRPC_PERMISSION_DENIED, GRPC_UNAUTHENTICATED):
        return EtcdAuthError(message, **kw)
    if code == GRPC_DEADLINE_EXCEEDED or "request timed out" in message:
        return EtcdTimeout(message, **kw)
    if code == GRPC_UNAVAILABLE:
        return EtcdUnavailable(message, **kw)
    return EtcdError(message, **kw)
