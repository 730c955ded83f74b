"""Bearer-token check for the admin endpoints.

The token lives in a file (mode 0600, owned by the agent's user) and is re-read when the file
changes, so an operator rotates it without a restart. Comparison is constant-time. The token is
never logged; only the file path is.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

import structlog

log = structlog.get_logger("agent.auth")


class TokenError(Exception):
    pass


class AdminToken:
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._token: bytes | None = None
        self._stamp: tuple[float, int] | None = None

    @property
    def configured(self) -> bool:
        return self.path is not None

    def ensure(self, generate: bool) -> None:
        """Check the file at start-up (fail fast), creating it first if asked to."""
        if self.path is None:
            return
        if generate and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            log.info("generated admin token", path=str(self.path))
        self._load()

    def _load(self) -> bytes:
        assert self.path is not None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
            if self._token is None or stamp != self._stamp:
                token = self.path.read_bytes().strip()
                if len(token) < 16:
                    raise TokenError(f"admin token in {self.path} is shorter than 16 characters")
                self._token, self._stamp = token, stamp
        except OSError as e:
            raise TokenError(f"cannot read admin token file {self.path}: {e.strerror or e}") from None
        return self._token

    def check(self, authorization: str | None) -> bool:
        if self.path is None or not authorization:
            return False
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        try:
            token = self._load()
        except TokenError as e:
            log.error("admin token unavailable", error=str(e))
            return False
        return hmac.compare_digest(given.strip().encode(), token)
