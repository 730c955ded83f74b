"""The dashboard's routes on the coordinator's app.

    GET /ui               the page (static/index.html)
    GET /ui/static/...    its script and style sheet
    GET /ui/api/fleet     the view, the recent events and etcd's reachability, as JSON
    /ui/api/admin, /ui/api/drain/<node>: the drain buttons (admin.py)

The page and its files hold no data and are open; ``/ui/api/`` is a status view and follows
``[api] status_access`` / ``status_allow`` exactly as ``/v1/status`` does (the app's
StatusAccess middleware guards that prefix). With a token required, the page asks for it once
and sends it as a bearer token. Drain and undrain need the admin token besides
(``[coordinator] admin_token_file``, which also opens status); without one the dashboard is
read-only.

The page polls ``/ui/api/fleet`` (every 1.5 s) rather than holding a server-sent event stream:
nothing to clean up when a browser goes, one cached view serves every page, and a page that
lost the coordinator simply keeps its last data and says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from gpufleet.httperrors import json_response
from gpufleet.statusaccess import TokenFile
from gpufleet.tasks import cancel_and_wait

from .admin import add_admin_routes
from .watch import FleetWatch

if TYPE_CHECKING:
    from ..daemon import CoordinatorRuntime

STATIC = Path(__file__).parent / "static"
API_PREFIX = "/ui/api/"


def add_dashboard(app: web.Application, rt: CoordinatorRuntime, admin_token: TokenFile | None) -> FleetWatch:
    """Add the routes, and run the watcher for as long as the app runs."""
    watch = FleetWatch(rt)
    admin = {"available": admin_token is not None}  # whether the page may offer the drain buttons

    async def page(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def to_page(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui")

    async def fleet(_: web.Request) -> web.Response:
        return json_response(watch.page(time.time()) | {"admin": admin}, headers={"Cache-Control": "no-store"})

    async def running(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch.run(), name="dashboard")
        yield
        await cancel_and_wait(task)

    app.router.add_get("/ui", page)
    app.router.add_get("/ui/", to_page)
    app.router.add_get(API_PREFIX + "fleet", fleet)
    app.router.add_static("/ui/static", STATIC, append_version=False)
    add_admin_routes(app, rt, admin_token, API_PREFIX)
    app.cleanup_ctx.append(running)
    return watch
