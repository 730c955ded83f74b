"""The dashboard's drain and undrain buttons: the only writes it makes, and only with the admin
token (``[coordinator] admin_token_file``; without one the dashboard is read-only).

    GET    /ui/api/admin          200 with the admin token, 401 without, 404 when there is none
    PUT    /ui/api/drain/<node>   {"reason": "..."}: writes /drain/<node> as ``gpuctl drain`` does
    DELETE /ui/api/drain/<node>   removes it, as ``gpuctl undrain`` does

Any replica writes, leader or not, exactly as gpuctl does (a drain is an operator's record, not
the leader's: no epoch guard). The token travels in the Authorization header, which a browser
never adds by itself, so another site cannot make a signed-in page drain a node (no CSRF).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import msgspec
import structlog
from aiohttp import web

from gpufleet.etcd import EtcdError
from gpufleet.httperrors import bearer_refused, error_response, json_response
from gpufleet.keyspace import InvalidName, check_name, encode
from gpufleet.keyspace.records import DrainRecord
from gpufleet.statusaccess import TokenFile

if TYPE_CHECKING:
    from ..daemon import CoordinatorRuntime

log = structlog.get_logger("coordinator.ui")


class DrainRequest(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=200)] = ""


_decode_drain = msgspec.json.Decoder(DrainRequest)


def add_admin_routes(app: web.Application, rt: CoordinatorRuntime, token: TokenFile | None, prefix: str) -> None:
    def refused(request: web.Request) -> web.Response | None:
        """Why this request may not write (a response), or None when it may."""
        if token is None:
            return error_response(
                404, "the dashboard is read-only: no [coordinator] admin_token_file", "not_found_error", "read_only"
            )
        if not token.check(request.headers.get("Authorization")):
            return bearer_refused(
                "missing or wrong admin token ([coordinator] admin_token_file)", "gpu-coordinator admin"
            )
        return None

    def unavailable(e: EtcdError) -> web.Response:
        return error_response(503, f"etcd unavailable, nothing written: {e}", "service_unavailable", "etcd")

    def node_of(request: web.Request) -> str:
        node = request.match_info["node"]
        try:
            return check_name("node", node)
        except InvalidName as e:
            raise web.HTTPBadRequest(
                text=msgspec.json.encode({"error": {"message": str(e), "type": "invalid_request_error"}}).decode(),
                content_type="application/json",
            ) from None

    async def whoami(request: web.Request) -> web.Response:
        return refused(request) or json_response({"admin": True})

    async def drain(request: web.Request) -> web.Response:
        if (no := refused(request)) is not None:
            return no
        node = node_of(request)
        body = await request.read()
        try:
            req = _decode_drain.decode(body) if body.strip() else DrainRequest()
        except msgspec.DecodeError as e:  # ValidationError is one
            return error_response(400, f"drain request: {e}", "invalid_request_error", "bad_body")
        who = f"dashboard on {rt.cfg.id} (from {request.remote or '?'})"
        rec = DrainRecord(node=node, reason=req.reason, by=who, at=time.time())
        try:
            await rt.etcd.put(rt.keys.drain(node), encode(rec))
        except EtcdError as e:
            return unavailable(e)
        log.info("node drained from the dashboard", node=node, reason=req.reason, by=who)
        return json_response({"node": node, "drained": True})

    async def undrain(request: web.Request) -> web.Response:
        if (no := refused(request)) is not None:
            return no
        node = node_of(request)
        try:
            res = await rt.etcd.delete(rt.keys.drain(node))
        except EtcdError as e:
            return unavailable(e)
        if res.deleted:
            log.info("node undrained from the dashboard", node=node, remote=request.remote)
        return json_response({"node": node, "drained": False, "was_drained": bool(res.deleted)})

    app.router.add_get(prefix + "admin", whoami)
    app.router.add_put(prefix + "drain/{node}", drain)
    app.router.add_delete(prefix + "drain/{node}", undrain)
