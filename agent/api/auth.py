"""Bearer-token check for the admin endpoints.

The token lives in a file (mode 0600, owned by the agent's user) and is re-read when the file
changes, so an operator rotates it without a restart. Comparison is constant-time. The token is
never logged; only the file path is.

Permissions: a token file others can read is a warning (at start-up, from ``check-config`` and
``gpuctl check``): anyone on the host can then restart or stop instances. One others can *write*
is refused (fail closed: the agent does not start, and a running agent refuses admin requests):
anyone could set the token to one they know. The permission checks are gpufleet/tokenfile.py's
(``gpuctl check`` uses them too).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

import structlog

from gpufleet.tokenfile import permission_problems

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
        assert self.path is not None
        for warning in permission_problems(self.path.stat(), self.path)[1]:
            log.warning("admin token file permissions", problem=warning)

    def _load(self) -> bytes:
        assert self.path is not None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
            errors = permission_problems(st, self.path)[0]
            if errors:
                raise TokenError(errors[0])
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
        try:
            given_bytes = given.strip().encode()
        except UnicodeEncodeError:  # bytes that were not UTF-8 (aiohttp kept them as surrogates)
            return False
        return hmac.compare_digest(given_bytes, token)
