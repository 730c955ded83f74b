"""HTTP transport to etcd's JSON gateway: endpoints, deadlines, failover, TLS and auth tokens.

Every request gets one overall deadline. Within it the transport tries the current endpoint
and, when that one fails in a way another member could fix, the next ones, in rounds with a
short back-off between rounds, until an endpoint answers or the deadline runs out.

What is retried on another endpoint:

* reads (``idempotent=True``): any transport failure (refused, reset, timed out), ``no leader``,
  ``leader changed``, ``request timed out``. Each attempt gets an equal share of the time left,
  so one hung member (SIGSTOPped, partitioned) cannot eat the whole deadline.
* writes (put, delete, txn, lease grant/revoke): only when the request certainly did not reach
  etcd (the TCP or TLS connect failed) or etcd refused it before applying it (no leader, too many
  requests). A write that timed out or lost its connection mid-flight may have been applied; it
  is reported (``EtcdTimeout``/``EtcdUnavailable``) rather than repeated, because repeating a
  compare-and-swap can flip its outcome. The failing endpoint is rotated out for the next call.

Answers that are etcd's final word (permission denied, compacted, lease not found, bad request)
are raised at once. TLS problems are never fixed by retrying; once a whole round of endpoints
has failed with them, the TLS error is raised with its explanation.

Auth: with a user name, the transport gets a token from ``/v3/auth/authenticate`` and sends it
as the ``Authorization`` header, which the gateway forwards to etcd as gRPC metadata (verified
on etcd 3.4 and 3.5). Simple tokens expire after ``--auth-token-ttl`` seconds of disuse, and per
member, so on ``invalid auth token`` the transport re-authenticates once and retries. Neither
the password nor the token is ever logged or put into an error message.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec
import structlog

from gpufleet.backoff import backoff_delay

from .errors import (
    EtcdAuthError,
    EtcdError,
    EtcdNoLeader,
    EtcdTimeout,
    EtcdTLSError,
    EtcdUnavailable,
    error_from_body,
    is_invalid_token,
    was_not_applied,
)
from .stream import Stream
from .tls import build_ssl_context, tls_cause, tls_error

log = structlog.get_logger("gpufleet.etcd")

T = TypeVar("T")

_ROUND_PAUSE_MIN = 0.05
_ROUND_PAUSE_MAX = 1.0


class PathNotFound(EtcdError):
    """The gateway does not know this URL path (an older etcd); callers may try an alias."""


@dataclass
class _Failure(Exception):  # internal signal; never escapes the transport
    """One attempt on one endpoint failed. ``applied_maybe``: the request may have reached etcd."""

    reason: str
    applied_maybe: bool
    error: EtcdError | None = None  # the typed error to raise if this ends up being the answer
    timed_out: bool = False


def normalize_endpoint(ep: str) -> str:
    ep = ep.strip().rstrip("/")
    if "://" not in ep:
        ep = "http://" + ep
    parts = urlsplit(ep)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd endpoint {ep!r} must look like http://host:port or https://host:port")
    return ep


class Transport:
    def __init__(
        self,
        endpoints: list[str],
        *,
        username: str | None,
        password: str | None,
        ca_file: str | None,
        cert_file: str | None,
        key_file: str | None,
        timeout: float,
        require_leader: bool,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [normalize_endpoint(e) for e in endpoints]
        if (username is None) != (password is None):
            raise ValueError("etcd username and password go together")
        self.timeout = timeout
        self._username = username
        self._password = password
        self._ssl: ssl.SSLContext | None = None
        if ca_file or cert_file or any(e.startswith("https://") for e in self.endpoints):
            self._ssl = build_ssl_context(ca_file, cert_file, key_file)
        self._base_headers = {"Content-Type": "application/json"}
        if require_leader:
            # grpc-gateway forwards Grpc-Metadata-* headers as gRPC metadata; etcd then refuses
            # requests on a member without a leader ("etcdserver: no leader") and cancels
            # watches there, instead of serving stale data or hanging.
            self._base_headers["Grpc-Metadata-hasleader"] = "true"
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self._current = 0
        self._logged_endpoint: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._write_session: aiohttp.ClientSession | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._session is None:
            ssl_arg: ssl.SSLContext | bool = self._ssl if self._ssl is not None else True
            no_limit = aiohttp.ClientTimeout(total=None)
            # Reads, keep-alives and watches share pooled keep-alive connections.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_arg, limit=0), timeout=no_limit
            )
            # Writes go on a fresh connection each. A pooled connection to a member that just
            # died fails only after the request was written ("server disconnected"), which is
            # indistinguishable from dying mid-request, so the write could not fail over. On a
            # fresh connection the failure is a refused connect: unambiguous, and retried.
            self._write_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_arg, limit=0, force_close=True), timeout=no_limit
            )

    async def close(self) -> None:
        for session in (self._session, self._write_session):
            if session is not None:
                await session.close()
        self._session = self._write_session = None

    @property
    def current_endpoint(self) -> str:
        return self.endpoints[self._current]

    # --- endpoint bookkeeping ----------------------------------------------------------------

    def order(self) -> list[str]:
        """Endpoints to try, the current one first."""
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    def report_failure(self, ep: str, reason: str) -> None:
        """``ep`` failed: if it is the current endpoint, the next call starts at the next one."""
        if ep == self.current_endpoint and len(self.endpoints) > 1:
            self._current = (self._current + 1) % len(self.endpoints)
        log.debug("etcd endpoint failed", endpoint=ep, reason=reason)

    def report_success(self, ep: str) -> None:
        self._current = self.endpoints.index(ep)
        if ep != self._logged_endpoint:
            # Logged once per change, not per request.
            if self._logged_endpoint is not None:
                log.warning("etcd endpoint switched", endpoint=ep, previous=self._logged_endpoint)
            else:
                log.info("etcd endpoint in use", endpoint=ep)
            self._logged_endpoint = ep

    # --- unary calls -------------------------------------------------------------------------

    async def call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        idempotent: bool = True,
        endpoint: str | None = None,
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` on some endpoint within the deadline; the decoded answer."""

        async def attempt(ep: str, connect: float) -> dict[str, Any]:
            return await self._authed(
                ep, connect, lambda token: self._post(ep, path, body, connect, token, fresh=not idempotent)
            )

        return await self._with_failover(path, timeout, idempotent, endpoint, attempt)

    async def _with_failover(
        self,
        what: str,
        timeout: float | None,
        idempotent: bool,
        endpoint: str | None,
        attempt: Callable[[str, float], Awaitable[T]],
    ) -> T:
        loop = asyncio.get_running_loop()
        budget = self.timeout if timeout is None else timeout
        deadline = loop.time() + budget
        reasons: dict[str, str] = {}
        failures: list[_Failure] = []
        rounds = 0  # completed rounds of endpoints: the pause between rounds doubles
        while True:
            order = [normalize_endpoint(endpoint)] if endpoint else self.order()
            round_failures: list[_Failure] = []
            for i, ep in enumerate(order):
                left = deadline - loop.time()
                if left <= 0:
                    break
                # Reads split the time left between the endpoints not tried yet in this round;
                # writes get all of it (they cannot be repeated once sent) but connect within the
                # same share, so a black-holed member does not take the whole deadline.
                share = left / (len(order) - i)
                try:
                    try:
                        async with asyncio.timeout(share if idempotent else left):
                            result = await attempt(ep, share)
                    except TimeoutError as e:
                        raise _Failure(
                            f"no answer within {share if idempotent else left:.2f}s", True, None, True
                        ) from e
                except _Failure as f:
                    reasons[ep] = f.reason
                    failures.append(f)
                    round_failures.append(f)
                    self.report_failure(ep, f.reason)
                    if f.applied_maybe and not idempotent:
                        raise self._give_up(what, budget, reasons, [f], maybe_applied=True) from f.error
                    continue
                if endpoint is None:  # a question to one member (a health check) moves nothing
                    self.report_success(ep)
                return result
            # TLS problems do not go away by retrying: once a whole round failed with them, say so.
            # (A refused client certificate sometimes shows as a plain reset instead of the TLS
            # alert, hence per round; and at the deadline any TLS error is the one worth raising.)
            tls = [f.error for f in failures if isinstance(f.error, EtcdTLSError)]
            if round_failures and all(isinstance(f.error, EtcdTLSError) for f in round_failures):
                raise round_failures[-1].error  # type: ignore[misc]
            left = deadline - loop.time()
            if left <= 0:
                if tls:
                    raise tls[-1]
                raise self._give_up(what, budget, reasons, failures)
            await asyncio.sleep(min(backoff_delay(rounds, _ROUND_PAUSE_MIN, _ROUND_PAUSE_MAX), left))
            rounds += 1

    @staticmethod
    def _give_up(
        what: str, budget: float, reasons: dict[str, str], failures: list[_Failure], maybe_applied: bool = False
    ) -> EtcdUnavailable:
        if maybe_applied:
            what += " (sent, outcome unknown, not retried)"
        if failures and all(isinstance(f.error, EtcdNoLeader) for f in failures):
            return EtcdNoLeader(f"etcd {what}: no member with a leader answered within {budget:.1f}s", reasons=reasons)
        if any(f.timed_out for f in failures):
            return EtcdTimeout(f"etcd {what}: deadline of {budget:.1f}s exceeded", reasons=reasons)
        return EtcdUnavailable(f"etcd {what}: no endpoint answered within {budget:.1f}s", reasons=reasons)

    async def _authed(self, ep: str, connect: float, request: Callable[[str | None], Awaitable[T]]) -> T:
        """Run ``request(token)``, re-authenticating once when etcd says the token is stale."""
        for retry_auth in (True, False):
            token = await self._ensure_token(ep, connect)
            try:
                return await request(token)
            except EtcdAuthError as e:
                if not (retry_auth and self._username is not None and is_invalid_token(e)):
                    raise
                self._drop_token(token)
        raise AssertionError("unreachable")

    def _headers(self, token: str | None) -> dict[str, str]:
        headers = dict(self._base_headers)
        if token:
            headers["Authorization"] = token
        return headers

    async def _post(
        self, ep: str, path: str, body: dict[str, Any], connect: float, token: str | None, fresh: bool = False
    ) -> dict[str, Any]:
        """One HTTP request. Raises _Failure for retryable trouble, an EtcdError for etcd's answers."""
        session = self._write_session if fresh else self._session
        assert session is not None, "use 'async with EtcdClient(...)'"
        try:
            async with session.post(
                ep + path,
                data=msgspec.json.encode(body),
                headers=self._headers(token),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=max(connect, 0.001)),
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except Exception as e:
            raise _transport_failure(ep, e) from e
        return self._decode(ep, path, status, raw)

    def _decode(self, ep: str, path: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            data = msgspec.json.decode(raw) if raw else {}
        except msgspec.DecodeError:
            data = None
        if status == 200 and isinstance(data, dict) and "error" not in data:
            return data
        if not isinstance(data, dict):
            text = raw[:200].decode("utf-8", "replace").strip()
            if "HTTP request to an HTTPS server" in text:
                err = EtcdTLSError(f"etcd at {ep} speaks TLS; use an https:// endpoint", endpoint=ep)
                raise _Failure("endpoint speaks TLS", False, err)
            if "CommonName of client sending a request against gateway" in text:
                # etcd 3.4 with auth on refuses gateway requests whose client certificate has a
                # CN; every member would say the same, so this is a configuration error.
                raise EtcdTLSError(
                    f"etcd at {ep} refuses our client certificate because it has a Common Name: with etcd auth "
                    "enabled, certificates used on the JSON gateway must have no CN (identify the client by SAN)",
                    endpoint=ep,
                )
            if status == 404:
                raise PathNotFound(f"etcd at {ep} has no {path} ({text})", endpoint=ep)
            raise _Failure(f"HTTP {status}: {text}", True)
        err = error_from_body(data, status=status, endpoint=ep)
        if isinstance(err, EtcdNoLeader) or was_not_applied(err):
            raise _Failure(err.message, False, err)
        if isinstance(err, EtcdUnavailable):  # "request timed out", other Unavailable: maybe applied
            raise _Failure(err.message, True, err, isinstance(err, EtcdTimeout))
        raise err

    # --- auth --------------------------------------------------------------------------------

    async def _ensure_token(self, ep: str, connect: float) -> str | None:
        if self._username is None:
            return None
        async with self._auth_lock:  # one authenticate for many concurrent callers
            if self._token is None:
                body = {"name": self._username, "password": self._password}
                try:
                    data = await self._post(ep, "/v3/auth/authenticate", body, connect, None)
                except EtcdAuthError as e:
                    raise EtcdAuthError(
                        f"etcd authentication as user {self._username!r} failed at {ep}: {e.message}",
                        code=e.code,
                        endpoint=ep,
                    ) from None  # the cause would only repeat the message
                except EtcdError as e:
                    if "authentication is not enabled" not in e.message:
                        raise
                    # Credentials configured, auth off on the server: work without a token (and
                    # get one when etcd starts asking: "user name is empty" drops this "").
                    log.warning("etcd auth is not enabled on the server; sending no token", endpoint=ep)
                    data = {}
                self._token = str(data.get("token") or "")
                if self._token:
                    log.info("etcd authenticated", endpoint=ep, user=self._username)
        # "" means the server needs no token: send none.
        return self._token or None

    def _drop_token(self, used: str | None) -> None:
        if self._token == (used or ""):  # not already replaced by a concurrent caller
            self._token = None
            log.info("etcd auth token rejected; re-authenticating", user=self._username)

    # --- streams -----------------------------------------------------------------------------

    async def open_stream(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Stream:
        """Start a streaming call and wait for its first message, with the failover of a read.

        The first message is awaited here, within the deadline, because that is where etcd says
        yes (a watch's ``created``) or no (no leader, stale token, permission denied).
        """

        async def attempt(ep: str, connect: float) -> Stream:
            return await self._authed(ep, connect, lambda token: self._open_once(ep, path, body, connect, token))

        return await self._with_failover(path, timeout, True, None, attempt)

    async def _open_once(self, ep: str, path: str, body: dict[str, Any], connect: float, token: str | None) -> Stream:
        assert self._session is not None, "use 'async with EtcdClient(...)'"
        resp: aiohttp.ClientResponse | None = None
        try:
            resp = await self._session.post(
                ep + path,
                data=msgspec.json.encode(body),
                headers=self._headers(token),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=max(connect, 0.001)),
            )
            if resp.status != 200:
                self._decode(ep, path, resp.status, await resp.read())  # raises for any non-200
                raise _Failure(f"HTTP {resp.status}", False)
            stream = Stream(ep, resp)
            first = await stream.next_json()
        except BaseException as e:
            if resp is not None:
                resp.close()
            if isinstance(e, EtcdTLSError | EtcdUnavailable):  # from the stream: try elsewhere
                raise _Failure(e.message, False, e, isinstance(e, EtcdTimeout)) from e
            if isinstance(e, _Failure | EtcdError | asyncio.CancelledError | TimeoutError):
                raise
            if isinstance(e, Exception):
                raise _transport_failure(ep, e) from e
            raise
        if first is None:
            stream.close()
            raise _Failure("stream closed before its first message", False)
        if "error" in first:
            stream.close()
            err = error_from_body(first, endpoint=ep)
            if isinstance(err, EtcdUnavailable):
                raise _Failure(err.message, False, err, isinstance(err, EtcdTimeout))
            raise err
        stream.first = first
        return stream


def _transport_failure(ep: str, e: Exception) -> _Failure:
    """Classify an aiohttp/OS error from one request."""
    if isinstance(e, aiohttp.ClientSSLError | ssl.SSLError) or tls_cause(e) is not None:
        return _Failure(f"TLS: {e}", False, tls_error(ep, e))
    if isinstance(e, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        # Never connected: the request did not reach etcd, so even a write may go elsewhere.
        return _Failure(f"connect: {e}", False, None, isinstance(e, TimeoutError))
    if isinstance(e, aiohttp.ServerDisconnectedError) and ep.startswith("http://"):
        # etcd's TLS listener drops plain-HTTP connections without a word.
        return _Failure(f"{type(e).__name__}: {e} (if this endpoint uses TLS, write it as https://)", True)
    if isinstance(e, aiohttp.ClientError | OSError):
        return _Failure(f"{type(e).__name__}: {e}", True)
    raise e  # not a transport problem (a bug): let it surface as it is
