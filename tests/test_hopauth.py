"""Node-to-node signatures (gpufleet/hopauth.py): what a forged, altered, stale or foreign hop
looks like to the receiver."""

from __future__ import annotations

import pytest

from gpufleet.hopauth import MAX_SKEW_S, HopAuthError, body_digest, check_secret, sign, verify

SECRET = b"s" * 32
OTHER = b"o" * 32
NOW = 1_800_000_000
BODY = b'{"model": "m", "messages": []}'


def header(secret: bytes = SECRET, ts: int = NOW, **over: object) -> str:
    args = {"method": "POST", "path": "/v1/chat/completions", "hops": 1, "body_sha256": body_digest(BODY)}
    args |= over
    return sign(secret, args["method"], args["path"], args["hops"], ts, args["body_sha256"], "team-a")  # type: ignore[arg-type]


def check(h: str | None, *, secrets: tuple[bytes, ...] = (SECRET,), body: bytes = BODY, hops: int = 1,
          path: str = "/v1/chat/completions", key: str = "team-a", now: float = NOW) -> str | None:  # fmt: skip
    return verify(secrets, h, "POST", path, hops, body_digest(body), key, now)


def test_a_members_signature_verifies() -> None:
    assert check(header()) is None
    assert check(header(), now=NOW + MAX_SKEW_S) is None
    assert check(header(), secrets=(OTHER, SECRET)) is None  # rotation: every configured secret verifies


@pytest.mark.parametrize(
    ("h", "kwargs", "reason"),
    [
        (None, {}, "without a hop signature"),
        ("v1 garbage", {}, "malformed"),
        ("v2 1 abc", {}, "malformed"),
        (header(OTHER), {}, "no cluster secret"),
        (header(), {"body": b"{}"}, "no cluster secret"),
        (header(), {"hops": 0}, "no cluster secret"),
        (header(), {"path": "/v1/embeddings"}, "no cluster secret"),
        (header(), {"key": "team-b"}, "no cluster secret"),
        (header(), {"now": NOW + MAX_SKEW_S + 1}, "old"),
        (header(), {"now": NOW - MAX_SKEW_S - 1}, "old"),
    ],
)
def test_forged_altered_or_stale_hops_are_refused(h: str | None, kwargs: dict[str, object], reason: str) -> None:
    problem = check(h, **kwargs)  # type: ignore[arg-type]
    assert problem is not None and reason in problem
    assert SECRET.decode() not in problem


def test_short_secrets_are_refused_with_a_hint() -> None:
    with pytest.raises(HopAuthError, match="at least 32 bytes"):
        check_secret(b"short\n", "/etc/gpufleet/hop-secret")
    assert check_secret(SECRET + b"\n", "f") == SECRET
