"""Who may read ``/v1/status`` and ``/metrics``: ``[api] status_access`` and ``status_allow``
(gpufleet/httpserver.py's ApiSection), one middleware for the agent's and the coordinator's app.

Both pages show what an attacker maps a fleet with (nodes, instance ports and PIDs, API key
names and their usage) but no secret, and Prometheus, ``gpuctl status`` and ``gpuctl check``
read them: they stay open by default. ``status_access = "token"`` asks for a bearer token, the
read-only one in ``status_token_file`` (what Prometheus' ``authorization.credentials_file``
sends) or, on an agent, the admin token; ``status_allow`` limits them to a list of networks
(``request.remote``: behind a reverse proxy, the proxy's address). A refusal is 401 (no or a
wrong token) or 403 (not an allowed network), in the OpenAI error shape the other routes use.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from gpufleet.httperrors import bearer_refused, error_response
from gpufleet.httpserver import ApiSection
from gpufleet.tokenfile import permission_problems

log = structlog.get_logger("http")

GUARDED = frozenset({"/v1/status", "/metrics"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TokenFile:
    """A bearer token read from a file, again whenever the file changes (rotation without a
    restart); compared in constant time; a file others can write is refused (fail closed)."""

    def __init__(self, path: str, what: str = "status token") -> None:
        self.path = Path(path)
        self.what = what  # how errors name it: "status token", "admin token"
        self._token: bytes | None = None
        self._stamp: tuple[float, int] | None = None

    def load(self) -> bytes:
        """The token; raises OSError (with the path) for a missing, unsafe or short file."""
        st = self.path.stat()
        stamp = (st.st_mtime, st.st_size)
        if self._token is None or stamp != self._stamp:
            errors = permission_problems(st, self.path)[0]
            if errors:
                raise OSError(errors[0].replace("admin token file", f"{self.what} file"))
            token = self.path.read_bytes().strip()
            if len(token) < 16:
                raise OSError(f"{self.what} in {self.path} is shorter than 16 characters")
            self._token, self._stamp = token, stamp
        return self._token

    def check(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        try:
            token = self.load()
        except OSError as e:
            log.error(f"{self.what} unavailable", error=_why(e, self.path, self.what))
            return False
        try:
            return hmac.compare_digest(given.strip().encode(), token)
        except UnicodeEncodeError:
            return False


def _why(e: OSError, path: Path, what: str = "status token") -> str:
    return f"cannot read {what} file {path}: {e.strerror}" if e.strerror else str(e)


class StatusAccess:
    """The middleware (:meth:`middleware`) of an app whose ``/v1/status`` and ``/metrics`` are guarded."""

    def __init__(
        self,
        api: ApiSection,
        realm: str,
        other_token: Callable[[str | None], bool] | None = None,
        guarded_prefixes: tuple[str, ...] = (),
    ) -> None:
        # Paths under these are status views too (the coordinator's dashboard data, /ui/api/).
        self.guarded_prefixes = guarded_prefixes
        self.token_required = api.status_access == "token"
        self.token = TokenFile(api.status_token_file) if api.status_token_file else None
        self.other_token = other_token  # the agent's admin token also opens them
        self.networks = [ipaddress.ip_network(n, strict=False) for n in api.status_allow]
        self.realm = realm

    def check_files(self) -> None:
        """At start-up: a token file that cannot be used stops the start (OSError naming the field)."""
        if self.token is not None and self.token_required:
            try:
                self.token.load()
            except OSError as e:
                raise OSError(f"$.api.status_token_file: {_why(e, self.token.path)}") from None

    def allowed_network(self, remote: str | None) -> bool:
        if not self.networks:
            return True
        try:
            addr = ipaddress.ip_address((remote or "").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def authorized(self, authorization: str | None) -> bool:
        if not self.token_required:
            return True
        if self.token is not None and self.token.check(authorization):
            return True
        return self.other_token is not None and self.other_token(authorization)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in GUARDED and not request.path.startswith(self.guarded_prefixes):
            return await handler(request)
        if not self.allowed_network(request.remote):
            log.info("status request refused: not an allowed network", path=request.path, remote=request.remote)
            return error_response(
                403, "not allowed from this address ([api] status_allow)", "permission_error", "forbidden"
            )
        if not self.authorized(request.headers.get("Authorization")):
            return bearer_refused('missing or wrong bearer token ([api] status_access = "token")', self.realm)
        return await handler(request)
