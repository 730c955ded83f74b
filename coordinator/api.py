"""The coordinator's HTTP API: /healthz, /readyz, /v1/status, /metrics (the last two as
``[api] status_access`` and ``status_allow`` say: gpufleet/statusaccess.py), and the
dashboard at /ui (coordinator/ui; its data under /ui/api/ follows the same rule)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gpufleet.httperrors import bad_input_middleware, error_middleware, json_response
from gpufleet.statusaccess import StatusAccess, TokenFile

from .ui.app import API_PREFIX, add_dashboard

if TYPE_CHECKING:
    from .daemon import CoordinatorRuntime
    from .policysync import PolicyState


def status_doc(rt: CoordinatorRuntime) -> dict[str, Any]:
    el, leader = rt.election, rt.leader
    d = leader.decision
    # The leader keeps health times on the monotonic clock; people read wall-clock times.
    to_wall = time.time() - time.monotonic()
    nodes = [
        {"node": n, "state": str(h.state), "reason": h.reason, "since": h.since + to_wall}
        for n, h in sorted(leader.node_health.items())
    ]
    return {
        "id": rt.cfg.id,
        "cluster": rt.cfg.etcd.cluster,
        "is_leader": el.is_leader,
        "leader": el.leader,
        "epoch": el.epoch if el.is_leader else el.leader_epoch,
        "elected_at": el.elected_at if el.is_leader else None,
        # Passes past the new term's grace period, each with its routes written: 0 = observing.
        "deciding_passes": leader.deciding_passes if el.is_leader else 0,
        "last_decision": {
            "at": d.at,
            "epoch": d.epoch,
            "summary": d.summary,
            "route_writes": d.route_writes,
            "route_deletes": d.route_deletes,
            "changes": d.changes[:50],
        },
        "nodes": nodes if el.is_leader else [],
        "panic": dict(leader.plan.panic) if leader.plan and el.is_leader else {},
        "guard_rejections": el.guard_rejections,
        "policy": policy_doc(leader.policy_state),
        "degradation": {
            "level": leader.degradation.state.level,
            "error_rate": leader.degradation.state.rate,
            "samples": leader.degradation.state.samples,
            "reason": leader.degradation.state.reason,
        }
        if el.is_leader
        else None,
        "placement": [msgspec.to_builtins(s) for s in leader.placer.plan.status.values()]
        if el.is_leader and leader.placer.plan
        else [],
    }


def policy_doc(st: PolicyState) -> dict[str, Any]:
    """The cluster policy this replica applies (every replica applies etcd's, leader or not), to
    compare with ``gpuctl config show``: a replica that lags or skipped a value shows here."""
    p = st.policy
    return {
        # The etcd mod revision of the value applied; 0 when none applies from etcd: the file's
        # sections before the key is first seen, or the last one applied if the key was deleted.
        "revision": st.revision,
        # A value in etcd that did not decode or validate, skipped (the last good one stays).
        "skipped_revision": st.seen if st.seen != st.revision else None,
        "updated_by": p.updated_by,
        "updated_at": p.updated_at or None,
    }


def admin_token(path: str | None) -> TokenFile | None:
    """The dashboard's admin token ([coordinator] admin_token_file); raises OSError naming the
    field for a file that cannot be used (missing, writable by others, too short)."""
    if not path:
        return None
    token = TokenFile(path, "admin token")
    try:
        token.load()
    except OSError as e:
        why = f"cannot read admin token file {path}: {e.strerror}" if e.strerror else str(e)
        raise OSError(f"$.coordinator.admin_token_file: {why}") from None
    return token


def build_app(rt: CoordinatorRuntime) -> web.Application:
    """Raises OSError for a status token file that cannot be used ([api] status_access = "token")
    or an admin token file that cannot ([coordinator] admin_token_file)."""
    admin = admin_token(rt.cfg.coordinator.admin_token_file)
    access = StatusAccess(
        rt.cfg.api,
        "gpu-coordinator",
        other_token=admin.check if admin else None,  # the admin token opens status too, as on an agent
        guarded_prefixes=(API_PREFIX,),
    )
    access.check_files()
    app = web.Application(middlewares=[error_middleware, bad_input_middleware, access.middleware])

    async def healthz(_: web.Request) -> web.Response:
        age = time.monotonic() - rt.last_tick
        if age > 3 * rt.tick_interval + 5:
            return json_response({"status": "stalled", "last_tick_age_s": round(age, 1)}, 503)
        return json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        synced = rt.leader.nodes.ready.is_set() and all(m.ready.is_set() for m in rt.leader.routes.mirrors())
        knows_leader = rt.election.is_leader or rt.election.leader is not None
        if synced and knows_leader:
            return json_response({"status": "ready", "role": "leader" if rt.election.is_leader else "standby"})
        reason = "state not synced from etcd" if not synced else "no leader known"
        return json_response({"status": "not ready", "reason": reason}, 503)

    async def status(_: web.Request) -> web.Response:
        return json_response(status_doc(rt))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(rt.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/metrics", metrics)
    add_dashboard(app, rt, admin)
    return app
