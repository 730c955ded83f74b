"""API keys: the secret's format, what is stored of it, and who may use which model. Pure.

A key's secret is ``gpf_`` + 43 base62 characters (256 random bits) + a 6-character base62
CRC-32 of those 43. The prefix makes a leaked key recognisable to secret scanners and to a
reader of a log; the checksum lets an agent refuse a mistyped or truncated key without a
lookup. Nothing stores the secret: etcd (or a standalone agent's keys file) holds its SHA-256
and its last four characters (a hint for humans telling keys apart). A fast hash is the right
one here: bcrypt and argon2 slow down guessing of *low-entropy* passwords; 256 random bits
cannot be guessed however fast the hash, and the hash runs on every request.

A key can have more than one valid secret: ``keys rotate`` adds a new one and gives the old one a
``retires_at`` (the grace period during which clients move over). Revocation keeps the record
with ``revoked_at`` set — a tombstone, so ``keys show`` says when, and so a node that missed the
delete of a record can never see the key come back (there is no delete).
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import zlib
from dataclasses import dataclass

import msgspec

from gpufleet.keyspace.records import ApiKeyRecord, KeySecret

KEY_PREFIX = "gpf_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 43  # ceil(256 / log2(62))
_CHECK_LEN = 6  # ceil(32 / log2(62))
SECRET_LEN = len(KEY_PREFIX) + _BODY_LEN + _CHECK_LEN
_SECRET = re.compile(rf"^{KEY_PREFIX}[0-9A-Za-z]{{{_BODY_LEN + _CHECK_LEN}}}$")


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def new_secret() -> str:
    body = _base62(secrets.randbits(256), _BODY_LEN)
    return KEY_PREFIX + body + _checksum(body)


def well_formed(secret: str) -> bool:
    """Prefix, length, alphabet and checksum: a typo or a truncated paste fails here."""
    if not _SECRET.match(secret):
        return False
    body = secret[len(KEY_PREFIX) : len(KEY_PREFIX) + _BODY_LEN]
    return secret[-_CHECK_LEN:] == _checksum(body)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def redact(secret: str) -> str:
    """How a secret may appear in a log or an error: never more than prefix and last four."""
    if secret.startswith(KEY_PREFIX) and len(secret) > 12:
        return f"{KEY_PREFIX}…{secret[-4:]}"
    return "…"


# ---------------------------------------------------------------------------------------------
# records


class KeysFile(msgspec.Struct, kw_only=True):
    """A standalone agent's ``[auth] keys_file``: the records etcd would hold, in one JSON file."""

    keys: list[ApiKeyRecord] = []


def secret_record(secret: str, now: float) -> KeySecret:
    return KeySecret(sha256=digest(secret), hint=secret[-4:], created_at=now)


def rotated(rec: ApiKeyRecord, new: KeySecret, grace_s: float, now: float) -> ApiKeyRecord:
    """``rec`` with ``new`` as its current secret; every older secret that is still valid stays
    valid for ``grace_s`` more (not longer than it already would), and expired ones are dropped."""
    kept = []
    for s in rec.secrets:
        if s.retires_at is not None and s.retires_at <= now:
            continue
        until = now + grace_s if s.retires_at is None else min(s.retires_at, now + grace_s)
        kept.append(msgspec.structs.replace(s, retires_at=until))
    return msgspec.structs.replace(rec, secrets=[new, *kept])


def key_state(rec: ApiKeyRecord, now: float) -> str:
    if rec.revoked_at is not None:
        return "revoked"
    if rec.expires_at is not None and rec.expires_at <= now:
        return "expired"
    return "active"


# ---------------------------------------------------------------------------------------------
# decisions


class Denial(enum.Enum):
    """Why a request is refused: (HTTP status, OpenAI error code)."""

    MISSING = (401, "missing_api_key")
    MALFORMED = (401, "invalid_api_key")
    UNKNOWN = (401, "invalid_api_key")
    EXPIRED = (401, "expired_api_key")
    REVOKED = (401, "invalid_api_key")
    RETIRED = (401, "invalid_api_key")
    MODEL_NOT_ALLOWED = (403, "model_not_allowed")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def code(self) -> str:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class Verdict:
    key: ApiKeyRecord | None  # the key the request used, when one was recognised
    denial: Denial | None = None
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.denial is None


def denial_message(denial: Denial, presented: str, key: ApiKeyRecord | None, model: str | None) -> str:
    """OpenAI's wording where OpenAI has one; never the secret beyond its last four."""
    shown = redact(presented)
    name = key.name if key else ""
    return {
        Denial.MISSING: "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
        Denial.MALFORMED: f"Incorrect API key provided: {shown}. Keys start with {KEY_PREFIX}.",
        Denial.UNKNOWN: f"Incorrect API key provided: {shown}.",
        Denial.EXPIRED: f"The API key {name!r} ({shown}) has expired.",
        Denial.REVOKED: f"The API key {name!r} ({shown}) has been revoked.",
        Denial.RETIRED: f"The API key {shown} was rotated out; use the key {name!r} was rotated to.",
        Denial.MODEL_NOT_ALLOWED: f"The API key {name!r} may not use the model {model!r}.",
    }[denial]


class KeyIndex:
    """Every known secret's digest -> its key: built once per change of the key set, read by
    every request (a dict lookup after one SHA-256)."""

    def __init__(self, records: list[ApiKeyRecord]) -> None:
        self.by_digest: dict[str, tuple[ApiKeyRecord, KeySecret]] = {}
        for rec in records:
            for s in rec.secrets:
                self.by_digest[s.sha256] = (rec, s)

    def check(self, presented: str | None, model: str | None, now: float) -> Verdict:
        if not presented:
            return self._deny(Denial.MISSING, "", None, model)
        # The digest first: a known key is the common case and one SHA-256 and a lookup decide
        # it; the format (prefix, alphabet, checksum) only tells a typo from a stranger's key.
        found = self.by_digest.get(digest(presented))
        if found is None:
            denial = Denial.UNKNOWN if well_formed(presented) else Denial.MALFORMED
            return self._deny(denial, presented, None, model)
        rec, sec = found
        if rec.revoked_at is not None:
            return self._deny(Denial.REVOKED, presented, rec, model)
        if rec.expires_at is not None and rec.expires_at <= now:
            return self._deny(Denial.EXPIRED, presented, rec, model)
        if sec.retires_at is not None and sec.retires_at <= now:
            return self._deny(Denial.RETIRED, presented, rec, model)
        if model is not None and rec.models and model not in rec.models:
            return self._deny(Denial.MODEL_NOT_ALLOWED, presented, rec, model)
        return Verdict(rec)

    @staticmethod
    def _deny(denial: Denial, presented: str, rec: ApiKeyRecord | None, model: str | None) -> Verdict:
        return Verdict(rec, denial, denial_message(denial, presented, rec, model))


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY`` (OpenAI's SDKs) or ``x-api-key: KEY``
    (Anthropic's SDKs, and some OpenAI-compatible clients)."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


# ---------------------------------------------------------------------------------------------
# durations as operators write them

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``24h``, ``30d``, ``2w`` -> seconds."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration: write a positive number and s, m, h, d or w (e.g. 30d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]
