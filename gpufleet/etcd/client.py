"""EtcdClient: the etcd v3 API gpufleet uses, over etcd's JSON gateway.

Every method has a deadline (``timeout=``, default the client's ``timeout``) that covers
failover between endpoints, re-authentication and back-off: a call returns or raises an
EtcdError within it. Which calls are retried on another endpoint is explained in transport.py;
in short, reads and lease keep-alives always, writes only when they provably did not reach etcd.

Keys and values are ``str`` (UTF-8) or ``bytes`` going in and ``bytes`` coming out
(``KeyValue.key_str``/``value_str`` decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import EtcdLeaseNotFound
from .messages import (
    Compare,
    DeleteResult,
    Key,
    KeyValue,
    Lease,
    LeaseInfo,
    Op,
    PutResult,
    RangeResult,
    Status,
    TxnResult,
    as_int,
    b64,
    put_request,
    range_fields,
    range_request,
    to_bytes,
    unb64,
)
from .transport import PathNotFound, Transport, normalize_endpoint
from .watch import Watch


class EtcdClient:
    """``async with EtcdClient(["http://10.0.0.1:2379", ...]) as etcd: await etcd.get("/k")``."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = 5.0,
        require_leader: bool = True,
    ) -> None:
        self.transport = Transport(
            endpoints,
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            timeout=timeout,
            require_leader=require_leader,
        )
        # Alias paths that worked, e.g. lease time-to-live (see _call_aliased).
        self._alias: dict[str, str] = {}

    async def __aenter__(self) -> EtcdClient:
        await self.transport.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    async def close(self) -> None:
        await self.transport.close()

    @property
    def timeout(self) -> float:
        return self.transport.timeout

    @property
    def endpoints(self) -> list[str]:
        return list(self.transport.endpoints)

    @property
    def current_endpoint(self) -> str:
        return self.transport.current_endpoint

    # --- kv ----------------------------------------------------------------------------------

    async def range(
        self,
        key: Key,
        range_end: Key | None = None,
        *,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        revision: int | None = None,
        timeout: float | None = None,
    ) -> RangeResult:
        """Keys in [key, range_end) (just ``key`` without range_end), sorted by key."""
        req = range_request(
            key, prefix=False, limit=limit, keys_only=keys_only, count_only=count_only, revision=revision
        )
        if range_end is not None:
            req["range_end"] = b64(range_end)
        return RangeResult.parse(await self.transport.call("/v3/kv/range", req, timeout=timeout))

    async def get(self, key: Key, *, revision: int | None = None, timeout: float | None = None) -> KeyValue | None:
        req = range_request(key, prefix=False, revision=revision)
        res = RangeResult.parse(await self.transport.call("/v3/kv/range", req, timeout=timeout))
        return res.kvs[0] if res.kvs else None

    async def get_prefix(
        self,
        prefix: Key,
        *,
        limit: int = 0,
        keys_only: bool = False,
        revision: int | None = None,
        timeout: float | None = None,
    ) -> RangeResult:
        """Every key starting with ``prefix`` (all keys for an empty prefix), sorted by key.

        With ``limit``, ``more`` says whether keys were left out; list the rest with ``range()``
        from the last key + b"\\0" at the same ``revision`` for a consistent paginated listing
        (``listwatch.list_prefix`` does exactly that).
        """
        req = range_request(prefix, prefix=True, limit=limit, keys_only=keys_only, revision=revision)
        return RangeResult.parse(await self.transport.call("/v3/kv/range", req, timeout=timeout))

    async def put(
        self,
        key: Key,
        value: Key,
        *,
        lease: int | None = None,
        prev_kv: bool = False,
        timeout: float | None = None,
    ) -> PutResult:
        """Write ``key``; the result's ``revision`` is the store revision of this write."""
        req = put_request(key, value, lease=lease, prev_kv=prev_kv)
        return PutResult.parse(await self.transport.call("/v3/kv/put", req, timeout=timeout, idempotent=False))

    async def delete(self, key: Key, *, prev_kv: bool = False, timeout: float | None = None) -> DeleteResult:
        return await self._delete(range_fields(key, prefix=False), prev_kv, timeout)

    async def delete_prefix(self, prefix: Key, *, prev_kv: bool = False, timeout: float | None = None) -> DeleteResult:
        return await self._delete(range_fields(prefix, prefix=True), prev_kv, timeout)

    async def _delete(self, req: dict[str, Any], prev_kv: bool, timeout: float | None) -> DeleteResult:
        if prev_kv:
            req["prev_kv"] = True
        data = await self.transport.call("/v3/kv/deleterange", req, timeout=timeout, idempotent=False)
        return DeleteResult.parse(data)

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        """If every compare holds, run ``success`` ops, else ``failure`` ops; atomically.

        Create-if-absent: ``txn([Compare.absent(k)], [Op.put(k, v)], [Op.get(k)])``.
        """
        req = {
            "compare": [c.to_json() for c in compare],
            "success": [o.to_json() for o in success],
            "failure": [o.to_json() for o in failure],
        }
        return TxnResult.parse(await self.transport.call("/v3/kv/txn", req, timeout=timeout, idempotent=False))

    async def compact(self, revision: int, *, physical: bool = True, timeout: float | None = None) -> None:
        """Drop history before ``revision``; ``physical`` waits until the space is really freed."""
        req = {"revision": str(revision), "physical": physical}
        await self.transport.call("/v3/kv/compaction", req, timeout=timeout, idempotent=False)

    # --- leases ------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int, id: int | None = None, *, timeout: float | None = None) -> Lease:
        req: dict[str, Any] = {"TTL": str(int(ttl))}
        if id:
            req["ID"] = str(id)
        data = await self.transport.call("/v3/lease/grant", req, timeout=timeout, idempotent=False)
        return Lease(id=as_int(data.get("ID")), ttl=as_int(data.get("TTL")))

    async def lease_keepalive_once(self, id: int, *, timeout: float | None = None) -> int:
        """Refresh the lease; returns its new TTL. EtcdLeaseNotFound once it has expired.

        ``/v3/lease/keepalive`` is a stream, but the gateway closes it once our one-message body
        has been answered, so a plain POST gets exactly one response, wrapped in ``result``.
        Refreshing twice is harmless, so this is retried on other endpoints like a read.
        """
        data = await self.transport.call("/v3/lease/keepalive", {"ID": str(id)}, timeout=timeout)
        ttl = as_int((data.get("result") or {}).get("TTL"))
        if ttl <= 0:  # etcd answers an unknown lease with TTL 0 (left out of the JSON)
            raise EtcdLeaseNotFound(f"etcd lease {id:x} not found (expired or revoked)")
        return ttl

    async def lease_revoke(self, id: int, *, timeout: float | None = None) -> None:
        """Revoke the lease and delete its keys. EtcdLeaseNotFound if it is already gone."""
        await self._call_aliased(
            ("/v3/lease/revoke", "/v3/kv/lease/revoke"), {"ID": str(id)}, timeout=timeout, idempotent=False
        )

    async def lease_time_to_live(self, id: int, *, keys: bool = False, timeout: float | None = None) -> LeaseInfo:
        """The lease's remaining TTL (and attached keys). EtcdLeaseNotFound once it has expired."""
        req: dict[str, Any] = {"ID": str(id)}
        if keys:
            req["keys"] = True
        data = await self._call_aliased(("/v3/lease/timetolive", "/v3/kv/lease/timetolive"), req, timeout=timeout)
        ttl = as_int(data.get("TTL"))
        if ttl < 0 or (ttl == 0 and not as_int(data.get("grantedTTL"))):  # etcd says TTL -1 for "no such lease"
            raise EtcdLeaseNotFound(f"etcd lease {id:x} not found (expired or revoked)")
        return LeaseInfo(
            id=as_int(data.get("ID")),
            ttl=ttl,
            granted_ttl=as_int(data.get("grantedTTL")),
            keys=[unb64(k) for k in data.get("keys") or ()],
        )

    async def _call_aliased(
        self, paths: tuple[str, ...], body: dict[str, Any], *, timeout: float | None, idempotent: bool = True
    ) -> dict[str, Any]:
        """Call the first of ``paths`` this etcd serves, and remember which one that was.

        Lease time-to-live and revoke are served at ``/v3/lease/...`` and at the older
        ``/v3/kv/lease/...``; which ones exist has varied between releases (3.4.23 and 3.5 have
        both). An unknown path is a plain-text 404 from the gateway, never an etcd error.
        """
        known = self._alias.get(paths[0])
        candidates = [known] if known else list(paths)
        for i, path in enumerate(candidates):
            try:
                data = await self.transport.call(path, body, timeout=timeout, idempotent=idempotent)
            except PathNotFound:
                if i == len(candidates) - 1:
                    raise
                continue
            self._alias[paths[0]] = path
            return data
        raise AssertionError("unreachable")

    # --- cluster -----------------------------------------------------------------------------

    async def status(self, *, endpoint: str | None = None, timeout: float | None = None) -> Status:
        """Maintenance status of ``endpoint`` (default: whichever member answers)."""
        # With an endpoint there is no failover: the question is about that member.
        data = await self.transport.call("/v3/maintenance/status", {}, timeout=timeout, endpoint=endpoint)
        return Status.parse(normalize_endpoint(endpoint) if endpoint else self.transport.current_endpoint, data)

    # --- watch -------------------------------------------------------------------------------

    def watch(
        self,
        key: Key,
        *,
        prefix: bool = True,
        range_end: Key | None = None,
        start_revision: int | None = None,
        progress_notify: bool = True,
        prev_kv: bool = False,
        idle_timeout: float = 15.0,
        timeout: float | None = None,
    ) -> Watch:
        """A Watch (async iterator of WatchResponse) on ``key``, every key under it (``prefix``),
        or the keys in [key, range_end).

        ``start_revision`` replays history from that revision (EtcdCompacted if it is gone);
        ``timeout`` bounds creating the watch; ``idle_timeout`` is the silence after which the
        member's liveness is checked (watch.py). Use ``async with`` or ``close()`` it.
        """
        return Watch(
            self,
            to_bytes(key),
            prefix=prefix,
            range_end=range_end,
            start_revision=start_revision,
            progress_notify=progress_notify,
            prev_kv=prev_kv,
            idle_timeout=idle_timeout,
            timeout=timeout,
        )
