"""Node-to-node trust: a forwarded request carries proof that a cluster member sent it. Pure.

The entry agent authenticates the client (its API key) once; when it forwards the request to a
peer it signs it with the cluster's hop secret (a file every member has, written by the
playbook) instead of passing the client's key on. The peer accepts a request as a forwarded one
only with a valid signature: a hop header sent from outside the cluster is refused, so nobody
can skip the key check by claiming to be a peer.

The signature is HMAC-SHA256 over the version, method, path with query, hop count, timestamp,
the SHA-256 of the body, and the name of the key the entry node accepted. A signature is valid
for ``MAX_SKEW_S`` either side of the receiver's clock; within that window a recorded request
could be replayed by someone who can read the traffic, which TLS between the nodes prevents.
Several secrets may be configured: the first signs, every one verifies, so a secret is rotated
by adding the new one everywhere, then making it first, then removing the old.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

VERSION = "v1"
MAX_SKEW_S = 30.0
MIN_SECRET_BYTES = 32


class HopAuthError(ValueError):
    pass


def check_secret(secret: bytes, where: str) -> bytes:
    secret = secret.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise HopAuthError(
            f"{where}: the hop secret must be at least {MIN_SECRET_BYTES} bytes (e.g. openssl rand -hex 32)"
        )
    return secret


def _message(method: str, path: str, hops: int, ts: int, body_sha256: str, key_name: str) -> bytes:
    return "\n".join((VERSION, method.upper(), path, str(hops), str(ts), body_sha256, key_name)).encode()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sign(secret: bytes, method: str, path: str, hops: int, ts: int, body_sha256: str, key_name: str = "") -> str:
    """The header value: ``v1 <unix seconds> <hex HMAC>``."""
    mac = hmac.new(secret, _message(method, path, hops, ts, body_sha256, key_name), hashlib.sha256).hexdigest()
    return f"{VERSION} {ts} {mac}"


def verify(
    secrets: Sequence[bytes],
    header: str | None,
    method: str,
    path: str,
    hops: int,
    body_sha256: str,
    key_name: str,
    now: float,
) -> str | None:
    """None when the header proves a member sent this request; otherwise why not (for the log
    and the 401 — it names no secret and no expected value)."""
    if not header:
        return "a forwarded request without a hop signature"
    parts = header.split()
    if len(parts) != 3 or parts[0] != VERSION or not parts[1].isdigit():
        return "a malformed hop signature"
    ts = int(parts[1])
    if abs(now - ts) > MAX_SKEW_S:
        return f"a hop signature {now - ts:+.0f} s old (more than {MAX_SKEW_S:.0f} s: clocks apart, or a replay)"
    message = _message(method, path, hops, ts, body_sha256, key_name)
    for secret in secrets:
        expected = hmac.new(secret, message, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, parts[2]):
            return None
    return "a hop signature that no cluster secret made"
